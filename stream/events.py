"""The event schemas under the name producers import them by; ``core.events`` defines them."""
from core.events import (  # noqa: F401
    REASONS,
    SCHEMA_VERSION,
    CatalogItem,
    ClickEvent,
    DeadLetter,
    Event,
    ImageEvent,
    ImageRef,
    ModelUpdate,
    RecommendedItem,
    RecRequest,
    RecResponse,
    RequestFilters,
    SearchEvent,
    decode,
    new_event_id,
)
