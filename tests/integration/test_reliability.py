"""Reliability over the real broker, worker process and store: crashes, replays,
hostile input, an HTTP endpoint under abuse, and a broker that loses everything.
"""
from __future__ import annotations

import ast
import asyncio
import io
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from bench import movielens
from bench.common import read_store, user_state
from bench.stack import LocalStack, WorkerProcess, free_port
from core.events import CatalogItem, ClickEvent, ImageEvent, ImageRef
from core.settings import Settings
from stream.broker import EmbeddedBroker, ensure_topics
from stream.covisit import StreamTransitions
from stream.kafka import consumer_groups
from stream.signals import ACTION_WEIGHT_FOR_TRENDING
from tests.integration.helpers import (
    ask_http,
    ask_kafka,
    dead_letters,
    processed,
    publish,
    publish_raw,
    wait_until,
)

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CATALOGUE = movielens.catalog_events()[:200]
ITEM_IDS = [item.item_id for item in CATALOGUE]


def _clicks(users: int, per_user: int, *, tag: str, start: float) -> list[ClickEvent]:
    """Interleaved clicks of ``users`` users, each on ``per_user`` items, times increasing."""
    events = []
    for n in range(users * per_user):
        user, k = n % users, n // users
        events.append(ClickEvent(event_id=f"{tag}-{n}", event_time=start + n * 0.001, user_id=f"{tag}-u{user}",
                                 item_id=ITEM_IDS[(user * 7 + k) % len(ITEM_IDS)]))
    return events


def _expected_sequences(events: list[ClickEvent], length: int) -> dict[str, list[str]]:
    sequences: dict[str, list[str]] = {}
    for event in events:
        sequences.setdefault(event.user_id, []).append(event.item_id)
    return {user: items[-length:] for user, items in sequences.items()}


def _catalogue_applied(settings: Settings, worker: WorkerProcess) -> None:
    publish(settings, CATALOGUE)
    wait_until(lambda: worker.metric("streamrec_events_processed_total", {"topic": "catalog"}) >= len(CATALOGUE),
               120, "catalogue applied")


def _applied_count(settings: Settings, user_id: str) -> int:
    state = user_state(settings, user_id)
    return int(state["applied_count"]) if state else 0


def _all_applied(settings: Settings, counts: dict[str, int]) -> bool:
    return all(_applied_count(settings, user) >= count for user, count in counts.items())


