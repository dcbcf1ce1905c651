"""The shared user table: what an owner writes, its peers read whole, or not at all."""
from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from stream.user_table import (
    MAX_LOAD,
    OwnTable,
    PeerTables,
    remove_tables,
    table_path,
    user_key,
)

DIM = 8


@dataclass
class State:
    user_id: str
    items: list[str] = field(default_factory=list)
    last_event_time: float = 0.0


@pytest.fixture
def root(tmp_path: Path):
    """A data dir of two processes; their tables live in /dev/shm under its digest."""
    yield tmp_path
    remove_tables(tmp_path, 2)


def _own(root: Path, slots: int = 64, slot_bytes: int = 1024) -> OwnTable:
    return OwnTable(table_path(root, 0), slots, slot_bytes)


def _publish(table: OwnTable, states: list[State], vectors: np.ndarray | None = None,
             version: str = "v1") -> dict[str, int]:
    if vectors is None:
        vectors = np.stack([np.full(DIM, len(s.items), np.float32) for s in states])
    return table.publish("users", version, states, vectors, np.ones(len(states), bool))


def test_a_peer_reads_what_the_owner_wrote_last(root: Path) -> None:
    own, peers = _own(root), PeerTables(root)
    assert peers.read(0, "u1") is None
    _publish(own, [State("u1", ["a", "q:e1"], 10.5), State("u2", ["b"], 3.0)])
    user = peers.read(0, "u1")
    assert user is not None
    assert (user.user_id, user.items, user.last_event_time) == ("u1", ["a", "q:e1"], 10.5)
    assert (user.collection, user.version) == ("users", "v1")
    np.testing.assert_array_equal(user.vector, np.full(DIM, 2, np.float32))
    _publish(own, [State("u1", ["a", "q:e1", "c"], 11.0)], version="v2")
    user = peers.read(0, "u1")
    assert user is not None and user.items == ["a", "q:e1", "c"] and user.version == "v2"
    assert peers.read(0, "u2").items == ["b"]  # type: ignore[union-attr]
    assert peers.read(0, "u3") is None
    assert peers.read(1, "u1") is None  # process 1 has no table: passed on
    # A user stored without a vector (only items not yet listed) reads as cold.
    own.publish("users", "v1", [State("cold", ["x"])], np.zeros((1, DIM), np.float32), np.zeros(1, bool))
    assert peers.read(0, "cold").vector is None  # type: ignore[union-attr]
    assert own.users == 3
    peers.close()
    own.close()


def test_a_full_table_and_an_oversize_state_refuse_and_their_users_are_passed_on(root: Path) -> None:
    own, peers = _own(root, slots=16, slot_bytes=256), PeerTables(root)
    users = [State(f"user-{n}", ["i"]) for n in range(40)]
    refused = _publish(own, users)
    assert refused == {"full": 40 - int(16 * MAX_LOAD), "oversize": 0}
    readable = [u.user_id for u in users if peers.read(0, u.user_id) is not None]
    assert readable == [u.user_id for u in users[:int(16 * MAX_LOAD)]]  # every kept user found past collisions
    long = State("user-0", [f"item-{n:04d}" for n in range(60)])
    assert _publish(own, [long]) == {"full": 0, "oversize": 1}
    # Its older state is not served in its place.
    assert peers.read(0, "user-0") is None
    assert peers.read(0, "user-1") is not None
    own.close()


def test_a_slot_being_written_or_damaged_is_not_read(root: Path) -> None:
    own, peers = _own(root), PeerTables(root)
    _publish(own, [State("u1", ["a"])])
    slot = own._slot_of[user_key("u1")]
    table = own._table
    table.heads[slot, 0] += 1  # a write under way
    assert peers.read(0, "u1") is None
    table.heads[slot, 0] += 1
    assert peers.read(0, "u1") is not None
    table.records[slot, 20] ^= 0xFF  # torn: the CRC no longer holds
    assert peers.read(0, "u1") is None
    own.close()


def test_a_restarted_owner_empties_its_table_under_its_readers(root: Path) -> None:
    own, peers = _own(root), PeerTables(root)
    _publish(own, [State("u1", ["a"])])
    assert peers.read(0, "u1") is not None
    restarted = _own(root)  # same file, same mapping for the reader
    assert peers.read(0, "u1") is None
    _publish(restarted, [State("u1", ["a", "b"])])
    assert peers.read(0, "u1").items == ["a", "b"]  # type: ignore[union-attr]
    # Another geometry: the old file is marked retired and the reader opens the new one.
    resized = _own(root, slots=128)
    _publish(resized, [State("u1", ["c"])])
    assert peers.read(0, "u1").items == ["c"]  # type: ignore[union-attr]
    own.close(), restarted.close(), resized.close()
    peers.close()


def test_a_table_too_small_to_hold_a_user_is_refused(root: Path) -> None:
    with pytest.raises(ConfigError, match="at least 1 slot of 256 bytes"):
        _own(root, slot_bytes=100)


