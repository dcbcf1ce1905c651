"""Every kind of bad input lands in the dead-letter topic with its reason; good events keep flowing."""
from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from bench.stack import LocalStack
from core.events import CatalogItem, ClickEvent, ImageEvent, ImageRef
from core.settings import Settings
from tests.integration.helpers import (
    ask_http,
    dead_letters,
    processed,
    publish_raw,
    wait_until,
)

pytestmark = pytest.mark.integration


def _good_click(n: int) -> ClickEvent:
    return ClickEvent(event_id=f"good-{n}-{uuid.uuid4().hex[:6]}", event_time=time.time(),
                      user_id=f"user{n % 3}", item_id=f"item{n % 5}")


def _png_bomb() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (30_000, 30_000)).save(buffer, format="PNG")
    return buffer.getvalue()


def _photo() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_bad_inputs_are_dead_lettered_with_reasons(settings: Settings, stack: LocalStack, tmp_path: Path) -> None:
    t = settings.topic
    now = time.time()
    click = json.loads(_good_click(0).to_bytes())
    bad: list[tuple[str, bytes, str]] = [
        (t("clicks"), b"\xff\xfe\xfa not utf-8", "bad_utf8"),
        (t("clicks"), b'{"event_id": "x", ', "bad_json"),
        (t("clicks"), b"[1, 2, 3]", "not_object"),
        (t("clicks"), json.dumps({**click, "schema_version": 7}).encode(), "unknown_schema_version"),
        (t("clicks"), json.dumps({k: v for k, v in click.items() if k != "item_id"}).encode(), "missing_field"),
        (t("clicks"), json.dumps({**click, "user_id": 42}).encode(), "wrong_type"),
        (t("clicks"), json.dumps({**click, "action": "teleport"}).encode(), "invalid_value"),
        (t("clicks"), b'{"pad": "' + b"x" * (settings.max_event_bytes + 10) + b'"}', "oversize"),
        (t("searches"), json.dumps({"event_id": "s1", "event_time": now, "user_id": "u", "query": ""}).encode(),
         "invalid_value"),
        (t("catalog"), json.dumps({"event_id": "c1", "event_time": now, "item_id": "bad id!"}).encode(),
         "invalid_value"),
        (t("requests"), json.dumps({"request_id": "r1", "user_id": "u", "k": 0}).encode(), "invalid_value"),
        (t("catalog"), CatalogItem(event_id="c2", event_time=now, item_id="broken-photo", title="x",
                                   image=ImageRef(image_b64=base64.b64encode(b"not an image").decode())).to_bytes(),
         "bad_image"),
        (t("images"), ImageEvent(event_id="i1", event_time=now, purpose="catalog_photo", item_id="i1",
                                 image=ImageRef(image_b64=base64.b64encode(_photo()[:200]).decode())).to_bytes(),
         "bad_image"),
        (t("images"), ImageEvent(event_id="i2", event_time=now, purpose="catalog_photo", item_id="i2",
                                 image=ImageRef(image_b64=base64.b64encode(_png_bomb()).decode())).to_bytes(),
         "image_too_large"),
        (t("images"), ImageEvent(event_id="i3", event_time=now, purpose="visual_search", user_id="u",
                                 image=ImageRef(image_uri="file:///etc/passwd")).to_bytes(),
         "image_uri_forbidden"),
    ]
    good = [_good_click(n) for n in range(len(bad) + 5)]
    catalogue = [CatalogItem(event_id=f"cat-{n}", event_time=now, item_id=f"item{n}", title=f"Item number {n}")
                 for n in range(5)]
    messages: list[tuple[str, bytes | None, bytes | None]] = [
        (t("catalog"), c.item_id.encode(), c.to_bytes()) for c in catalogue
    ]
    # Interleave: each bad message sits between good ones.
    for n, click_event in enumerate(good):
        messages.append((t("clicks"), click_event.user_id.encode(), click_event.to_bytes()))
        if n < len(bad):
            topic, raw, _ = bad[n]
            messages.append((topic, b"k", raw))
    publish_raw(settings, messages)

    letters = dead_letters(settings, len(bad), timeout_s=60)
    assert Counter(letter.reason for letter in letters) == Counter(reason for _, _, reason in bad)
    by_raw = {letter.raw(): letter for letter in letters}
    for topic, raw, reason in bad:
        letter = by_raw[raw[:262_144]]
        assert letter.raw_size == len(raw) and letter.raw_truncated == (len(raw) > 262_144)
        assert letter.reason == reason and letter.source_topic == topic and letter.detail
    # The good events behind the bad ones were all applied.
    wait_until(lambda: processed(stack, "clicks") >= len(good), 120, "good clicks applied")
    assert stack.worker.metric("streamrec_deadletter_total") == len(bad)
    assert ask_http(settings, "newcomer", k=3).items  # still serving
