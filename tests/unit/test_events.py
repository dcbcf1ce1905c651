"""Event schemas and ``decode``: round trips, reason codes, and a property test.

``decode`` is the one entry point for untrusted bytes, so besides the named
cases the property tests below feed it arbitrary bytes, arbitrary JSON values
and mutated valid events: it must either return a valid record or raise
``DecodeError`` with a reason from ``REASONS``, never anything else.
"""
from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from core.errors import DecodeError, StreamrecError
from core.events import (
    REASONS,
    CatalogItem,
    ClickEvent,
    DeadLetter,
    ImageEvent,
    ImageRef,
    ModelUpdate,
    RecommendedItem,
    RecRequest,
    RecResponse,
    RequestFilters,
    SearchEvent,
    decode,
)

MAX_BYTES = 65_536
NOW = 1_700_000_000.0
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\nnot really a png").decode()

# One valid instance of every event kind that producers send or workers emit.
VALID_EVENTS: list[BaseModel] = [
    ClickEvent(event_id="e1", event_time=NOW, user_id="u1", item_id="i1"),
    ClickEvent(
        event_id="e2", event_time=NOW, user_id="u1", item_id="i2", action="purchase",
        query_id="q-7", position=3,
    ),
    SearchEvent(event_id="e3", event_time=NOW, user_id="u1", query="red running shoes", k=5),
    ImageEvent(
        event_id="e4", event_time=NOW, purpose="catalog_photo", item_id="i1",
        image=ImageRef(image_b64=PNG_B64),
    ),
    ImageEvent(
        event_id="e5", event_time=NOW, purpose="visual_search", user_id="u1",
        image=ImageRef(image_uri="file:///photos/a.jpg"), k=20,
    ),
    CatalogItem(
        event_id="e6", event_time=NOW, item_id="sku:42", title="Trail shoe",
        description="Grippy sole", category="shoes", attributes={"colour": "red"},
        price=89.5, image=ImageRef(image_uri="shoes/42.jpg"),
    ),
    CatalogItem(event_id="e7", event_time=NOW, item_id="sku:43", op="delete"),
    RecRequest(
        request_id="r1", user_id="u1", k=7, query="tent",
        filters=RequestFilters(categories=["camping"], exclude_ids=["i9"], max_price=300.0),
    ),
]

# Everything ``decode`` is used with, for the property tests.
DECODED_SCHEMAS: list[type[BaseModel]] = [ClickEvent, SearchEvent, ImageEvent, CatalogItem, RecRequest]


_DROP = object()  # marks a field to leave out


def click_dict(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"event_id": "e1", "event_time": NOW, "user_id": "u1", "item_id": "i1"}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not _DROP}


def reason_of(schema: type[BaseModel], raw: bytes | None, max_bytes: int = MAX_BYTES) -> str:
    with pytest.raises(DecodeError) as caught:
        decode(schema, raw, max_bytes=max_bytes)
    assert caught.value.reason in REASONS
    return caught.value.reason


# --- round trips -------------------------------------------------------------


@pytest.mark.parametrize("event", VALID_EVENTS, ids=lambda e: type(e).__name__)
def test_every_event_kind_round_trips(event: BaseModel) -> None:
    raw = event.to_bytes()  # type: ignore[attr-defined]
    assert decode(type(event), raw, max_bytes=MAX_BYTES) == event


def test_outgoing_records_serialise_to_json() -> None:
    response = RecResponse(
        request_id="r1", user_id="u1",
        items=[RecommendedItem(item_id="i1", score=0.9, reason="trending now", title="Tent")],
        model_version="rule-2", served_at=NOW, latency_ms=1.5,
    )
    assert RecResponse.model_validate_json(response.to_bytes()) == response
    update = ModelUpdate(version="v3", path="/models/v3", promoted_at=NOW)
    assert ModelUpdate.model_validate_json(update.to_bytes()) == update


def test_defaults_are_filled_in() -> None:
    click = decode(ClickEvent, json.dumps(click_dict()).encode(), max_bytes=MAX_BYTES)
    assert click.action == "click" and click.schema_version == 1
    item = decode(CatalogItem, b'{"event_id":"e","event_time":1e9,"item_id":"i"}', max_bytes=MAX_BYTES)
    assert item.op == "upsert" and item.attributes == {} and item.image is None
    request = decode(RecRequest, b'{"request_id":"r","user_id":"u"}', max_bytes=MAX_BYTES)
    assert request.k == 10 and request.filters == RequestFilters()


def test_catalog_text_joins_the_non_empty_parts() -> None:
    item = CatalogItem(event_id="e", event_time=NOW, item_id="i", title="Tent", description="Light")
    assert item.text == "Tent. Light"
    assert CatalogItem(event_id="e", event_time=NOW, item_id="i").text == ""


def test_events_are_frozen() -> None:
    click = ClickEvent(event_id="e1", event_time=NOW, user_id="u1", item_id="i1")
    with pytest.raises(ValidationError):
        click.user_id = "u2"  # type: ignore[misc]


