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

# What a bump means and which changes need one: docs/contracts.md.
SCHEMA_VERSION = 1

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

    event_id: Annotated[Id, Field(description="Unique per event: an event sent again with the same id "
                                              "is applied once.")]
    schema_version: Literal[1] = Field(
        SCHEMA_VERSION, description="Version of this schema; a worker dead-letters a version it does not "
                                    "read (reason unknown_schema_version).")
    event_time: Annotated[EventTime, Field(description="When it happened: seconds since the Unix epoch (UTC).")]

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class ImageRef(BaseModel):
    """An image given inline (base64) or by URI; exactly one of the two."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", strict=True,
        # The validator below, for validators in other languages: exactly one is a string.
        json_schema_extra={"oneOf": [
            {"required": ["image_b64"], "properties": {"image_b64": {"type": "string"}}},
            {"required": ["image_uri"], "properties": {"image_uri": {"type": "string"}}},
        ]},
    )

    image_b64: Annotated[str, Field(min_length=4)] | None = Field(
        None, description="The image file's bytes (JPEG, PNG, ...), base64.")
    image_uri: Annotated[str, Field(min_length=1, max_length=2048)] | None = Field(
        None, description="A file:// URI or path under STREAMREC_IMAGE_ROOT, or an http(s) URL when "
                          "STREAMREC_IMAGE_ALLOW_HTTP is true.")

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

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"event_id": "e-1", "schema_version": 1, "event_time": 1764300000.0, "user_id": "u-1",
         "item_id": "sku-1", "action": "click", "query_id": "q-7", "position": 0},
    ]})

    user_id: Annotated[Id, Field(description="Who acted; also the message key.")]
    item_id: Annotated[Id, Field(description="The item acted on.")]
    action: Action = Field("click", description="What the user did.")
    query_id: Id | None = Field(None, description="The search the item was found by, if any.")
    position: Annotated[int, Field(ge=0, le=100_000)] | None = Field(
        None, description="The item's place (0 = first) in the list the user saw.")


class SearchEvent(Event):
    """A user searched (``events.searches``, keyed by user id).

    With ``k`` set the worker also answers on ``rec.responses`` with
    ``request_id`` = ``event_id``.
    """

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"event_id": "s-1", "schema_version": 1, "event_time": 1764300000.0, "user_id": "u-1",
         "query": "waterproof trail shoes", "k": 5},
    ]})

    user_id: Annotated[Id, Field(description="Who searched; also the message key.")]
    query: Annotated[str, Field(min_length=1, max_length=1000, description="What the user typed.")]
    k: Annotated[int, Field(ge=1, le=10_000)] | None = Field(
        None, description="Set: answer on rec.responses with this many items (capped at STREAMREC_MAX_K).")


class ImageEvent(Event):
    """A catalogue photo for an item, or a user's visual-search query (``events.images``).

    Catalogue photos are keyed by item id, visual searches by user id.
    """

    model_config = ConfigDict(json_schema_extra={
        # The validator below, for validators in other languages.
        "allOf": [
            {"if": {"properties": {"purpose": {"const": "catalog_photo"}}, "required": ["purpose"]},
             "then": {"required": ["item_id"], "properties": {"item_id": {"type": "string"}}}},
            {"if": {"properties": {"purpose": {"const": "visual_search"}}, "required": ["purpose"]},
             "then": {"required": ["user_id"], "properties": {"user_id": {"type": "string"}}}},
        ],
        "examples": [
            {"event_id": "p-1", "schema_version": 1, "event_time": 1764300000.0, "purpose": "catalog_photo",
             "item_id": "sku-1", "image": {"image_uri": "shoes/sku-1.jpg"}},
            {"event_id": "v-1", "schema_version": 1, "event_time": 1764300000.0, "purpose": "visual_search",
             "user_id": "u-1", "image": {"image_b64": "iVBORw0KGgo="}, "k": 5},
        ],
    })

    purpose: Literal["catalog_photo", "visual_search"] = Field(
        description="catalog_photo: the photo of item_id; visual_search: user_id searches with this photo.")
    item_id: Id | None = Field(None, description="The item pictured; required for a catalog_photo.")
    user_id: Id | None = Field(None, description="Who searches; required for a visual_search.")
    image: ImageRef
    k: Annotated[int, Field(ge=1, le=10_000)] | None = Field(
        None, description="visual_search: answer on rec.responses with this many items (request_id = event_id).")

    @model_validator(mode="after")
    def _subject(self) -> "ImageEvent":
        if self.purpose == "catalog_photo" and self.item_id is None:
            raise ValueError("a catalog_photo needs item_id")
        if self.purpose == "visual_search" and self.user_id is None:
            raise ValueError("a visual_search needs user_id")
        return self


class CatalogItem(Event):
    """Catalogue upsert or deletion (``catalog.items``, keyed by item id)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"event_id": "c-1", "schema_version": 1, "event_time": 1764300000.0, "item_id": "sku-1", "op": "upsert",
         "title": "Trail running shoe", "description": "Grippy sole, light upper", "category": "Shoes",
         "attributes": {"colour": "red"}, "price": 89.5},
        {"event_id": "c-2", "schema_version": 1, "event_time": 1764300000.0, "item_id": "sku-1", "op": "delete"},
    ]})

    item_id: Annotated[Id, Field(description="The item; also the message key.")]
    op: Literal["upsert", "delete"] = Field(
        "upsert", description="upsert: create or replace the item; delete: remove it.")
    title: Annotated[str, Field(max_length=2000)] = ""
    description: Annotated[str, Field(max_length=20_000)] = ""
    category: Annotated[str, Field(max_length=200, description="Requests can filter on it.")] = ""
    attributes: dict[Annotated[str, Field(max_length=100)], Annotated[str, Field(max_length=500)]] = Field(
        default_factory=dict, max_length=100, description="Free-form string attributes (colour, size, ...)."
    )
    price: Annotated[float, Field(ge=0, lt=1e9)] | None = Field(
        None, description="Requests can filter on it (filters.max_price).")
    image: ImageRef | None = Field(None, description="The item's photo.")

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

    categories: list[Annotated[str, Field(max_length=200)]] = Field(
        default_factory=list, max_length=100, description="Only items of one of these categories (empty: any).")
    exclude_ids: list[Id] = Field(
        default_factory=list, max_length=10_000,
        description="Items never to return (besides those the user has interacted with).")
    max_price: Annotated[float, Field(ge=0)] | None = Field(
        None, description="Only items with a price at most this (items without a price are left out).")


