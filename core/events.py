"""Every message streamrec reads or writes: frozen, typed, versioned schemas.

Producers send JSON. ``decode`` turns raw bytes into one of these records or
raises ``DecodeError`` with a short reason code; agents turn that error into a
``DeadLetter`` (raw bytes + reason) instead of crashing. Nothing else in the
project parses event JSON.
"""
from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import DecodeError
from core.text import CONTENT_TEXT_FIELDS, compose_text

SCHEMA_VERSION = 1

# Ids travel as strings; a conservative alphabet keeps them safe as keys,
# payload values and metric labels.
Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/+-]+$")]
EventTime = Annotated[float, Field(gt=0, lt=4_102_444_800)]  # seconds since epoch, < 2100
Action = Literal["view", "click", "add_to_cart", "purchase"]


def new_event_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    """Fields every event carries."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    event_id: Id
    schema_version: Literal[1] = SCHEMA_VERSION
    event_time: EventTime

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class ImageRef(BaseModel):
    """An image given inline (base64) or by URI; exactly one of the two."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    image_b64: Annotated[str, Field(min_length=4)] | None = None
    image_uri: Annotated[str, Field(min_length=1, max_length=2048)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ImageRef":
        if (self.image_b64 is None) == (self.image_uri is None):
            raise ValueError("give exactly one of image_b64 and image_uri")
        return self

    def inline_bytes(self) -> bytes | None:
        if self.image_b64 is None:
            return None
        try:
            return base64.b64decode(self.image_b64, validate=True)
        except ValueError as exc:
            raise DecodeError("bad_image", f"image_b64 is not valid base64: {exc}") from None


class ClickEvent(Event):
    """A user acted on an item (``events.clicks``, keyed by user id)."""

    user_id: Id
    item_id: Id
    action: Action = "click"
    query_id: Id | None = None
    position: Annotated[int, Field(ge=0, le=100_000)] | None = None


class SearchEvent(Event):
    """A user searched (``events.searches``, keyed by user id).

    With ``k`` set the worker also answers on ``rec.responses`` with
    ``request_id`` = ``event_id``.
    """

    user_id: Id
    query: Annotated[str, Field(min_length=1, max_length=1000)]
    k: Annotated[int, Field(ge=1, le=10_000)] | None = None


class ImageEvent(Event):
    """A catalogue photo for an item, or a user's visual-search query (``events.images``).

    Catalogue photos are keyed by item id, visual searches by user id.
    """

    purpose: Literal["catalog_photo", "visual_search"]
    item_id: Id | None = None
    user_id: Id | None = None
    image: ImageRef
    k: Annotated[int, Field(ge=1, le=10_000)] | None = None

    @model_validator(mode="after")
    def _subject(self) -> "ImageEvent":
        if self.purpose == "catalog_photo" and self.item_id is None:
            raise ValueError("a catalog_photo needs item_id")
        if self.purpose == "visual_search" and self.user_id is None:
            raise ValueError("a visual_search needs user_id")
        return self


class CatalogItem(Event):
    """Catalogue upsert or deletion (``catalog.items``, keyed by item id)."""

    item_id: Id
    op: Literal["upsert", "delete"] = "upsert"
    title: Annotated[str, Field(max_length=2000)] = ""
    description: Annotated[str, Field(max_length=20_000)] = ""
    category: Annotated[str, Field(max_length=200)] = ""
    attributes: dict[Annotated[str, Field(max_length=100)], Annotated[str, Field(max_length=500)]] = Field(
        default_factory=dict, max_length=100
    )
    price: Annotated[float, Field(ge=0, lt=1e9)] | None = None
    image: ImageRef | None = None

    @property
    def text(self) -> str:
        """All of the item's text: what the content (rule) model's text tower reads."""
        return self.text_for(CONTENT_TEXT_FIELDS)

    def text_for(self, fields: Sequence[str]) -> str:
        """The text a model with these ``text_fields`` embeds for this item."""
        return compose_text(fields, {"title": self.title, "category": self.category,
                                     "description": self.description})


class RequestFilters(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    categories: list[Annotated[str, Field(max_length=200)]] = Field(default_factory=list, max_length=100)
    exclude_ids: list[Id] = Field(default_factory=list, max_length=10_000)
    max_price: Annotated[float, Field(ge=0)] | None = None


class RecRequest(BaseModel):
    """Ask for a user's recommendations (``rec.requests`` or HTTP POST /recommend)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    request_id: Id
    schema_version: Literal[1] = SCHEMA_VERSION
    event_time: EventTime | None = None
    user_id: Id
    k: Annotated[int, Field(ge=1, le=10_000)] = 10
    query: Annotated[str, Field(min_length=1, max_length=1000)] | None = None
    image: ImageRef | None = None
    filters: RequestFilters = Field(default_factory=RequestFilters)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class RecommendedItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    item_id: str
    score: float
    reason: str
    title: str = ""


class RecResponse(BaseModel):
    """The answer to a ``RecRequest`` (``rec.responses``, keyed by user id)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    schema_version: Literal[1] = SCHEMA_VERSION
    user_id: str
    items: list[RecommendedItem]
    model_version: str
    served_at: float
    latency_ms: float
    error: str | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class DeadLetter(BaseModel):
    """A message that could not be used, kept whole with the reason (``events.deadletter``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_topic: str
    partition: int | None = None
    offset: int | None = None
    key_b64: str | None = None
    reason: str
    detail: str
    raw_b64: str
    raw_size: int = 0
    raw_truncated: bool = False
    dead_lettered_at: float

    @classmethod
    def of(
        cls,
        raw: bytes | None,
        error: DecodeError,
        *,
        topic: str,
        partition: int | None = None,
        offset: int | None = None,
        key: bytes | None = None,
        max_raw_bytes: int = 262_144,
    ) -> "DeadLetter":
        raw = raw or b""
        # An oversize message would not fit in the dead-letter topic whole:
        # keep its head and say so.
        kept = raw[:max_raw_bytes]
        return cls(
            source_topic=topic,
            partition=partition,
            offset=offset,
            key_b64=base64.b64encode(key).decode() if key else None,
            reason=error.reason,
            detail=error.detail[:2000],
            raw_b64=base64.b64encode(kept).decode(),
            raw_size=len(raw),
            raw_truncated=len(kept) < len(raw),
            dead_lettered_at=time.time(),
        )

    def raw(self) -> bytes:
        return base64.b64decode(self.raw_b64)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class ModelUpdate(BaseModel):
    """A new model version was promoted (``model.updates``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    path: str
    promoted_at: float
    schema_version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


# Reason codes (dead-letter reasons and metric labels), one place.
REASONS = (
    "oversize",
    "bad_utf8",
    "bad_json",
    "not_object",
    "unknown_schema_version",
    "missing_field",
    "wrong_type",
    "invalid_value",
    "unknown_field",
    "bad_image",
    "image_too_large",
    "image_uri_forbidden",
    "unknown_item",
    "processing_error",
)

E = TypeVar("E", bound=BaseModel)


def decode(schema: type[E], raw: bytes | None, *, max_bytes: int) -> E:
    """Validate raw bytes as ``schema`` or raise ``DecodeError`` with a reason code.

    The good path is a single pass of pydantic's JSON parser; the error paths
    classify what went wrong so that operators can count and act on it.
    """
    if raw is None:
        raise DecodeError("missing_field", "message has no value")
    if len(raw) > max_bytes:
        raise DecodeError("oversize", f"{len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        raise _classify(raw, exc) from None


def _classify(raw: bytes, exc: ValidationError) -> DecodeError:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    kind = first["type"]
    where = ".".join(str(p) for p in first["loc"]) or "(message)"
    message = f"{where}: {first['msg']}"
    if kind == "json_invalid":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            return DecodeError("bad_utf8", f"not UTF-8 at byte {bad.start}")
        return DecodeError("bad_json", first["msg"])
    if kind in ("model_type", "model_attributes_type", "dict_type") and not first["loc"]:
        return DecodeError("not_object", "the JSON value must be an object")
    if first["loc"] and first["loc"][0] == "schema_version" and kind != "missing":
        return DecodeError(
            "unknown_schema_version",
            f"schema_version must be {SCHEMA_VERSION}; this worker does not read others",
        )
    if kind == "missing":
        return DecodeError("missing_field", message)
    if kind == "extra_forbidden":
        return DecodeError("unknown_field", message)
    if kind.endswith("_type") or kind == "int_from_float":
        return DecodeError("wrong_type", message)
    return DecodeError("invalid_value", message)