# --- reason codes --------------------------------------------------------------


def test_oversize() -> None:
    raw = json.dumps(click_dict()).encode()
    assert reason_of(ClickEvent, raw, max_bytes=len(raw) - 1) == "oversize"
    assert decode(ClickEvent, raw, max_bytes=len(raw)).user_id == "u1"


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00", b'{"event_id": "\xe9t\xe9"}', b'{"a":"\xc3"}'])
def test_bad_utf8(raw: bytes) -> None:
    assert reason_of(ClickEvent, raw) == "bad_utf8"


@pytest.mark.parametrize("raw", [b"", b"{", b"{not json}", b'{"event_id": "e1",}', b"NaN NaN"])
def test_bad_json(raw: bytes) -> None:
    assert reason_of(ClickEvent, raw) == "bad_json"


@pytest.mark.parametrize("raw", [b"[]", b"[1, 2]", b'"text"', b"42", b"null", b"true"])
def test_not_object(raw: bytes) -> None:
    assert reason_of(ClickEvent, raw) == "not_object"


@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5])
def test_unknown_schema_version(version: object) -> None:
    raw = json.dumps(click_dict(schema_version=version)).encode()
    assert reason_of(ClickEvent, raw) == "unknown_schema_version"


def test_no_value_counts_as_missing() -> None:
    assert reason_of(ClickEvent, None) == "missing_field"


@pytest.mark.parametrize("field", ["event_id", "event_time", "user_id", "item_id"])
def test_missing_field(field: str) -> None:
    raw = json.dumps(click_dict(**{field: _DROP})).encode()
    with pytest.raises(DecodeError) as caught:
        decode(ClickEvent, raw, max_bytes=MAX_BYTES)
    assert caught.value.reason == "missing_field"
    assert field in caught.value.detail


@pytest.mark.parametrize(
    "changes",
    [
        {"user_id": 5},
        {"item_id": ["i1"]},
        {"event_time": "yesterday"},
        {"position": "3"},
        {"position": 1.5},
        {"query_id": {"id": "q"}},
    ],
)
def test_wrong_type(changes: dict[str, Any]) -> None:
    assert reason_of(ClickEvent, json.dumps(click_dict(**changes)).encode()) == "wrong_type"


@pytest.mark.parametrize(
    "changes",
    [
        {"action": "like"},
        {"event_time": -1.0},
        {"event_time": 0},
        {"event_time": 5_000_000_000.0},
        {"position": -1},
        {"user_id": ""},
        {"item_id": "x" * 129},
    ],
)
def test_invalid_value(changes: dict[str, Any]) -> None:
    assert reason_of(ClickEvent, json.dumps(click_dict(**changes)).encode()) == "invalid_value"


def test_unknown_field() -> None:
    raw = json.dumps(click_dict(rating=5)).encode()
    with pytest.raises(DecodeError) as caught:
        decode(ClickEvent, raw, max_bytes=MAX_BYTES)
    assert caught.value.reason == "unknown_field"
    assert "rating" in caught.value.detail


def test_unknown_field_in_a_nested_object() -> None:
    raw = json.dumps({"request_id": "r", "user_id": "u", "filters": {"colour": "red"}}).encode()
    assert reason_of(RecRequest, raw) == "unknown_field"


@pytest.mark.parametrize(
    "bad_id", ["has space", "semi;colon", "quote'", "new\nline", "emoji\U0001f600", "back\\slash", "a,b"]
)
def test_ids_with_bad_characters_are_rejected(bad_id: str) -> None:
    for field in ("event_id", "user_id", "item_id"):
        raw = json.dumps(click_dict(**{field: bad_id})).encode()
        assert reason_of(ClickEvent, raw) == "invalid_value"


@pytest.mark.parametrize("good_id", ["a", "user_1", "sku:42", "a.b-c", "mail@host", "path/to+x", "Z" * 128])
def test_ids_from_the_allowed_alphabet_are_accepted(good_id: str) -> None:
    raw = json.dumps(click_dict(user_id=good_id, item_id=good_id)).encode()
    assert decode(ClickEvent, raw, max_bytes=MAX_BYTES).item_id == good_id


def test_decode_error_is_a_streamrec_error() -> None:
    with pytest.raises(StreamrecError):
        decode(ClickEvent, b"{", max_bytes=MAX_BYTES)


# --- images --------------------------------------------------------------------


def test_image_ref_needs_exactly_one_source() -> None:
    with pytest.raises(ValidationError):
        ImageRef()
    with pytest.raises(ValidationError):
        ImageRef(image_b64=PNG_B64, image_uri="a.jpg")
    assert ImageRef(image_b64=PNG_B64).image_uri is None
    assert ImageRef(image_uri="a.jpg").image_b64 is None


def test_image_ref_without_a_source_is_an_invalid_value_on_the_wire() -> None:
    base = {"event_id": "e", "event_time": NOW, "purpose": "catalog_photo", "item_id": "i"}
    for image in ({}, {"image_b64": PNG_B64, "image_uri": "a.jpg"}):
        raw = json.dumps(base | {"image": image}).encode()
        assert reason_of(ImageEvent, raw) == "invalid_value"


