"""The streaming slice end to end: catalogue -> clicks -> requests, over the real broker and store."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest

from bench import movielens
from bench.stack import LocalStack
from core.events import CatalogItem, ClickEvent, SearchEvent
from core.settings import Settings
from tests.integration.helpers import (
    ask_http,
    ask_kafka,
    processed,
    publish,
    read_topic,
    user_state,
    wait_until,
)

pytestmark = pytest.mark.integration
CATALOGUE = movielens.catalog_events()[:400]
GENRES = {item.item_id: set(item.attributes["genres"].split()) for item in CATALOGUE}


def _publish_catalogue(settings: Settings, stack: LocalStack, items: list[CatalogItem] = CATALOGUE) -> None:
    before = processed(stack, "catalog")
    publish(settings, items)
    wait_until(lambda: processed(stack, "catalog") >= before + len(items), 120, "catalogue applied")


def _clicks(user: str, items: list[str], action: str = "purchase") -> list[ClickEvent]:
    return [
        ClickEvent(event_id=uuid.uuid4().hex, event_time=time.time(), user_id=user, item_id=i, action=action)
        for i in items
    ]


def _genre_share(item_ids: list[str], genre: str) -> float:
    return sum(genre in GENRES.get(i, ()) for i in item_ids) / max(1, len(item_ids))


def test_clicks_change_the_next_recommendations(settings: Settings, stack: LocalStack) -> None:
    _publish_catalogue(settings, stack)
    horror = [i for i, g in GENRES.items() if "Horror" in g][:6]
    children = [i for i, g in GENRES.items() if "Children's" in g][:6]

    publish(settings, _clicks("alice", horror))
    wait_until(lambda: len(user_state(settings, "alice").get("items", [])) == len(horror), 120, "clicks applied")
    first = ask_kafka(settings, "alice", k=10)
    first_ids = [i.item_id for i in first.items]
    assert len(first_ids) == 10
    assert not set(first_ids) & set(horror), "already-seen items must not be recommended"
    assert first.model_version
    assert all(i.reason for i in first.items)

    publish(settings, _clicks("alice", children))
    wait_until(lambda: len(user_state(settings, "alice").get("items", [])) == 12, 120, "second burst applied")
    second_ids = [i.item_id for i in ask_kafka(settings, "alice", k=10).items]
    # The most recent burst dominates the user vector: the list moves toward it.
    assert _genre_share(second_ids, "Children's") > _genre_share(first_ids, "Children's")
    assert second_ids != first_ids


def test_new_item_is_recommendable_at_once(settings: Settings, stack: LocalStack) -> None:
    _publish_catalogue(settings, stack)
    new_item = CatalogItem(
        event_id=uuid.uuid4().hex, event_time=time.time(), item_id="fresh-1",
        title="Glow-in-the-dark astronaut helmet for kids", category="Toys",
    )
    _publish_catalogue(settings, stack, [new_item])
    response = ask_kafka(settings, "bob", k=5, query="astronaut helmet")
    assert response.items[0].item_id == "fresh-1"
    assert "astronaut helmet" in response.items[0].reason
    # Without a query too: the only item of its category comes back through the vector index.
    plain = ask_http(settings, "bob", k=5, filters={"categories": ["Toys"]})
    assert [i.item_id for i in plain.items] == ["fresh-1"]


def test_http_and_kafka_rank_alike(settings: Settings, stack: LocalStack) -> None:
    _publish_catalogue(settings, stack)
    publish(settings, _clicks("carol", [i.item_id for i in CATALOGUE[10:16]]))
    wait_until(lambda: len(user_state(settings, "carol").get("items", [])) == 6, 120, "clicks applied")
    for fields in ({"k": 10}, {"k": 7, "query": "space adventure"}, {"k": 5, "filters": {"categories": ["Comedy"]}}):
        over_kafka = ask_kafka(settings, "carol", **fields)
        over_http = ask_http(settings, "carol", **fields)
        assert [i.item_id for i in over_kafka.items] == [i.item_id for i in over_http.items]
        assert [i.score for i in over_kafka.items] == pytest.approx([i.score for i in over_http.items])


def test_filters_and_excludes_are_respected(settings: Settings, stack: LocalStack) -> None:
    _publish_catalogue(settings, stack)
    comedy = ask_http(settings, "dave", k=10, filters={"categories": ["Comedy"]})
    assert comedy.items and all(
        next(c for c in CATALOGUE if c.item_id == i.item_id).category == "Comedy" for i in comedy.items
    )
    plain = ask_http(settings, "dave", k=5, query="love story")
    excluded = [i.item_id for i in plain.items[:2]]
    again = ask_http(settings, "dave", k=5, query="love story", filters={"exclude_ids": excluded})
    assert not set(excluded) & {i.item_id for i in again.items}


def test_search_event_records_intent_and_answers(settings: Settings, stack: LocalStack) -> None:
    _publish_catalogue(settings, stack)
    search = SearchEvent(event_id=uuid.uuid4().hex, event_time=time.time(), user_id="erin",
                         query="toy story animation", k=5)
    publish(settings, [search])
    wait_until(lambda: len(user_state(settings, "erin").get("items", [])) == 1, 120, "search applied")
    responses = [json.loads(v) for v in read_topic(settings, settings.topic("responses"), 1, 120)]
    answer = next(r for r in responses if r["request_id"] == search.event_id)
    assert answer["items"][0]["title"].startswith("Toy Story")
    # The search is now part of the user's intent: a plain request leans the same way.
    personal = ask_http(settings, "erin", k=10)
    cold = ask_http(settings, "nobody-yet", k=10)
    # 12 of the 400 films are animated: a list without the search's pull holds about 0.3 of one
    # (measured: 8 of erin's 10, none of the cold user's).
    assert _genre_share([i.item_id for i in personal.items], "Animation") >= 0.5
    assert _genre_share([i.item_id for i in personal.items], "Animation") > _genre_share(
        [i.item_id for i in cold.items], "Animation")


def test_replayed_events_apply_once(settings: Settings, stack: LocalStack) -> None:
    _publish_catalogue(settings, stack)
    clicks = _clicks("frank", [i.item_id for i in CATALOGUE[20:25]])
    publish(settings, clicks)
    publish(settings, clicks[:3])  # the producer retries: same event ids again
    wait_until(lambda: processed(stack, "clicks") >= 8, 120, "all deliveries consumed")
    wait_until(lambda: len(user_state(settings, "frank").get("items", [])) >= 5, 120, "clicks applied")
    assert user_state(settings, "frank")["items"] == [c.item_id for c in clicks]
    assert stack.worker.metric("streamrec_events_duplicate_total", {"topic": "clicks"}) == 3


def _maps_torch(pid: int) -> bool:
    """Whether the process has torch's shared library mapped (``import torch`` maps it)."""
    with open(f"/proc/{pid}/maps") as maps:
        return any("/torch/lib/libtorch" in line for line in maps)


def test_a_serving_worker_never_loads_torch(settings: Settings, stack: LocalStack) -> None:
    _publish_catalogue(settings, stack, CATALOGUE[:20])
    response = ask_http(settings, "u-no-torch", k=5)
    assert len(response.items) == 5
    assert stack.worker.process is not None
    assert not _maps_torch(stack.worker.process.pid)
    # The same check sees torch in a process that imports it.
    control = subprocess.Popen([sys.executable, "-c", "import sys, torch; sys.stdout.write('ready\\n'); "
                                "sys.stdout.flush(); sys.stdin.read()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert control.stdout is not None and control.stdout.readline() == b"ready\n"
        assert _maps_torch(control.pid)
    finally:
        control.kill()
        control.wait()
