"""Malformed events for every input topic, each with the reasons that reject it.

``generate_cases(count, seed=...)`` yields ``FuzzCase``s: the raw value (or a
null tombstone) and key of one message for one topic, plus the dead-letter
reasons a worker may give for it. Every case must be rejected, either by
``core.events.decode`` or, for well-formed events that carry an image, by the
image checks (``stream.images`` and the image decoder). The fuzz benchmark
sends them between good events; the unit tests check the rejection offline.

Cases are built from a valid template per topic and one mutation, so each
breaks exactly one rule and the expected reason is known in advance.
"""
from __future__ import annotations

import base64
import io
import itertools
import json
import math
import random
import struct
import zlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel

from core.events import CatalogItem, ClickEvent, ImageEvent, RecRequest, SearchEvent

# The topics a worker decodes, by settings key.
SCHEMAS: dict[str, type[BaseModel]] = {
    "clicks": ClickEvent,
    "searches": SearchEvent,
    "images": ImageEvent,
    "catalog": CatalogItem,
    "requests": RecRequest,
}
# Only these topics' events carry images that the worker reads (a RecRequest's
# image is read by the HTTP path only).
IMAGE_TOPICS = ("images", "catalog")
TEMPLATE_TIME = 1_700_000_000.0

Fields = dict[str, object]


@dataclass(frozen=True)
class FuzzLimits:
    """What the worker under test enforces, so that each case lands beyond it."""

    max_event_bytes: int = 1_048_576
    max_image_pixels: int = 40_000_000
    # The biggest oversize payload sent (the broker must accept it).
    oversize_bytes: int = 10 * 1024 * 1024
    # The worker's image root, and a symlink inside it that points outside.
    image_root: Path | None = None
    escape_link: str | None = None


@dataclass(frozen=True)
class FuzzCase:
    kind: str
    topic_key: str  # a key of SCHEMAS, also a settings.topic() key
    value: bytes | None
    key: bytes | None
    reasons: frozenset[str]  # any of these is a correct rejection

    @property
    def schema(self) -> type[BaseModel]:
        return SCHEMAS[self.topic_key]


# -- templates: one valid event per topic -------------------------------------------


def _template(topic_key: str, n: int) -> Fields:
    common: Fields = {"event_id": f"fuzz-{n}", "event_time": TEMPLATE_TIME + n}
    if topic_key == "clicks":
        return {**common, "user_id": f"fuzz-user-{n % 7}", "item_id": f"m{1 + n % 50}",
                "action": "click", "position": 3}
    if topic_key == "searches":
        return {**common, "user_id": f"fuzz-user-{n % 7}", "query": "red running shoes", "k": 5}
    if topic_key == "images":
        subject: Fields = ({"purpose": "catalog_photo", "item_id": f"fuzz-item-{n % 5}"} if n % 2 == 0
                           else {"purpose": "visual_search", "user_id": f"fuzz-user-{n % 7}", "k": 3})
        return {**common, **subject, "image": {"image_b64": _tiny_png_b64()}}
    if topic_key == "catalog":
        return {**common, "item_id": f"fuzz-item-{n % 5}", "title": "A perfectly fine item",
                "category": "Toys", "price": 9.5, "attributes": {"colour": "red"}}
    if topic_key == "requests":
        return {"request_id": f"fuzz-req-{n}", "user_id": f"fuzz-user-{n % 7}", "k": 10}
    raise KeyError(topic_key)


def _key(topic_key: str, fields: Fields) -> bytes | None:
    subject = fields.get("item_id") or fields.get("user_id")
    return subject.encode() if isinstance(subject, str) else None


def _dumps(fields: object) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


# String, number and integer fields per topic: what a type mutation may target.
_STRING_FIELDS = {
    "clicks": ("event_id", "user_id", "item_id"),
    "searches": ("event_id", "user_id", "query"),
    "images": ("event_id", "item_id"),
    "catalog": ("event_id", "item_id", "title", "category"),
    "requests": ("request_id", "user_id"),
}
_INT_FIELDS = {"clicks": ("position",), "searches": ("k",), "images": ("k",), "requests": ("k",)}
_REQUIRED = {
    "clicks": ("event_id", "event_time", "user_id", "item_id"),
    "searches": ("event_id", "event_time", "user_id", "query"),
    "images": ("event_id", "event_time", "purpose", "image"),
    "catalog": ("event_id", "event_time", "item_id"),
    "requests": ("request_id", "user_id"),
}
_ID_FIELD = {"clicks": "user_id", "searches": "user_id", "images": "item_id",
             "catalog": "item_id", "requests": "user_id"}