def _writer(root: Path, rounds: int, started: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    own = _own(root, slots=64, slot_bytes=2048)
    started.set()
    for n in range(1, rounds + 1):
        # Each write is whole only if its vector, item count and time agree.
        states = [State(f"u{u}", [f"i{k}" for k in range(n % 50)], float(n)) for u in range(4)]
        _publish(own, states, np.stack([np.full(DIM, n, np.float32)] * 4))
    own.close()


def test_a_reader_in_another_process_sees_whole_states_while_the_owner_writes(root: Path) -> None:
    context = multiprocessing.get_context("fork")
    started = context.Event()
    rounds = 20_000
    writer = context.Process(target=_writer, args=(root, rounds, started))
    writer.start()
    assert started.wait(30)
    peers = PeerTables(root)
    seen: set[float] = set()
    deadline = time.monotonic() + 60
    while writer.is_alive() and time.monotonic() < deadline:
        for u in range(4):
            user = peers.read(0, f"u{u}")
            if user is None:
                continue
            n = user.last_event_time
            assert user.vector is not None and set(user.vector.tolist()) == {n}
            assert user.items == [f"i{k}" for k in range(int(n) % 50)]
            seen.add(n)
    writer.join(30)
    assert writer.exitcode == 0
    assert len(seen) > 10  # read while it wrote, not only at the end
    assert peers.read(0, "u0").last_event_time == rounds  # type: ignore[union-attr]
    peers.close()


def test_a_worker_without_room_for_its_table_passes_every_request_on(root: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from core.settings import Settings
    from stream.partitions import Ownership
    from stream.worker import own_user_table

    ownership = Ownership(0, 2, root)
    settings = Settings(data_dir=root)
    table = own_user_table(settings, ownership)
    assert table is not None and table.path == table_path(root, 0)
    table.close()
    assert own_user_table(settings.model_copy(update={"user_table_slots": 0}), ownership) is None
    huge = settings.model_copy(update={"user_table_slots": 16_000_000, "user_table_slot_bytes": 1_048_576})
    assert own_user_table(huge, ownership) is None
    assert "no shared user table" in caplog.text and "passed on" in caplog.text


def test_a_failed_write_empties_the_table_and_the_batch_goes_on(root: Path) -> None:
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from exporter.metrics import Metrics
    from stream.users import UserState, _share

    class Failing(OwnTable):
        def publish(self, *args: object, **kwargs: object) -> dict[str, int]:
            if self.fail:
                raise ValueError("disk on fire")
            return super().publish(*args, **kwargs)  # type: ignore[arg-type]

    table = Failing(table_path(root, 0), 64, 1024)
    table.fail = False
    metrics = Metrics(CollectorRegistry())
    services = SimpleNamespace(user_table=table, metrics=metrics,
                               serving=SimpleNamespace(collections=SimpleNamespace(users="users"),
                                                       model=SimpleNamespace(version="v1")))
    peers = PeerTables(root)
    vectors, has = np.ones((1, DIM), np.float32), np.ones(1, bool)
    _share(services, [UserState("u1", items=["a"])], vectors, has)  # type: ignore[arg-type]
    assert peers.read(0, "u1") is not None and metrics.user_table_users._value.get() == 1
    table.fail = True
    _share(services, [UserState("u1", items=["a", "b"])], vectors, has)  # type: ignore[arg-type]
    # Not the older state: nothing, so the request is passed on to the owner's store.
    assert peers.read(0, "u1") is None
    assert metrics.registry.get_sample_value("streamrec_user_table_refused_total", {"reason": "error"}) == 1
    assert metrics.user_table_users._value.get() == 0
    table.close()
    peers.close()


def test_a_user_read_from_the_table_is_answered_as_from_the_owners_store(world, root: Path) -> None:  # type: ignore[no-untyped-def]
    """The real path: a click batch writes the table, and a request given the table's user ranks,
    scores and explains exactly as one that reads the user from the store; a user of another
    model version is refused (the request is passed on)."""
    import dataclasses

    from core.events import RecRequest
    from stream.recommend import UserElsewhere, recommend
    from stream.users import apply_interactions

    world.catalogue()
    services = world.services
    services.user_table = OwnTable(table_path(root, 0), 64, 4096)
    peers = PeerTables(root)
    try:
        apply_interactions(services, [world.click("u1", "tent-1", "purchase"), world.click("u1", "shoe-2"),
                                      world.click("u2", "book-1")])
        shared = peers.read(0, "u1")
        assert shared is not None and shared.items == world.stored_user("u1")["payload"]["items"]
        assert shared.version == services.model.version and shared.collection == services.collections.users
        np.testing.assert_array_equal(shared.vector, world.stored_user("u1")["vectors"]["user"])
        request = RecRequest(request_id="r1", user_id="u1", k=5)
        from_store = recommend(services, request, path="test")
        from_table = recommend(services, request, path="test", user=shared)
        assert from_table.items and not {"tent-1", "shoe-2"} & {item.item_id for item in from_table.items}
        assert [(i.item_id, i.score, i.reason) for i in from_table.items] == \
            [(i.item_id, i.score, i.reason) for i in from_store.items]
        # It is the table's state that is served: an item in its history leaves the answer.
        first = from_store.items[0].item_id
        altered = dataclasses.replace(shared, items=[*shared.items, first])
        assert first not in {i.item_id for i in recommend(services, request, path="test", user=altered).items}
        with pytest.raises(UserElsewhere, match="this process serves"):
            recommend(services, request, path="test", user=dataclasses.replace(shared, version="another"))
    finally:
        peers.close()
        services.user_table.close()
        services.user_table = None
