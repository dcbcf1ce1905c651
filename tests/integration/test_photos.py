"""Catalogue photos and visual search with real product photos."""
from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path

import pytest

from core.events import CatalogItem, ImageEvent, ImageRef
from core.settings import Settings
from tests.integration.helpers import (
    ask_http,
    processed,
    publish,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.integration
CLASSES = ("shoes", "hat", "pants", "dress")


@pytest.fixture
def photos(shared_data: Path) -> dict[str, list[Path]]:
    root = shared_data / "clothing" / "validation"
    return {c: sorted((root / c).glob("*.jpg"))[:4] for c in CLASSES}


@pytest.fixture
def settings(settings: Settings, shared_data: Path) -> Settings:
    return settings.model_copy(update={"image_root": shared_data / "clothing"})


def test_photos_update_items_and_visual_search_finds_the_class(settings, stack, photos, shared_data) -> None:
    root = shared_data / "clothing"
    now = time.time()
    # Items first (text only), then their photos arrive on events.images by URI.
    items = [
        CatalogItem(event_id=f"c-{c}-{n}", event_time=now, item_id=f"{c}-{n}", title=f"Item {n}", category=c)
        for c, paths in photos.items() for n in range(len(paths) - 1)
    ]
    publish(settings, items)
    wait_until(lambda: processed(stack, "catalog") >= len(items), 60, "catalogue applied")
    photo_events = [
        ImageEvent(event_id=f"p-{c}-{n}", event_time=now, purpose="catalog_photo", item_id=f"{c}-{n}",
                   image=ImageRef(image_uri=f"file://{path}"))
        for c, paths in photos.items() for n, path in enumerate(paths[:-1])
    ]
    publish(settings, photo_events)
    wait_until(lambda: processed(stack, "images") >= len(photo_events), 120, "photos applied")

    # Visual search over HTTP with a held-out photo of each class (inline bytes).
    agreement = 0
    for c, paths in photos.items():
        query = base64.b64encode(paths[-1].read_bytes()).decode()
        response = ask_http(settings, f"shopper-{c}", k=3, image={"image_b64": query})
        assert response.items[0].reason == "looks like your photo"
        agreement += response.items[0].item_id.startswith(c)
    assert agreement >= 3, f"top hit of the right class for only {agreement} of {len(CLASSES)} classes"

    # The same over Kafka: a visual-search event is answered on rec.responses.
    relative = photos["shoes"][-1].relative_to(root)
    search = ImageEvent(event_id=uuid.uuid4().hex, event_time=time.time(), purpose="visual_search",
                        user_id="shopper-k", image=ImageRef(image_uri=str(relative)), k=3)
    publish(settings, [search])
    answers = [json.loads(v) for v in read_topic(settings, settings.topic("responses"), 1, 60)]
    answer = next(a for a in answers if a["request_id"] == search.event_id)
    assert len(answer["items"]) == 3
