"""The malformed-event generator: every case it makes is rejected, for a reason it names.

The check runs offline what a worker runs per message: ``decode`` with the
topic's schema, then, for well-formed events that carry an image, the image
checks (URI policy, size, decoding with the pixel cap).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzzcases import (
    IMAGE_TOPICS,
    MUTATIONS,
    SCHEMAS,
    FuzzCase,
    FuzzLimits,
    generate_cases,
    kinds_for,
)
from core.errors import DecodeError
from core.events import REASONS, decode
from model.serving.content import decode_image
from stream.images import read_image_bytes

MAX_IMAGE_BYTES = 8_388_608


def rejection(case: FuzzCase, limits: FuzzLimits) -> str | None:
    """The reason a worker would dead-letter ``case`` with, or None if it would apply it."""
    try:
        event = decode(case.schema, case.value, max_bytes=limits.max_event_bytes)
    except DecodeError as error:
        return error.reason
    image = getattr(event, "image", None)
    if image is None or case.topic_key not in IMAGE_TOPICS:
        return None
    try:
        data = read_image_bytes(image, image_root=limits.image_root, allow_http=False, max_bytes=MAX_IMAGE_BYTES)
        decode_image(data, limits.max_image_pixels)
    except DecodeError as error:
        return error.reason
    return None


@pytest.fixture(scope="module")
def limits(tmp_path_factory: pytest.TempPathFactory) -> FuzzLimits:
    """An image root with a real photo and a symlink that escapes it."""
    base = tmp_path_factory.mktemp("images")
    root = base / "root"
    root.mkdir()
    outside = base / "secret.jpg"
    outside.write_bytes(b"not for the worker")
    os.symlink(outside, root / "escape.jpg")
    # Small caps keep examples fast; the full 10 MB case has its own test.
    return FuzzLimits(max_event_bytes=4096, max_image_pixels=250_000, oversize_bytes=20_000,
                      image_root=root, escape_link="escape.jpg")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 60))
def test_every_generated_case_is_rejected_with_an_expected_reason(limits: FuzzLimits, seed: int, count: int) -> None:
    for case in generate_cases(count, seed=seed, limits=limits):
        reason = rejection(case, limits)
        assert reason is not None, f"{case.kind} on {case.topic_key} was accepted: {case.value!r:.300}"
        assert reason in case.reasons, f"{case.kind} on {case.topic_key}: got {reason}, expected {set(case.reasons)}"
        assert case.reasons <= set(REASONS)


def test_each_kind_reaches_each_topic_it_applies_to(limits: FuzzLimits) -> None:
    seen = Counter((case.kind, case.topic_key) for case in generate_cases(3000, seed=7, limits=limits))
    for topic in SCHEMAS:
        for kind in kinds_for(topic):
            assert seen[(kind, topic)] > 0, f"{kind} never generated for {topic}"
    # Image mutations stay on the topics whose images the worker reads.
    assert {topic for (kind, topic) in seen if kind.startswith("image")} == set(IMAGE_TOPICS)


def test_kinds_come_round_evenly_from_the_start() -> None:
    first = [case.kind for case in generate_cases(len(MUTATIONS), seed=3)]
    assert sorted(first) == sorted(MUTATIONS)


def test_the_same_seed_gives_the_same_cases(limits: FuzzLimits) -> None:
    assert list(generate_cases(80, seed=11, limits=limits)) == list(generate_cases(80, seed=11, limits=limits))
    assert list(generate_cases(80, seed=11, limits=limits)) != list(generate_cases(80, seed=12, limits=limits))


def test_kinds_can_be_chosen_and_the_stream_can_be_endless(limits: FuzzLimits) -> None:
    endless = generate_cases(None, seed=1, limits=limits, kinds={"tombstone", "bad_json"})
    kinds = {next(endless).kind for _ in range(500)}
    assert kinds == {"tombstone", "bad_json"}
    with pytest.raises(ValueError):
        next(generate_cases(1, kinds={"no_such_kind"}))


def test_full_size_oversize_payload_is_ten_megabytes_and_rejected_as_oversize() -> None:
    limits = FuzzLimits()
    sizes = {len(case.value or b"") for case in generate_cases(400, seed=5, limits=limits) if case.kind == "oversize"}
    assert max(sizes) == 10 * 1024 * 1024
    assert min(sizes) == limits.max_event_bytes + 1
    big = next(c for c in generate_cases(400, seed=5, limits=limits)
               if c.kind == "oversize" and len(c.value or b"") == max(sizes))
    assert rejection(big, limits) == "oversize"


def test_tombstones_are_null_values_rejected_as_missing(limits: FuzzLimits) -> None:
    tombstones = [c for c in generate_cases(200, seed=1, limits=limits) if c.kind == "tombstone"]
    assert tombstones and all(c.value is None for c in tombstones)
    assert {rejection(c, limits) for c in tombstones} == {"missing_field"}


def test_decompression_bombs_are_small_on_the_wire_and_refused_before_decoding() -> None:
    limits = FuzzLimits()  # the worker's default 40-megapixel cap
    bombs = [c for c in generate_cases(400, seed=2, limits=limits) if c.kind == "image_bomb"]
    assert bombs
    for bomb in bombs:
        assert len(bomb.value or b"") < 200_000  # about 40 MB of pixels once decoded
        assert rejection(bomb, limits) == "image_too_large"


def test_uri_cases_include_traversal_symlink_escape_and_remote_schemes(limits: FuzzLimits) -> None:
    values = b"".join(c.value or b"" for c in generate_cases(2000, seed=9, limits=limits) if c.kind == "image_uri")
    for needle in (b"../", b"escape.jpg", b"http://", b"https://", b"file:///etc/passwd", b"%2e%2e"):
        assert needle in values, needle


def test_cases_without_an_image_root_are_still_rejected() -> None:
    limits = FuzzLimits(max_event_bytes=4096, oversize_bytes=8192, max_image_pixels=250_000)
    for case in generate_cases(300, seed=4, limits=limits):
        assert rejection(case, limits) in case.reasons


def test_root_of_the_image_cases_is_taken_from_the_limits(tmp_path: Path) -> None:
    limits = FuzzLimits(max_event_bytes=4096, oversize_bytes=8192, image_root=tmp_path, escape_link="out.jpg")
    uris = b"".join(c.value or b"" for c in generate_cases(2000, seed=1, limits=limits) if c.kind == "image_uri")
    assert str(tmp_path).encode() in uris