def test_inline_bytes() -> None:
    assert ImageRef(image_b64=base64.b64encode(b"abc").decode()).inline_bytes() == b"abc"
    assert ImageRef(image_uri="a.jpg").inline_bytes() is None
    with pytest.raises(DecodeError) as caught:
        ImageRef(image_b64="!!!not base64!!!").inline_bytes()
    assert caught.value.reason == "bad_image"


def test_image_event_purpose_rules() -> None:
    image = {"image_uri": "a.jpg"}
    base = {"event_id": "e", "event_time": NOW, "image": image}
    photo_without_item = base | {"purpose": "catalog_photo", "user_id": "u"}
    search_without_user = base | {"purpose": "visual_search", "item_id": "i"}
    for payload in (photo_without_item, search_without_user):
        assert reason_of(ImageEvent, json.dumps(payload).encode()) == "invalid_value"
    assert reason_of(ImageEvent, json.dumps(base | {"purpose": "avatar", "user_id": "u"}).encode()) == (
        "invalid_value"
    )
    photo = decode(ImageEvent, json.dumps(base | {"purpose": "catalog_photo", "item_id": "i"}).encode(),
                   max_bytes=MAX_BYTES)
    search = decode(ImageEvent, json.dumps(base | {"purpose": "visual_search", "user_id": "u"}).encode(),
                    max_bytes=MAX_BYTES)
    assert photo.item_id == "i" and search.user_id == "u"


# --- dead letters ----------------------------------------------------------------


def test_dead_letter_keeps_raw_bytes_and_reason() -> None:
    raw = b"\x00\xff{broken json"
    with pytest.raises(DecodeError) as caught:
        decode(ClickEvent, raw, max_bytes=MAX_BYTES)
    letter = DeadLetter.of(raw, caught.value, topic="events.clicks", partition=2, offset=17, key=b"u1")
    assert letter.raw() == raw
    assert letter.reason == caught.value.reason == "bad_utf8"
    assert (letter.source_topic, letter.partition, letter.offset) == ("events.clicks", 2, 17)
    assert base64.b64decode(letter.key_b64 or "") == b"u1"
    again = DeadLetter.model_validate_json(letter.to_bytes())
    assert again == letter and again.raw() == raw


def test_dead_letter_of_a_missing_value_and_a_long_detail() -> None:
    error = DecodeError("processing_error", "x" * 5000)
    letter = DeadLetter.of(None, error, topic="catalog.items")
    assert letter.raw() == b""
    assert letter.key_b64 is None and letter.partition is None
    assert len(letter.detail) == 2000


# --- properties --------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)


def assert_decodes_or_reports(schema: type[BaseModel], raw: bytes) -> None:
    try:
        record = decode(schema, raw, max_bytes=MAX_BYTES)
    except DecodeError as exc:
        assert exc.reason in REASONS, exc
        return
    assert isinstance(record, schema)
    # Whatever decodes also survives its own serialisation.
    raw_again = record.to_bytes()  # type: ignore[attr-defined]
    assert isinstance(decode(schema, raw_again, max_bytes=MAX_BYTES), schema)


PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(schema=st.sampled_from(DECODED_SCHEMAS), raw=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(schema: type[BaseModel], raw: bytes) -> None:
    assert_decodes_or_reports(schema, raw)


@PROPERTY_SETTINGS
@given(schema=st.sampled_from(DECODED_SCHEMAS), value=json_values)
def test_arbitrary_json_never_crashes_the_decoder(schema: type[BaseModel], value: object) -> None:
    assert_decodes_or_reports(schema, json.dumps(value).encode())


@PROPERTY_SETTINGS
@given(
    event=st.sampled_from([e for e in VALID_EVENTS if type(e) in DECODED_SCHEMAS]),
    data=st.data(),
)
def test_mutated_valid_events_never_crash_the_decoder(event: BaseModel, data: st.DataObject) -> None:
    document = json.loads(event.to_bytes())  # type: ignore[attr-defined]
    field = data.draw(st.sampled_from(sorted(document)), label="field")
    mutation = data.draw(st.sampled_from(["drop", "replace", "nest"]), label="mutation")
    if mutation == "drop":
        del document[field]
    elif mutation == "replace":
        document[field] = data.draw(json_values, label="value")
    else:
        new_key = data.draw(st.text(min_size=1, max_size=12), label="key")
        document[new_key] = data.draw(json_values, label="value")
    assert_decodes_or_reports(type(event), json.dumps(document).encode())


@PROPERTY_SETTINGS
@given(event=st.sampled_from(VALID_EVENTS), cut=st.integers(min_value=0, max_value=400))
def test_truncated_events_are_reported(event: BaseModel, cut: int) -> None:
    raw = event.to_bytes()  # type: ignore[attr-defined]
    if cut >= len(raw):
        return
    assert reason_of(type(event), raw[:cut]) in ("bad_json", "bad_utf8", "not_object")