def _counts(events: list[ClickEvent]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in events:
        counts[event.user_id] = counts.get(event.user_id, 0) + 1
    return counts


def _stable(payload: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in payload.items() if k != "updated_at"}


# -- crashes ----------------------------------------------------------------------------


def test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice(settings: Settings, tmp_path: Path) -> None:
    # Snapshots of trending and co-visits are written from the worker's memory:
    # taken every other batch, what the store holds at the end is what the
    # restarted worker held, not only what was logged.
    settings = settings.model_copy(update={"signals_snapshot_every": 2, "batch_size": 100})
    asyncio.run(ensure_topics(settings))
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
    try:
        worker.wait_ready()
        _catalogue_applied(settings, worker)
        events = _clicks(30, 40, tag="crash", start=time.time())
        first, second = events[:600], events[600:]
        publish(settings, first)
        # Kill as soon as the worker is busy with the first half: whatever it had
        # applied but not yet committed is delivered again after the restart.
        wait_until(lambda: processed_clicks(worker) > 0, 60, "clicks being applied")
        worker.kill()
        publish(settings, second)  # the producer does not wait for the worker
        # The kill may also have cost the commit of batches already in the store;
        # make sure it did, so the restart has applied clicks to skip.
        asyncio.run(_rewind_group(settings, settings.topic("clicks"), back=100))
        worker = WorkerProcess(settings, log_path=tmp_path / "worker.log").start()
        worker.wait_ready()
        wait_until(lambda: _all_applied(settings, _counts(events)), 600, "every click applied after the restart")
        redelivered = worker.metric("streamrec_events_duplicate_total", {"topic": "clicks"})
    finally:
        worker.stop()
    assert redelivered > 0, "no click was delivered again after the restart"
    snapshot = read_store(settings)
    stored = snapshot.users
    expected = _expected_sequences(events, settings.user_sequence_length)
    for user, count in _counts(events).items():
        payload = stored[user].payload
        assert payload["applied_count"] == count, f"{user}: applied {payload['applied_count']} of {count}"
        assert payload["items"] == expected[user]
        assert "user" in stored[user].vectors
    # What a restart restores (stream.signals) counts every click once: its
    # trending weight, and the transitions from the user's previous items.
    assert snapshot.trending is not None and snapshot.covisit is not None
    trending, taught, rows = _expected_signals(events, settings)
    assert {item: total for item, _, total in snapshot.trending.entries()[1]} == pytest.approx(trending)
    assert {source: learnt for source, learnt, _ in snapshot.covisit.entries()} == pytest.approx(taught)
    # No row here is long enough to be pruned, so no row depends on the order partitions were learnt in.
    assert {source: dict(row) for source, _, row in snapshot.covisit.entries()} == rows


def _expected_signals(events: list[ClickEvent], settings: Settings) -> tuple[dict[str, float], ...]:
    """(trending weight per item, co-visit weight taught per row, co-visit rows) of each click learnt once."""
    trending: dict[str, float] = {}
    covisit = StreamTransitions(settings.covisit_items)
    previous: dict[str, list[str]] = {}
    for event in events:
        trending[event.item_id] = trending.get(event.item_id, 0.0) + ACTION_WEIGHT_FOR_TRENDING[event.action]
        covisit.learn(previous.setdefault(event.user_id, [])[-covisit.window:], event.item_id)
        previous[event.user_id].append(event.item_id)
    entries = covisit.entries()
    return (trending, {source: learnt for source, learnt, _ in entries},
            {source: pytest.approx(dict(row)) for source, _, row in entries})


def processed_clicks(worker: WorkerProcess) -> float:
    return worker.metric("streamrec_events_processed_total", {"topic": "clicks"})


# -- idempotency --------------------------------------------------------------------------


@pytest.fixture
def small_window(settings: Settings) -> Settings:
    """A tiny dedup window, so that replays are caught by offsets, not by remembered ids."""
    return settings.model_copy(update={"dedup_window": 4})


def test_replays_and_a_consumer_group_reset_change_nothing(small_window: Settings, tmp_path: Path) -> None:
    settings = small_window
    events = _clicks(5, 30, tag="idem", start=time.time())
    with LocalStack(settings, log_dir=tmp_path / "logs", start_broker=False) as stack:
        _catalogue_applied(settings, stack.worker)
        publish(settings, events)
        wait_until(lambda: _all_applied(settings, _counts(events)), 300, "clicks applied")
        # The producer retries its last few sends: same event ids at new offsets.
        publish(settings, events[-3:])
        wait_until(lambda: stack.worker.metric("streamrec_events_duplicate_total") >= 3, 120, "retries seen")
    before = read_store(settings)

    # Rewind the worker's consumer group to the start of every partition and run again.
    asyncio.run(_rewind_group(settings, settings.topic("clicks")))
    with LocalStack(settings, log_dir=tmp_path / "logs-again", start_broker=False) as stack:
        wait_until(lambda: stack.worker.metric("streamrec_events_duplicate_total") >= len(events) + 3, 300,
                   "the whole topic delivered again")
        assert processed(stack, "clicks") == len(events) + 3  # delivered, not applied
    after = read_store(settings)

    assert before.users.keys() == after.users.keys() == set(_counts(events))
    for user, hit in before.users.items():
        assert _stable(after.users[user].payload) == _stable(hit.payload)
        assert (after.users[user].vectors["user"] == hit.vectors["user"]).all()
        assert hit.payload["applied_count"] == _counts(events)[user]


async def _rewind_group(settings: Settings, topic: str, back: int | None = None) -> None:
    """Move the committed offsets of the group that applies ``topic`` back by ``back`` records
    per partition (None: to the start), as an operator's offset reset does."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_list,
                                group_id=consumer_groups(settings)["clicks"], enable_auto_commit=False)
    await consumer.start()
    try:
        # The embedded broker takes commits from group members only: join the
        # (now idle) group first, then commit.
        consumer.subscribe([topic])
        deadline = time.monotonic() + 60
        while not consumer.assignment() and time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=500, max_records=1)
        partitions = sorted(consumer.assignment())
        assert partitions, "never joined the worker's consumer group"
        committed = {tp: (await consumer.committed(tp)) or 0 for tp in partitions}
        target = {tp: 0 if back is None else max(0, offset - back) for tp, offset in committed.items()}
        await consumer.commit(target)
        assert {tp: await consumer.committed(tp) for tp in partitions} == target
    finally:
        await consumer.stop()


# -- hostile input -----------------------------------------------------------------------------


@pytest.fixture
def image_root(tmp_path: Path) -> tuple[Path, Path]:
    """An image root holding one photo, and a symlink inside it that leads out of it."""
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 160, 90)).save(buffer, format="JPEG")
    (root / "photo.jpg").write_bytes(buffer.getvalue())
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(buffer.getvalue())
    os.symlink(secret, root / "escape.jpg")
    return root, secret


@pytest.fixture
def guarded(settings: Settings, image_root: tuple[Path, Path], tmp_path: Path) -> Iterator[tuple[Settings, LocalStack]]:
    guarded_settings = settings.model_copy(update={"image_root": image_root[0], "http_max_body_bytes": 4096})
    with LocalStack(guarded_settings, log_dir=tmp_path / "logs", start_broker=False) as stack:
        yield guarded_settings, stack


def test_image_uris_stay_inside_the_root_and_http_is_off(guarded: tuple[Settings, LocalStack],
                                                          image_root: tuple[Path, Path]) -> None:
    settings, stack = guarded
    root, secret = image_root
    forbidden = [
        "../secret.jpg",                       # traversal, relative
        f"file://{root}/../secret.jpg",        # traversal, absolute
        "%2e%2e/secret.jpg",                   # traversal, percent-encoded
        "escape.jpg",                          # a symlink inside the root that points out
        f"file://{secret}",                    # outside the root
        "http://127.0.0.1:9/photo.jpg",        # remote fetches are off
        "ftp://127.0.0.1/photo.jpg",
    ]
    now = time.time()
    events = [ImageEvent(event_id=f"uri-{n}", event_time=now, purpose="catalog_photo", item_id=f"i{n}",
                         image=ImageRef(image_uri=uri)) for n, uri in enumerate(forbidden)]
    inside = ImageEvent(event_id="uri-ok", event_time=now, purpose="catalog_photo", item_id="inside",
                        image=ImageRef(image_uri="photo.jpg"))
    publish(settings, [*events, inside])
    letters = dead_letters(settings, len(forbidden), timeout_s=60)
    assert sorted(json.loads(letter.raw())["event_id"] for letter in letters) == sorted(e.event_id for e in events)
    assert {letter.reason for letter in letters} == {"image_uri_forbidden"}
    wait_until(lambda: processed(stack, "images") >= 1, 120, "the photo inside the root applied")
    with urllib.request.urlopen(f"http://{settings.http_host}:{settings.http_port}/items/inside") as reply:
        assert "image" in json.loads(reply.read())["vectors"]


def test_null_values_and_ten_megabyte_payloads_are_dead_lettered(guarded: tuple[Settings, LocalStack]) -> None:
    settings, stack = guarded
    big = b'{"padding": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    publish_raw(settings, [(settings.topic("clicks"), b"u1", None), (settings.topic("catalog"), b"i1", None),
                           (settings.topic("clicks"), b"u1", big)])
    good = ClickEvent(event_id="after-the-storm", event_time=time.time(), user_id="u1", item_id="m1")
    publish(settings, [good])
    letters = dead_letters(settings, 3, timeout_s=120)
    assert sorted(letter.reason for letter in letters) == ["missing_field", "missing_field", "oversize"]
    oversize = next(letter for letter in letters if letter.reason == "oversize")
    assert oversize.raw_size == len(big) and oversize.raw_truncated
    wait_until(lambda: _applied_count(settings, "u1") == 1, 120, "the good click behind them applied")
    assert stack.worker.process is not None and stack.worker.process.poll() is None


def test_superseded_catalogue_event_with_a_bad_photo_is_still_dead_lettered(
        guarded: tuple[Settings, LocalStack]) -> None:
    settings, stack = guarded
    now = time.time()
    first = CatalogItem(event_id="v1", event_time=now, item_id="lamp", title="Brass desk lamp")
    broken = CatalogItem(event_id="v2", event_time=now, item_id="lamp", title="Brass desk lamp, new photo",
                         image=ImageRef(image_uri="../secret.jpg"))
    renamed = CatalogItem(event_id="v3", event_time=now, item_id="lamp", title="Brass desk lamp with dimmer")
    bad_last = CatalogItem(event_id="v4", event_time=now, item_id="lamp", title="Lamp with a truncated photo",
                           image=ImageRef(image_b64="/9j/4AAQSkZJRg=="))
    # However the worker batches these, the result must be what one-by-one gives.
    publish(settings, [first, broken, renamed, bad_last])
    letters = dead_letters(settings, 2, timeout_s=60)
    assert sorted((json.loads(letter.raw())["event_id"], letter.reason) for letter in letters) == [
        ("v2", "image_uri_forbidden"), ("v4", "bad_image")]
    url = f"http://{settings.http_host}:{settings.http_port}/items/lamp"
    wait_until(lambda: _item_title(url) == "Brass desk lamp with dimmer", 60, "the last usable version stored")


def _item_title(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return json.loads(reply.read())["payload"]["title"]
    except urllib.error.HTTPError:
        return None


def _post(settings: Settings, body: bytes) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(f"http://{settings.http_host}:{settings.http_port}/recommend", data=body,
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_endpoint_caps_bodies_and_explains_rejections(guarded: tuple[Settings, LocalStack]) -> None:
    settings, _ = guarded
    status, body = _post(settings, b'{"request_id": "r1", "user_id": "u1", "k": 3, "query": "' + b"x" * 5000 + b'"}')
    assert (status, body["error"]) == (413, "oversize")
    for raw, reason in [
        (b'{"request_id": "r1", "user_id": ', "bad_json"),
        (b"\xff\xfe", "bad_utf8"),
        (b"[]", "not_object"),
        (b'{"request_id": "r1", "user_id": "u1", "k": 0}', "invalid_value"),
        (b'{"request_id": "r1", "user_id": "u1", "k": "ten"}', "wrong_type"),
        (b'{"request_id": "r1", "user_id": "u1", "admin": true}', "unknown_field"),
        (b'{"request_id": "r1", "user_id": "u1; rm -rf /"}', "invalid_value"),
        (b'{"request_id": "r1", "user_id": "u1", "image": {"image_uri": "../secret.jpg"}}', "image_uri_forbidden"),
        (b'{"request_id": "r1", "user_id": "u1", "image": {"image_uri": "http://127.0.0.1:9/x.jpg"}}',
         "image_uri_forbidden"),
    ]:
        status, body = _post(settings, raw)
        assert (status, body.get("error")) == (400, reason), raw
        assert body["detail"]
    status, body = _post(settings, b'{"request_id": "r2", "user_id": "u1", "k": 3}')
    assert status == 200 and body["request_id"] == "r2"


# Deserialising untrusted bytes with pickle executes code: the serving path must never do it.
UNSAFE_LOADERS = {("pickle", "load"), ("pickle", "loads"), ("torch", "load"), ("joblib", "load"),
                  ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
                  ("marshal", "load"), ("marshal", "loads"), ("shelve", "open")}


def _unsafe_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in {m for m, _ in UNSAFE_LOADERS}:
            found += [f"{path}:{node.lineno} from {node.module} import {a.name}" for a in node.names
                      if (node.module, a.name) in UNSAFE_LOADERS]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
            keywords = {k.arg: k.value for k in node.keywords}
            if (name, node.func.attr) in UNSAFE_LOADERS:
                found.append(f"{path}:{node.lineno} {name}.{node.func.attr}")
            if node.func.attr == "load" and name in {"np", "numpy"} and "allow_pickle" in keywords:
                found.append(f"{path}:{node.lineno} numpy.load(allow_pickle=...)")
    return found


def test_serving_code_never_unpickles() -> None:
    found = [hit for folder in ("core", "model/serving", "stream", "exporter")
             for path in sorted((REPO / folder).rglob("*.py"))
             for hit in _unsafe_calls(path)]
    assert found == []


def test_training_code_loads_torch_weights_only() -> None:
    offending = []
    for path in sorted(p for folder in ("model", "finetune") for p in (REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                weights_only = {k.arg: k.value for k in node.keywords}.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    offending.append(f"{path}:{node.lineno}")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pickle":
                offending.append(f"{path}:{node.lineno} pickle.{node.attr}")
    assert offending == []


# -- the broker loses everything -------------------------------------------------------------------


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker for this test alone: it is stopped and started again."""
    broker = EmbeddedBroker(free_port(), log_path=tmp_path / "broker.log").start()
    yield broker
    broker.stop()


def _health(settings: Settings) -> tuple[int, dict[str, object]]:
    url = f"http://{settings.http_host}:{settings.http_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_worker_survives_a_broker_that_restarts_empty(settings: Settings, own_broker: EmbeddedBroker,
                                                      tmp_path: Path) -> None:
    settings = settings.model_copy(update={"bootstrap_servers": own_broker.bootstrap})
    before = _clicks(3, 10, tag="before", start=time.time())
    with LocalStack(settings, log_dir=tmp_path / "logs", start_broker=False) as stack:
        _catalogue_applied(settings, stack.worker)
        publish(settings, before)
        wait_until(lambda: _all_applied(settings, _counts(before)), 180, "clicks before the outage applied")

        own_broker.stop()  # the producer is idle; the memory-only broker forgets every topic and offset
        wait_until(lambda: _health(settings)[0] == 503, 30, "/health reporting the outage")
        status, body = _health(settings)
        assert body["broker"] is False and body["store"] is True and body["healthy"] is False
        assert stack.worker.metric("streamrec_worker_healthy") == 0
        assert ask_http(settings, "before-u0", k=5).items  # the store still serves recommendations

        own_broker.start()  # same port, nothing in it
        assert asyncio.run(ensure_topics(settings))  # as `streamrec broker` does on start: all topics created anew
        wait_until(lambda: _health(settings)[0] == 200, 60, "/health healthy again")
        assert stack.worker.metric("streamrec_worker_healthy") == 1

        # New events start again at offset 0: those of known users must not be
        # mistaken for replays of the old log, and a new user's must be applied too.
        after = _clicks(3, 5, tag="before", start=time.time() + 1)
        after = [e.model_copy(update={"event_id": f"after-{e.event_id}"}) for e in after]
        newcomer = _clicks(1, 4, tag="newcomer", start=time.time() + 1)
        publish(settings, after + newcomer)
        expected = {user: _counts(before)[user] + count for user, count in _counts(after).items()}
        wait_until(lambda: _all_applied(settings, {**expected, **_counts(newcomer)}), 120,
                   "clicks after the restart applied")
        assert {user: _applied_count(settings, user) for user in expected} == expected
        publish_raw(settings, [(settings.topic("clicks"), b"k", b"not json")])
        assert [letter.reason for letter in dead_letters(settings, 1, timeout_s=60)] == ["bad_json"]
        assert ask_kafka(settings, "newcomer-u0", k=5).items
        assert stack.worker.process is not None and stack.worker.process.poll() is None

        # A later restart of the worker resumes from offsets of the new log, not
        # from positions remembered from the old one.
        stack.worker.stop()
        stack.worker.start().wait_ready()
        later = [e.model_copy(update={"event_id": f"later-{e.event_id}", "event_time": e.event_time + 10})
                 for e in after + newcomer]
        publish(settings, later)
        final = {user: count + _counts(later).get(user, 0)
                 for user, count in {**expected, **_counts(newcomer)}.items()}
        wait_until(lambda: _all_applied(settings, final), 180, "clicks after the worker restart applied")
        assert {user: _applied_count(settings, user) for user in final} == final