# -- mutations: (template, rng, limits) -> (value, reasons) ----------------------------

Mutation = Callable[[str, Fields, random.Random, FuzzLimits], tuple[bytes | None, set[str]]]


def _bad_utf8(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    name = rng.choice(_STRING_FIELDS[topic])
    marker = "\u0001MARK\u0001"
    raw = _dumps({**fields, name: marker})
    # A stray continuation byte, an overlong slash, a UTF-16 surrogate, a bad lead byte.
    invalid = rng.choice([b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xc3\x28", b"\x80"])
    return raw.replace(b"\\u0001MARK\\u0001", b"x" + invalid + b"y"), {"bad_utf8"}


def _bad_json(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    raw = _dumps(fields)
    variant = rng.randrange(7)
    if variant == 0:
        return raw[: rng.randrange(1, len(raw) - 1)], {"bad_json"}  # truncated
    if variant == 1:
        return raw + b"}garbage", {"bad_json"}
    if variant == 2:
        return raw.replace(b'"', b"'"), {"bad_json"}
    if variant == 3:
        return raw.replace(b",", b"", 1), {"bad_json"}
    if variant == 4:
        # Nesting past the parser's recursion limit (a few hundred), within the size cap.
        depth = min(rng.choice([300, 5_000]), (limits.max_event_bytes - 8) // 2)
        if depth >= 300:
            return b'{"x":' + b"[" * depth + b"]" * depth + b"}", {"bad_json"}
        return raw[:-1], {"bad_json"}
    if variant == 5:
        return b"", {"bad_json"}  # an empty message
    return b" \n\t ", {"bad_json"}


def _not_object(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    return rng.choice([b"null", b"[]", _dumps([fields]), b"42", b"-1.5e3", b'"an event"', b"true"]), {"not_object"}


def _wrong_type(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    targets: list[tuple[str, list[object]]] = [
        (name, [42, True, [], {"nested": "object"}]) for name in _STRING_FIELDS[topic]
    ]
    targets += [(name, ["5", 1.5, True, [5]]) for name in _INT_FIELDS.get(topic, ())]
    if "event_time" in fields:
        targets.append(("event_time", ["1700000000", True, [], None]))
    if topic in ("images", "catalog"):
        targets.append(("image", ["a photo", 7, []]))
    if topic == "catalog":
        targets.append(("attributes", [["colour", "red"], {"colour": 3}]))
    if topic == "requests":
        targets.append(("filters", ["Comedy", [1]]))
    name, choices = rng.choice(targets)
    return _dumps({**fields, name: rng.choice(choices)}), {"wrong_type"}


def _missing_field(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    name = rng.choice(_REQUIRED[topic])
    return _dumps({k: v for k, v in fields.items() if k != name}), {"missing_field"}


def _negative_number(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    targets = [(name, [-1, -(2**63), 0 if name == "k" else -7]) for name in _INT_FIELDS.get(topic, ())]
    if "event_time" in fields:
        targets.append(("event_time", [-1.0, 0, -1e308]))
    if topic == "catalog":
        targets.append(("price", [-0.01, -1e12]))
    name, choices = rng.choice(targets)
    return _dumps({**fields, name: rng.choice(choices)}), {"invalid_value"}


def _huge_number(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    targets = [(name, [10**6, 2**63, 10**40]) for name in _INT_FIELDS.get(topic, ())]
    if "event_time" in fields:
        targets.append(("event_time", [1e300, 4_102_444_800.5, float("nan")]))
    if topic == "catalog":
        targets.append(("price", [1e9, 1e300]))
    name, choices = rng.choice(targets)
    # json.dumps writes NaN as a bare NaN, which the parser reads and the range check refuses.
    return _dumps({**fields, name: rng.choice(choices)}), {"invalid_value"}


def _invalid_id(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    bad = rng.choice(["", "a b", "bad id!", "x" * 129, "../../etc/passwd\n", "caf\u00e9", "nul\u0000byte",
                      "<script>", "'; DROP TABLE users;--"])
    name = rng.choice([_ID_FIELD[topic], "request_id" if topic == "requests" else "event_id"])
    return _dumps({**fields, name: bad}), {"invalid_value"}


def _bad_enum(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    if topic == "clicks":
        return _dumps({**fields, "action": rng.choice(["teleport", "CLICK", "", 3])}), {"invalid_value"}
    if topic == "images":
        return _dumps({**fields, "purpose": rng.choice(["selfie", "", 1])}), {"invalid_value"}
    if topic == "catalog":
        return _dumps({**fields, "op": rng.choice(["truncate", "DELETE", 0])}), {"invalid_value"}
    if topic == "searches":
        return _dumps({**fields, "query": rng.choice(["", "q" * 1001])}), {"invalid_value"}
    return _dumps({**fields, "k": 0}), {"invalid_value"}


def _unknown_schema_version(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    version = rng.choice([0, 2, 999, -1, "1", 1.5, None, [1]])
    return _dumps({**fields, "schema_version": version}), {"unknown_schema_version"}


def _unknown_field(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    if topic in ("images",) and rng.random() < 0.3:
        return _dumps({**fields, "image": {**fields["image"], "exif": {"gps": [1, 2]}}}), {"unknown_field"}  # type: ignore[dict-item]
    name = rng.choice(["__proto__", "admin", "user", "schemaVersion", "extra_field", "payload"])
    return _dumps({**fields, name: rng.choice([True, "x", {"$where": "1"}, [1, 2]])}), {"unknown_field"}


def _oversize(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    # Mostly just over the limit; now and then the full oversize payload.
    size = rng.choice([limits.max_event_bytes + 1, limits.max_event_bytes + 4096, limits.oversize_bytes])
    head = _dumps({**fields, "padding": ""})[:-2]  # ... "padding":"
    filler = size - len(head) - 2
    return head + b"p" * max(filler, 0) + b'"}', {"oversize"}


def _tombstone(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    return None, {"missing_field"}


# -- image mutations (images and catalog topics only) --------------------------------


def _image_inline(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    variant = rng.randrange(4)
    if variant == 0:
        photo = _small_jpeg()
        data, reasons = photo[: rng.randrange(20, len(photo) // 2)], {"bad_image"}  # truncated
    elif variant == 1:
        data, reasons = rng.randbytes(rng.randrange(16, 2048)), {"bad_image"}  # garbage
    elif variant == 2:
        return _dumps({**fields, "image": {"image_b64": "not*base64*at*all"}}), {"bad_image"}
    else:
        data, reasons = _png_header_bomb(limits.max_image_pixels), {"image_too_large"}
    return _dumps({**fields, "image": {"image_b64": base64.b64encode(data).decode()}}), reasons


def _image_bomb(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    """A real, decodable PNG of zeros: tiny on the wire, over the pixel cap when decoded."""
    data = _zero_png(limits.max_image_pixels)
    return _dumps({**fields, "image": {"image_b64": base64.b64encode(data).decode()}}), {"image_too_large"}


def _image_uri(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    root = str(limits.image_root) if limits.image_root else "/srv/images"
    uris = [
        "file:///etc/passwd", "/etc/hostname", "file://evil.example/share/x.jpg",
        "../../../../../etc/passwd", "photos/../../../../etc/passwd", "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"file://{root}/../../../etc/passwd", f"{root}/../outside.jpg",
        "http://127.0.0.1:9/photo.jpg", "https://images.example/x.png", "ftp://127.0.0.1/x.jpg",
        "data:image/png;base64,iVBORw0KGgo=", "javascript:alert(1)", "gopher://127.0.0.1:70/x",
    ]
    if limits.escape_link:
        uris += [limits.escape_link, f"file://{root}/{limits.escape_link}"]
    return _dumps({**fields, "image": {"image_uri": rng.choice(uris)}}), {"image_uri_forbidden"}


def _image_structure(topic: str, fields: Fields, rng: random.Random, limits: FuzzLimits) -> tuple[bytes | None, set[str]]:
    variant = rng.randrange(3)
    if variant == 0:
        image = {"image_b64": _tiny_png_b64(), "image_uri": "a.jpg"}  # both sources
    elif variant == 1:
        image = {}  # neither
    elif topic == "images":
        # A catalogue photo of no item, or a visual search by nobody.
        subject = "item_id" if fields["purpose"] == "catalog_photo" else "user_id"
        return _dumps({k: v for k, v in fields.items() if k != subject}), {"invalid_value"}
    else:
        image = {"image_uri": ""}
    return _dumps({**fields, "image": image}), {"invalid_value"}


# kind -> (mutation, topics it applies to)
ALL_TOPICS = tuple(SCHEMAS)
MUTATIONS: dict[str, tuple[Mutation, tuple[str, ...]]] = {
    "bad_utf8": (_bad_utf8, ALL_TOPICS),
    "bad_json": (_bad_json, ALL_TOPICS),
    "not_object": (_not_object, ALL_TOPICS),
    "wrong_type": (_wrong_type, ALL_TOPICS),
    "missing_field": (_missing_field, ALL_TOPICS),
    "negative_number": (_negative_number, ALL_TOPICS),
    "huge_number": (_huge_number, ALL_TOPICS),
    "invalid_id": (_invalid_id, ALL_TOPICS),
    "bad_enum": (_bad_enum, ALL_TOPICS),
    "unknown_schema_version": (_unknown_schema_version, ALL_TOPICS),
    "unknown_field": (_unknown_field, ALL_TOPICS),
    "oversize": (_oversize, ALL_TOPICS),
    "tombstone": (_tombstone, ALL_TOPICS),
    "image_inline": (_image_inline, IMAGE_TOPICS),
    "image_bomb": (_image_bomb, IMAGE_TOPICS),
    "image_uri": (_image_uri, IMAGE_TOPICS),
    "image_structure": (_image_structure, IMAGE_TOPICS),
}


def kinds_for(topic_key: str) -> list[str]:
    return [kind for kind, (_, topics) in MUTATIONS.items() if topic_key in topics]


def generate_cases(count: int | None, *, seed: int = 0, limits: FuzzLimits | None = None,
                   topics: tuple[str, ...] = ALL_TOPICS, kinds: Collection[str] | None = None) -> Iterator[FuzzCase]:
    """``count`` cases (None: without end), cycling through the kinds so each appears early and evenly."""
    limits = limits or FuzzLimits()
    rng = random.Random(seed)
    chosen = [k for k in MUTATIONS if (kinds is None or k in kinds) and any(k in kinds_for(t) for t in topics)]
    if not chosen:
        raise ValueError(f"no mutation applies to topics {topics} with kinds {kinds}")
    for n in itertools.count() if count is None else range(count):
        kind = chosen[n % len(chosen)]
        topic = rng.choice([t for t in topics if kind in kinds_for(t)])
        fields = _template(topic, n)
        mutation, _ = MUTATIONS[kind]
        value, reasons = mutation(topic, fields, rng, limits)
        # Some messages come without a key; a tombstone is a key with a null value.
        key = _key(topic, fields) if rng.random() < 0.8 or value is None else None
        yield FuzzCase(kind, topic, value, key, frozenset(reasons))


# -- image bytes ---------------------------------------------------------------------


@lru_cache(maxsize=1)
def _tiny_png_b64() -> str:
    return base64.b64encode(_png(2, 2, zlib.compress(b"\x00\x00\x00" * 2))).decode()


@lru_cache(maxsize=1)
def _small_jpeg() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 40, 40)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(width: int, height: int, idat: bytes, *, colour_type: int = 0) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@lru_cache(maxsize=4)
def _png_header_bomb(max_pixels: int) -> bytes:
    """A header announcing far more pixels than allowed, with almost no data behind it."""
    side = min(2**31 - 1, math.isqrt(max_pixels) * 64)
    return _png(side, side, zlib.compress(b"\x00" * 64))


@lru_cache(maxsize=4)
def _zero_png(max_pixels: int) -> bytes:
    """A complete greyscale PNG just over the pixel cap; zeros compress about 1000:1."""
    side = math.isqrt(max_pixels) + 16
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + one byte per pixel
    parts = [compressor.compress(row) for _ in range(side)]
    parts.append(compressor.flush())
    return _png(side, side, b"".join(parts))
