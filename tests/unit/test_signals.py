"""Trending and co-visits survive a restart exactly: the signal log, its snapshots, and crashes between writes.

The worker-level tests run real services as in test_services_inprocess
(exported towers, rule scorer, qdrant-edge store) and "restart" by closing the
services and opening new ones on the same data folder; the store is wrapped
only to fail a write at the moment under test. The log-level tests run a
``SignalLog`` on a bare qdrant-edge store.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from core.errors import StoreUnavailableError
from core.events import CatalogItem, ClickEvent
from core.settings import Settings, load_settings
from stream.catalog import apply_catalog
from stream.covisit import StreamTransitions
from stream.kafka import Delivery
from stream.rwlock import ReadWriteLock
from stream.services import Services
from stream.signals import SignalLog
from stream.store.edge import EdgeStore
from stream.trending import Trending
from stream.users import apply_interactions
from tests.unit.world import CATALOGUE, World

T0 = 1_700_000_000.0
HALF_LIFE_S = 3600.0
ITEMS = [item_id for item_id, _, _, _ in CATALOGUE]


@contextmanager
def refusing(store: Any, refuse: Callable[[str, str, list[str]], bool]) -> Iterator[None]:
    """The store raises ``StoreUnavailableError`` for the writes ``refuse(verb, collection, ids)`` names.

    Patched on the store object itself, so every holder of it (users, signal log) meets it.
    """
    upsert, delete = store.upsert, store.delete

    def refusing_upsert(collection: str, points: list[Any]) -> None:
        if refuse("upsert", collection, [point.id for point in points]):
            raise StoreUnavailableError(f"upsert into {collection} refused for this test")
        upsert(collection, points)

    def refusing_delete(collection: str, ids: list[str]) -> None:
        if refuse("delete", collection, list(ids)):
            raise StoreUnavailableError(f"delete from {collection} refused for this test")
        delete(collection, ids)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "upsert", refusing_upsert)
        patch.setattr(store, "delete", refusing_delete)
        yield


# --- a worker restarted on its data folder ---------------------------------------------


@pytest.fixture
def restartable(models_dir: Path, shared_encoders: None, tmp_path: Path,  # noqa: F811
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., World]]:
    """``open_(world=None, **overrides)``: a worker on one data folder. Given the
    running ``world``, it closes its services first and opens new ones: a restart
    that keeps the world's event and offset counters, as the broker would."""
    for name in list(os.environ):
        if name.startswith("STREAMREC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    opened: list[Services] = []

    def open_(world: World | None = None, **overrides: object) -> World:
        if world is not None:
            world.services.close()
            opened.remove(world.services)
        settings = load_settings(data_dir=tmp_path / "state", model_dir=models_dir, **overrides)
        registry = CollectorRegistry()
        opened.append(Services.open(settings, registry))
        if world is None:
            return World(opened[-1], registry)
        world.services, world.registry = opened[-1], registry
        return world

    try:
        yield open_
    finally:
        for services in opened:
            services.close()


def signals_now(services: Services, now: float) -> dict[str, object]:
    """Trending scores at ``now`` and every co-visit row, as requests read them."""
    return {
        "trending": {item_id: services.trending.score(item_id, now) for item_id in ITEMS},
        "covisit": {item_id: services.covisit.row(item_id) for item_id in ITEMS},
    }


def some_clicks(world: World) -> list[list[Delivery]]:
    """Batches of clicks by several users over the catalogue (trending and transitions)."""
    return [
        [world.click("hiker", "tent-1", "purchase"), world.click("hiker", "shoe-2"),
         world.click("reader", "book-1"), world.click("reader", "book-2", "add_to_cart")],
        [world.click("hiker", "tent-3", "view"), world.click("camper", "tent-1"),
         world.click("camper", "tent-2", "purchase"), world.click("reader", "book-3")],
        [world.click("camper", "shoe-2"), world.click("runner", "shoe-1", "purchase"),
         world.click("runner", "shoe-3"), world.click("hiker", "tent-2", "add_to_cart")],
    ]


def test_a_restarted_worker_holds_the_same_trending_co_visits_and_recommendations(
    restartable: Callable[..., World],
) -> None:
    world = restartable()
    world.catalogue()
    first, second, third = some_clicks(world)
    apply_interactions(world.services, first)
    apply_interactions(world.services, second)
    # A deleted item leaves trending; the restart must not bring it back.
    assert apply_catalog(world.services, [CatalogItem(event_id="gone", event_time=T0, item_id="book-1",
                                                      op="delete")]) == []
    apply_interactions(world.services, third)
    now = time.time()
    before = signals_now(world.services, now)
    assert before["trending"]["book-1"] == 0.0 and before["trending"]["tent-1"] > 0  # type: ignore[index]
    asked = ("hiker", "camper", "reader", "runner", "newcomer")
    answers = {user: world.recommend(user, k=5) for user in asked}

    world = restartable(world)

    assert signals_now(world.services, now) == before
    assert {user: world.recommend(user, k=5) for user in asked} == answers


def test_a_batch_logged_but_not_stored_before_a_crash_is_learnt_once(restartable: Callable[..., World]) -> None:
    world = restartable()
    world.catalogue()
    first = [world.click("a", "tent-1", "purchase"), world.click("a", "tent-2", "purchase")]
    apply_interactions(world.services, first)
    batch = [world.click("a", "tent-3", "click"), world.click("b", "tent-1", "click"),
             world.click("b", "tent-2", "add_to_cart")]
    services = world.services
    users = services.collections.users

    # The store goes down after the batch's signals were logged: the users are
    # not stored, nor is the log entry taken back; the worker is killed then.
    def down(verb: str, collection: str, ids: list[str]) -> bool:
        return collection == users or verb == "delete"

    with refusing(services.store, down), pytest.raises(StoreUnavailableError):
        apply_interactions(services, batch)

    world = restartable(world)
    # Delivered again: the users apply it, the signals knew it already.
    assert apply_interactions(world.services, batch) == 3
    assert world.stored_user("a")["payload"]["applied_count"] == 3
    assert world.stored_user("b")["payload"]["applied_count"] == 2
    trending = world.services.trending
    now = time.time()  # the batches were applied seconds ago: an hour's half-life decays nothing measurable
    assert trending.score("tent-1", now) == pytest.approx(3.0 + 1.0, rel=1e-3)
    assert trending.score("tent-2", now) == pytest.approx(3.0 + 2.0, rel=1e-3)
    assert trending.score("tent-3", now) == pytest.approx(1.0, rel=1e-3)
    covisit = world.services.covisit
    # a: tent-1, tent-2, tent-3; b: tent-1, tent-2. Forward 1/distance, backward half of it.
    assert covisit.row("tent-1") == pytest.approx({"tent-2": 2.0, "tent-3": 0.5})
    assert covisit.row("tent-2") == pytest.approx({"tent-1": 1.0, "tent-3": 1.0})
    assert covisit.row("tent-3") == pytest.approx({"tent-2": 0.5, "tent-1": 0.25})
    # Undecayed, exactly: each click's weight once, each transition's once.
    assert [trending.total(item) for item in ("tent-1", "tent-2", "tent-3")] == [4.0, 5.0, 1.0]
    assert [covisit.learnt(item) for item in ("tent-1", "tent-2", "tent-3")] == pytest.approx([2.5, 2.0, 0.75])


def test_snapshots_bound_the_log_and_restore_the_same_state(restartable: Callable[..., World]) -> None:
    world = restartable(signals_snapshot_every=2)
    world.catalogue()
    for batch in some_clicks(world) + [[world.click("runner", "book-4")], [world.click("reader", "shoe-4")]]:
        apply_interactions(world.services, batch)  # five entries: snapshots after the 2nd and the 4th
    services = world.services
    assert sorted(services.store.scroll_ids("signals")) == [
        "log:000000000005", "snapshot", "snapshot-part:000000000004:000000"]
    now = time.time()
    before = signals_now(services, now)
    exact = (services.trending.entries(), services.covisit.entries())
    answers = {user: world.recommend(user, k=5) for user in ("hiker", "runner", "newcomer")}

    world = restartable(world, signals_snapshot_every=2)

    assert (world.services.trending.entries(), world.services.covisit.entries()) == exact
    assert signals_now(world.services, now) == before
    assert {user: world.recommend(user, k=5) for user in ("hiker", "runner", "newcomer")} == answers


# --- the log itself, on a bare store ----------------------------------------------------


class Worker:
    """A ``SignalLog`` with its trending and co-visits, as ``Services.open`` builds them."""

    def __init__(self, settings: Settings, store: Any = None) -> None:
        from stream.signals import SignalLog

        self.settings = settings
        self.store = store or EdgeStore(settings.store_path)
        self.trending = Trending(settings.trending_half_life_s)
        self.covisit = StreamTransitions(settings.covisit_items)
        self.signals = SignalLog.open(self.store, settings, self.trending, self.covisit, ReadWriteLock())
        self.offsets = 0

    def click(self, user_id: str, item_id: str, previous: list[str], action: str = "click",
              offset: int | None = None, event_time: float | None = None) -> tuple[Delivery, list[str]]:
        if offset is None:
            offset, self.offsets = self.offsets, self.offsets + 1
        event = ClickEvent(event_id=f"{user_id}-{offset}-{item_id}", user_id=user_id, item_id=item_id,
                           action=action, event_time=T0 + offset if event_time is None else event_time)  # type: ignore[arg-type]
        return Delivery(event, "clicks", 0, offset), previous

    def teach(self, *clicks: tuple[Delivery, list[str]], at: float = T0) -> Any:
        learnt = self.signals.lesson(at)
        for delivery, previous in clicks:
            learnt.add_click(delivery, previous)
        with self.signals.learning(learnt):
            pass
        return learnt

    def state(self) -> tuple[object, ...]:
        return self.trending.entries(), self.covisit.entries(), self.signals.positions

    def ids(self) -> list[str]:
        from stream.signals import signals_spec

        return sorted(self.store.scroll_ids(signals_spec(self.settings).name))


@pytest.fixture
def bare(tmp_path: Path) -> Callable[..., Settings]:
    def settings(**overrides: object) -> Settings:
        return load_settings(data_dir=tmp_path / "state", trending_half_life_s=HALF_LIFE_S, **overrides)
    return settings


def walk(worker: Worker, user: str, items: list[str], at: float = T0) -> None:
    """One batch per click: ``user`` goes through ``items``."""
    for n, item_id in enumerate(items):
        worker.teach(worker.click(user, item_id, items[max(0, n - 3):n]), at=at + n)


def test_a_delivery_is_learnt_unless_the_log_covers_it() -> None:
    from stream.signals import Learnt

    logged = {"clicks/0": (10, T0 + 10)}

    def learns(offset: int, event_time: float) -> bool:
        learnt = Learnt(at=T0, logged=logged)
        event = ClickEvent(event_id=f"e{offset}", user_id="u", item_id="i", event_time=event_time)
        learnt.add_click(Delivery(event, "clicks", 0, offset), [])
        return learnt.teaches

    assert not learns(10, T0 + 10)  # logged by an attempt that crashed before its users were stored
    assert not learns(3, T0 + 3)
    assert learns(11, T0 + 5)  # a later offset is new, whatever its event time
    assert learns(0, T0 + 11)  # an old offset with a newer time: the broker restarted empty


def test_every_change_is_replayed_in_order(bare: Callable[..., Settings]) -> None:
    worker = Worker(bare())
    walk(worker, "a", ["x", "y", "z"])
    worker.signals.clear_covisits()  # a swap to a version with its own transitions
    walk(worker, "b", ["y", "x"], at=T0 + 100)
    worker.signals.forget(["z", "never-trending"])
    before = worker.state()
    assert worker.covisit.row("x") == {"y": 0.5} and "z" not in worker.trending
    worker.store.close()

    assert Worker(bare()).state() == before


def test_a_snapshot_interrupted_before_its_marker_changes_nothing(bare: Callable[..., Settings]) -> None:
    worker = Worker(bare(signals_snapshot_every=3))
    walk(worker, "a", ["x", "y", "z"])  # the first snapshot, at 3
    with refusing(worker.store, lambda verb, _, ids: verb == "upsert" and "snapshot" in ids):
        walk(worker, "b", ["z", "x", "w"])  # the second snapshot's parts are written, its marker is not
    assert "snapshot-part:000000000006:000000" in worker.ids()
    before = worker.state()
    worker.store.close()  # killed here

    restarted = Worker(bare(signals_snapshot_every=3))
    assert restarted.state() == before
    # The orphaned parts are gone; the old snapshot and the log after it remain.
    assert restarted.ids() == ["log:000000000004", "log:000000000005", "log:000000000006", "snapshot",
                               "snapshot-part:000000000003:000000"]


def test_a_snapshot_interrupted_after_its_marker_changes_nothing(bare: Callable[..., Settings]) -> None:
    worker = Worker(bare(signals_snapshot_every=2))
    with refusing(worker.store, lambda verb, _, ids: verb == "delete"):
        walk(worker, "a", ["x", "y", "z"])  # snapshot at 2 written, the entries it covers not deleted
    before = worker.state()
    assert "log:000000000001" in worker.ids()
    worker.store.close()

    restarted = Worker(bare(signals_snapshot_every=2))
    assert restarted.state() == before
    assert restarted.ids() == ["log:000000000003", "snapshot", "snapshot-part:000000000002:000000"]


def test_a_snapshot_in_many_parts_keeps_every_row_in_order(bare: Callable[..., Settings],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.signals

    monkeypatch.setattr(stream.signals, "PART_VALUES", 7)  # about one row a part
    worker = Worker(bare(signals_snapshot_every=4))
    walk(worker, "a", ["x", "y", "z", "w"])
    walk(worker, "b", ["w", "q", "x"])
    parts = [point_id for point_id in worker.ids() if point_id.startswith("snapshot-part:")]
    assert len(parts) > 5
    before = worker.state()
    worker.store.close()

    assert Worker(bare(signals_snapshot_every=4)).state() == before


def test_an_entry_whose_users_were_not_stored_is_taken_back(bare: Callable[..., Settings]) -> None:
    worker = Worker(bare())
    walk(worker, "a", ["x", "y"])
    before = worker.state()
    learnt = worker.signals.lesson(T0 + 5)
    learnt.add_click(*worker.click("a", "z", ["x", "y"]))
    refused = refusing(worker.store, lambda verb, _, ids: verb == "delete")
    with refused, pytest.raises(RuntimeError), worker.signals.learning(learnt):
        raise RuntimeError("the users could not be stored")
    assert worker.state() == before  # nothing published
    assert "log:000000000003" in worker.ids()  # and the store refused to take it back ...
    walk(worker, "c", ["q"], at=T0 + 9)  # ... until the next change is logged
    assert "log:000000000003" not in worker.ids()
    before = worker.state()
    worker.store.close()

    assert Worker(bare()).state() == before


# -- lessons shared between worker processes ------------------------------------------------


def _mailbox(box: list[dict[str, Any]], *, refuse: list[bool] | None = None) -> Callable[[list[bytes]], None]:
    import json

    def send(values: list[bytes]) -> None:
        if refuse and refuse[0]:
            raise ConnectionError("broker away for this test")
        box.extend(json.loads(value) for value in values)
    return send


def _send_pending(signals: SignalLog, send: Callable[[list[bytes]], None]) -> int:
    """What the worker's sender does (``stream.agents.lessons``), in one call: ``pending``,
    ``send(values)`` (raises when the broker refuses), ``acknowledged``; how many are still pending."""
    seq, values = signals.pending()
    if not values:
        return 0
    try:
        send(values)
    except ConnectionError:
        return signals.unsent_count
    return signals.acknowledged(seq)


def test_peers_learn_each_lesson_once_and_hold_what_one_worker_would(tmp_path: Path) -> None:
    def settings(name: str, replica: int | None) -> Settings:
        return load_settings(data_dir=tmp_path / name, trending_half_life_s=HALF_LIFE_S, replica=replica)

    alone = Worker(settings("alone", None))
    first, second = Worker(settings("first", 0)), Worker(settings("second", 1))
    first.signals.share(0)
    second.signals.share(1)
    box: list[dict[str, Any]] = []
    for worker in (alone, first):
        walk(worker, "a", ["x", "y", "z"])
    for worker in (alone, second):
        walk(worker, "b", ["y", "x", "w"], at=T0 + 50)
    assert box == [], "applying a batch does not wait for the broker: the lessons are pending"
    assert _send_pending(first.signals, _mailbox(box)) == 0 and _send_pending(second.signals, _mailbox(box)) == 0
    assert [(lesson["origin"], lesson["seq"]) for lesson in box] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert first.signals.learn_from_peers(box) == 3  # its own lessons are skipped
    assert second.signals.learn_from_peers(box) == 3
    assert first.signals.learn_from_peers(box) == 0  # delivered again: nothing learnt twice
    def trending(worker: Worker) -> dict[str, float]:  # decayed score now, and total
        entries = worker.trending.entries()[1]
        return {**{item: worker.trending.score(item, T0 + 100) for item, _, _ in entries},
                **{f"total:{item}": total for item, _, total in entries}}

    for worker in (first, second):
        assert trending(worker) == pytest.approx(trending(alone))
        # The same rows; a row's successors in the order they were first taught (learning orders differ).
        assert {source: (learnt, dict(row)) for source, learnt, row in worker.covisit.entries()} == \
            {source: (learnt, dict(row)) for source, learnt, row in alone.covisit.entries()}
    # A restart restores the lessons learnt from the peer, and where it stands with it.
    expected = second.state()
    second.store.close()
    restarted = Worker(settings("second", 1))
    assert restarted.state() == expected
    assert restarted.signals.peer_seq(0) == 3
    from stream.signals import signals_spec

    assert signals_spec(restarted.settings).name == "signals_r1"  # a log of its own in a shared store


def test_lessons_the_broker_refused_are_sent_later_and_again_after_a_restart(bare: Callable[..., Settings]) -> None:
    worker = Worker(bare(replica=0, signals_snapshot_every=2))
    worker.signals.share(0)
    box: list[dict[str, Any]] = []
    refuse = [True]
    walk(worker, "a", ["x", "y", "z"])
    assert _send_pending(worker.signals, _mailbox(box, refuse=refuse)) == 3
    assert box == [] and worker.signals.unsent_count == 3
    # A snapshot (every 2 entries here) does not wait for the broker: it keeps the pending lessons.
    assert "log:000000000001" not in worker.ids() and "log:000000000002" not in worker.ids()
    refuse[0] = False
    assert _send_pending(worker.signals, _mailbox(box, refuse=refuse)) == 0
    assert [lesson["seq"] for lesson in box] == [1, 2, 3] and worker.signals.sent_seq == 3
    worker.store.close()

    # After a restart the lessons pending at the snapshot and the log's own lessons since go
    # out again (peers skip what they had); an empty lesson at the log's seq would say where
    # this worker stands if it had none.
    restarted = Worker(bare(replica=0, signals_snapshot_every=2))
    restarted.signals.share(0)
    again: list[dict[str, Any]] = []
    assert _send_pending(restarted.signals, _mailbox(again)) == 0
    assert [lesson["seq"] for lesson in again] == [1, 2, 3]
    peer = Worker(load_settings(data_dir=bare().data_dir.parent / "peer", trending_half_life_s=HALF_LIFE_S,
                                replica=1))
    peer.signals.share(1)
    assert peer.signals.learn_from_peers(box + again) == 3
    assert peer.trending.entries() == restarted.trending.entries()


def test_a_batch_does_not_wait_for_a_send_and_its_lesson_follows_in_order(bare: Callable[..., Settings]) -> None:
    import json
    import threading

    worker = Worker(bare(replica=0))
    worker.signals.share(0)
    box: list[dict[str, Any]] = []
    in_send, release = threading.Event(), threading.Event()
    woken: list[int] = []

    def slow_broker(values: list[bytes]) -> None:
        in_send.set()
        assert release.wait(10), "the test never released the send"
        box.extend(json.loads(value) for value in values)

    worker.signals.on_pending(lambda: woken.append(worker.signals.unsent_count))
    walk(worker, "a", ["x", "y"])
    assert woken == [1, 2], "each batch's lesson wakes the sender"
    sending = threading.Thread(target=_send_pending, args=(worker.signals, slow_broker))
    sending.start()
    assert in_send.wait(10)
    walk(worker, "a", ["z"])  # applied while the broker has not answered the first send
    assert worker.signals.unsent_count == 3
    release.set()
    sending.join(10)
    assert [lesson["seq"] for lesson in box] == [1, 2] and worker.signals.unsent_count == 1
    assert _send_pending(worker.signals, slow_broker) == 0
    assert [lesson["seq"] for lesson in box] == [1, 2, 3] and worker.signals.sent_seq == 3
