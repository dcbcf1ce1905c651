"""A click batch is seen whole or not at all, and a retried batch teaches the signals once.

Real services as in test_services_inprocess (exported towers, rule scorer,
qdrant-edge store); the store is wrapped only to pause or fail a write at the
moment under test.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord

from core.errors import StoreUnavailableError
from core.events import ClickEvent
from stream.agents.base import DeadLetters, RecordEvent, process_batch
from stream.kafka import Delivery
from stream.signals import ACTION_WEIGHT_FOR_TRENDING
from stream.users import apply_interactions
from tests.unit.world import World, ids


class StoreWrapper:
    """The real store, with a hook run before each upsert into ``collection``."""

    def __init__(self, store: Any, collection: str, before_upsert: Callable[[list[Any]], None]) -> None:
        self._store = store
        self._collection = collection
        self._before_upsert = before_upsert

    def upsert(self, collection: str, points: list[Any]) -> None:
        if collection == self._collection:
            self._before_upsert(points)
        self._store.upsert(collection, points)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_request_during_a_batch_sees_none_of_it_and_after_it_all_of_it(open_world: Callable[..., World]) -> None:
    world = open_world()
    world.catalogue()
    services = world.services
    apply_interactions(services, [world.click("u", "book-1", "purchase")])
    # Others make some items trending and teach what follows what.
    apply_interactions(services, [world.click(f"o{n}", item, "purchase")
                                  for n in range(3) for item in ("shoe-1", "book-2")])
    before = world.recommend("u", k=5)

    in_write, release = threading.Event(), threading.Event()

    def pause(points: list[Any]) -> None:
        in_write.set()
        assert release.wait(30)

    services.store = StoreWrapper(services.store, services.collections.users, pause)  # type: ignore[assignment]
    burst = ["tent-1", "tent-2", "tent-3"]
    writer = threading.Thread(
        target=apply_interactions, args=(services, [world.click("u", item, "purchase") for item in burst]))
    writer.start()
    try:
        assert in_write.wait(30), "the batch never reached the users write"
        # The batch is computed, its users not yet stored: a request sees none of it,
        # neither the purchases nor what they taught trending and co-visits.
        during = world.recommend("u", k=5)
        assert during == before
    finally:
        release.set()
        writer.join(30)
    after = world.recommend("u", k=5)
    assert not {"book-1", *burst} & set(ids(after))
    # And the batch is visible to everyone else too: what follows a tent now.
    assert "tent-2" in ids(world.recommend("newcomer", k=5, filters={"categories": ["tents"]}))
    assert services.covisit.row("tent-1").get("tent-2", 0.0) > 0


class ReadPausingStore(StoreWrapper):
    """Pauses a request right after it read its user, before it reads trending and co-visits."""

    def __init__(self, store: Any, users: str, after_upsert: threading.Event) -> None:
        super().__init__(store, users, lambda points: None)
        self.users = users
        self.after_upsert = after_upsert
        self.reader_paused, self.release_reader = threading.Event(), threading.Event()
        self.pause_reads = False

    def upsert(self, collection: str, points: list[Any]) -> None:
        super().upsert(collection, points)
        if collection == self.users:
            self.after_upsert.set()

    def retrieve(self, collection: str, ids: list[str], **options: Any) -> Any:
        found = self._store.retrieve(collection, ids, **options)
        if collection == self.users and self.pause_reads:
            self.pause_reads = False
            self.reader_paused.set()
            assert self.release_reader.wait(30)
        return found


def test_a_batch_stored_while_a_request_reads_waits_for_it_to_publish(open_world: Callable[..., World]) -> None:
    world = open_world()
    world.catalogue()
    services = world.services
    apply_interactions(services, [world.click("u", "book-1", "purchase")])
    before = world.recommend("u", k=5)
    stored = threading.Event()
    store = ReadPausingStore(services.store, services.collections.users, stored)
    services.store = store  # type: ignore[assignment]
    store.pause_reads = True
    answers: list[list[tuple[str, str]]] = []
    reader = threading.Thread(target=lambda: answers.append(world.recommend("u", k=5)))
    reader.start()
    writer = None
    try:
        assert store.reader_paused.wait(30)
        # The request has read the user as it was; now the batch is stored entirely.
        burst = [world.click("u", item, "purchase") for item in ("tent-1", "tent-2", "tent-3")]
        writer = threading.Thread(target=apply_interactions, args=(services, burst))
        writer.start()
        assert stored.wait(30)
    finally:
        store.release_reader.set()
        reader.join(30)
        if writer is not None:
            writer.join(30)
    # Its trending and co-visits waited for the request that had read the old user.
    assert answers == [before]
    assert not {"tent-1", "tent-2", "tent-3"} & set(ids(world.recommend("u", k=5)))


def _record(delivery: Delivery[ClickEvent]) -> RecordEvent:
    return RecordEvent(ConsumerRecord(
        topic=delivery.topic, partition=delivery.partition, offset=delivery.offset, timestamp=0,
        timestamp_type=0, key=delivery.event.user_id.encode(), value=delivery.event.to_bytes(), checksum=None,
        serialized_key_size=0, serialized_value_size=0, headers=(),
    ))


def test_a_batch_retried_after_an_outage_and_a_poison_event_teaches_the_signals_once(
    open_world: Callable[..., World],
) -> None:
    world = open_world()
    world.catalogue()
    services = world.services
    deliveries = [world.click("a", "tent-1", "purchase"), world.click("a", "tent-2", "purchase"),
                  world.click("poison", "book-1", "purchase"), world.click("b", "tent-1", "click"),
                  world.click("b", "tent-2", "click"), world.click("a", "tent-3", "add_to_cart")]
    outages = [1]  # the first users write finds the store down

    def fail(points: list[Any]) -> None:
        if outages:
            outages.pop()
            raise StoreUnavailableError("store down for this test")
        if any(point.id == "poison" for point in points):
            raise RuntimeError("this user cannot be written")

    services.store = StoreWrapper(services.store, services.collections.users, fail)  # type: ignore[assignment]
    letters: list[bytes] = []

    async def publish(key: bytes | None, value: bytes) -> asyncio.Future[None]:
        letters.append(value)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def apply(batch: list[Delivery[ClickEvent]]) -> list:
        apply_interactions(services, batch)
        return []

    asyncio.run(process_batch(services, DeadLetters(services, publish), [_record(d) for d in deliveries],
                              ClickEvent, apply, topic_label="clicks"))

    assert not outages, "the outage was not hit"
    (letter,) = [json.loads(value) for value in letters]
    assert (letter["reason"], letter["offset"]) == ("processing_error", deliveries[2].offset)
    assert "this user cannot be written" in letter["detail"]
    assert world.stored_user("a")["payload"]["items"] == ["tent-1", "tent-2", "tent-3"]
    assert world.stored_user("b")["payload"]["items"] == ["tent-1", "tent-2"]
    assert services.store.retrieve(services.collections.users, ["poison"]) == {}
    # Every applied click counted once in trending (the poison's not at all) ...
    weight = ACTION_WEIGHT_FOR_TRENDING
    expected = {"tent-1": weight["purchase"] + weight["click"], "tent-2": weight["purchase"] + weight["click"],
                "tent-3": weight["add_to_cart"], "book-1": 0.0}
    now = time.time()  # an hour's half-life: the seconds of this test decay nothing measurable
    for item_id, count in expected.items():
        assert services.trending.score(item_id, now) == pytest.approx(count, rel=1e-3), item_id
    # ... and each transition once: a bought tent-1 then tent-2, then tent-3; b clicked tent-1 then tent-2.
    assert services.covisit.row("tent-1")["tent-2"] == pytest.approx(2.0)
    assert services.covisit.row("tent-1")["tent-3"] == pytest.approx(0.5)
    assert services.covisit.row("tent-2")["tent-3"] == pytest.approx(1.0)
    assert services.covisit.row("book-1") == {}
