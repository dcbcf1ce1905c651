"""A worker's services in one process, for the tests that drive them without a broker.

Real components throughout: the exported towers and rule scorer, a qdrant-edge
store in a temporary folder, and the same ``apply_catalog``,
``apply_interactions`` and ``recommend`` the agents call. The fixtures that
open one are in tests/unit/conftest.py.
"""
from __future__ import annotations

import base64
import io
from itertools import count

import numpy as np
from PIL import Image
from prometheus_client import CollectorRegistry

from core.events import (
    CatalogItem,
    ClickEvent,
    ImageRef,
    RecRequest,
    RecResponse,
    SearchEvent,
)
from stream.catalog import apply_catalog, embed_query_image
from stream.kafka import Delivery
from stream.recommend import recommend
from stream.services import Services

T0 = 1_700_000_000.0
CLICKS, SEARCHES = "events.clicks", "events.searches"

CATALOGUE = [
    ("tent-1", "Two-person backpacking tent", "tents", 240.0),
    ("tent-2", "Family camping tent with a porch", "tents", 410.0),
    ("tent-3", "Ultralight trekking pole tent", "tents", 320.0),
    ("tent-4", "Pop-up dome tent for festivals", "tents", 45.0),
    ("shoe-1", "Trail running shoes", "shoes", 130.0),
    ("shoe-2", "Waterproof hiking boots", "shoes", 180.0),
    ("shoe-3", "Leather city sneakers", "shoes", 95.0),
    ("shoe-4", "Children's beach sandals", "shoes", 25.0),
    ("book-1", "Cookbook of Italian pasta", "books", 30.0),
    ("book-2", "Mystery novel set in Venice", "books", 12.0),
    ("book-3", "Field guide to the birds of Europe", "books", 35.0),
    ("book-4", "History of the Roman empire", "books", 28.0),
]
CATEGORY = {item_id: category for item_id, _, category, _ in CATALOGUE}
PRICE = {item_id: price for item_id, _, _, price in CATALOGUE}


def photo_b64(colour: tuple[int, int, int]) -> str:
    image = Image.new("RGB", (96, 64), colour)
    for x in range(0, 96, 8):  # some structure so the tower sees edges
        image.paste((255 - colour[0], colour[1], 255 - colour[2]), (x, 0, x + 4, 64))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class World:
    """One worker's services plus helpers that number events and offsets like a broker."""

    def __init__(self, services: Services, registry: CollectorRegistry) -> None:
        self.services = services
        self.registry = registry
        self._event_ids = count()
        self._offsets: dict[str, count[int]] = {CLICKS: count(), SEARCHES: count()}

    def catalogue(self, rows: list[tuple[str, str, str, float]] = CATALOGUE) -> None:
        items = [
            CatalogItem(event_id=self.event_id(), event_time=T0, item_id=item_id, title=title,
                        category=category, price=price)
            for item_id, title, category, price in rows
        ]
        assert apply_catalog(self.services, items) == []

    def event_id(self) -> str:
        return f"e{next(self._event_ids)}"

    def delivery(self, event: ClickEvent | SearchEvent, partition: int = 0) -> Delivery:
        topic = CLICKS if isinstance(event, ClickEvent) else SEARCHES
        return Delivery(event, topic, partition, next(self._offsets[topic]))

    def click(self, user_id: str, item_id: str, action: str = "click", position: int | None = None) -> Delivery:
        event = ClickEvent(event_id=self.event_id(), event_time=T0, user_id=user_id, item_id=item_id,
                           action=action, position=position)  # type: ignore[arg-type]
        return self.delivery(event)

    def search(self, user_id: str, query: str) -> Delivery:
        event = SearchEvent(event_id=self.event_id(), event_time=T0, user_id=user_id, query=query)
        return self.delivery(event)

    def respond(self, user_id: str, k: int = 100, image_vector: np.ndarray | None = None,
                **request: object) -> RecResponse:
        response = recommend(
            self.services,
            RecRequest(request_id=self.event_id(), user_id=user_id, k=k, **request),  # type: ignore[arg-type]
            path="test",
            image_vector=image_vector,
        )
        assert response.error is None
        assert response.user_id == user_id
        assert response.model_version == self.services.model.version
        return response

    def recommend(self, user_id: str, k: int = 100, **request: object) -> list[tuple[str, str]]:
        return [(item.item_id, item.reason) for item in self.respond(user_id, k, **request).items]

    def visual_search(self, user_id: str, photo: str, k: int, **request: object) -> list[tuple[str, str]]:
        """A request with a photo, embedded as the HTTP endpoint and the images agent do."""
        image = ImageRef(image_b64=photo)
        vector = embed_query_image(self.services, image)
        response = self.respond(user_id, k, image_vector=vector, image=image, **request)
        return [(item.item_id, item.reason) for item in response.items]

    def stored_user(self, user_id: str) -> dict[str, object]:
        users = self.services.store.retrieve(self.services.collections.users, [user_id], with_vectors=True)
        hit = users[user_id]
        return {"payload": hit.payload, "vectors": hit.vectors}

    def item_ids(self) -> set[str]:
        return set(self.services.store.scroll_ids(self.services.collections.items))


def ids(results: list[tuple[str, str]]) -> list[str]:
    return [item_id for item_id, _ in results]