class RecRequest(BaseModel):
    """Ask for a user's recommendations (``rec.requests`` or HTTP POST /recommend)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, json_schema_extra={"examples": [
        {"request_id": "r-1", "schema_version": 1, "user_id": "u-1", "k": 3},
        {"request_id": "r-2", "schema_version": 1, "user_id": "u-1", "k": 5, "query": "trail socks",
         "filters": {"categories": ["Socks"], "exclude_ids": ["sku-9"], "max_price": 20.0}},
    ]})

    request_id: Annotated[Id, Field(description="Echoed in the response, to match the two.")]
    schema_version: Literal[1] = Field(
        SCHEMA_VERSION, description="Version of this schema; other versions are refused (unknown_schema_version).")
    event_time: EventTime | None = Field(None, description="When it was asked: seconds since the Unix epoch.")
    user_id: Annotated[Id, Field(description="Whose recommendations; also the message key.")]
    k: Annotated[int, Field(ge=1, le=10_000)] = Field(
        10, description="How many items (the worker answers at most STREAMREC_MAX_K).")
    query: Annotated[str, Field(min_length=1, max_length=1000)] | None = Field(
        None, description="Rank for this search text instead of the user's profile.")
    image: ImageRef | None = Field(None, description="Rank by likeness to this photo (visual search).")
    filters: RequestFilters = Field(default_factory=RequestFilters)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class RecommendedItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    item_id: str
    score: float = Field(description="The model's click probability.")
    reason: str = Field(description="Why it is recommended, e.g. \"because you viewed '...'\" (README).")
    title: str = Field("", description="The item's catalogue title.")


class RecResponse(BaseModel):
    """The answer to a ``RecRequest`` (``rec.responses``, keyed by user id)."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra={"examples": [
        {"request_id": "r-1", "schema_version": 1, "user_id": "u-1", "model_version": "rule-3",
         "served_at": 1764300000.1, "latency_ms": 3.2,
         "items": [{"item_id": "sku-9", "score": 0.71, "title": "Trail socks",
                    "reason": "because you viewed 'Trail running shoe'"}]},
    ]})

    request_id: str = Field(description="The request's request_id (a search's or visual search's event_id).")
    schema_version: Literal[1] = SCHEMA_VERSION
    user_id: str
    items: list[RecommendedItem] = Field(description="Best first.")
    model_version: str = Field(description="The serving model that ranked them.")
    served_at: float = Field(description="When it was answered: seconds since the Unix epoch.")
    latency_ms: float
    error: str | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


class DeadLetter(BaseModel):
    """A message that could not be used, kept whole with the reason (``events.deadletter``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra={"examples": [
        {"source_topic": "events.clicks", "partition": 0, "offset": 41, "key_b64": "dS0x", "reason": "bad_json",
         "detail": "EOF while parsing an object at line 1 column 5", "raw_b64": "eyJldmVu", "raw_size": 6,
         "raw_truncated": False, "dead_lettered_at": 1764300000.2},
    ]})

    source_topic: str = Field(description="Where the message was read.")
    partition: int | None = None
    offset: int | None = None
    key_b64: str | None = Field(None, description="The message's key, base64 (absent when it had none).")
    reason: str = Field(description="Why it was not used.", json_schema_extra={"enum": list(REASONS)})
    detail: str = Field(description="What was wrong, for people.")
    raw_b64: str = Field(description="The message's bytes, base64 (the first 256 KiB).")
    raw_size: int = Field(0, description="The message's size in bytes.")
    raw_truncated: bool = Field(False, description="Whether raw_b64 holds only the first 256 KiB.")
    dead_lettered_at: float = Field(description="Seconds since the Unix epoch.")

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

    version: str = Field(description="The registry version now current.")
    path: str = Field(description="Its artefact folder, as the publisher sees it.")
    promoted_at: float = Field(description="Seconds since the Unix epoch.")
    schema_version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


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
