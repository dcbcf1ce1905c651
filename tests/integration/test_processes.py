"""Several worker processes (``streamrec worker --processes 2``) on the real broker and store.

Process i of N owns the partitions p mod N == i of the user-keyed topics and
keeps those users in a store of its own; HTTP lands on any process and reaches
the owner; trending and co-visits learn from every click whichever process
applied it; a killed process is restarted and the state comes out exact.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench import movielens
from bench.common import read_store
from bench.stack import LocalStack, WorkerProcess, free_port, process_request
from core.events import ClickEvent, RecRequest, RecResponse
from core.settings import Settings
from exporter.metrics import PROCESS_LABEL
from stream.broker import ensure_topics
from stream.partitions import Ownership
from stream.user_table import PeerTables, table_path
from tests.integration.helpers import ask_http, publish, user_state, wait_until
from tests.integration.test_reliability import (
    _counts,
    _expected_sequences,
    _expected_signals,
)

pytestmark = pytest.mark.integration
CATALOGUE = movielens.catalog_events()[:200]
ITEM_IDS = [item.item_id for item in CATALOGUE]
PARTITIONS = 4


@pytest.fixture
def four(settings: Settings) -> Settings:
    # No decay within a test: two runs that learnt the same clicks at different
    # wall times rank trending alike.
    return settings.model_copy(update={"partitions": PARTITIONS, "trending_half_life_s": 1e9})


def _per_process(worker: WorkerProcess, topic: str) -> list[float]:
    return worker.metric_per_process("streamrec_events_processed_total", {"topic": topic})


def _catalogue_everywhere(settings: Settings, workers: list[WorkerProcess]) -> None:
    publish(settings, CATALOGUE)
    for worker in workers:
        # Every process applies the whole catalogue.
        wait_until(lambda w=worker: min(_per_process(w, "catalog")) >= len(CATALOGUE), 120, "catalogue applied")


def _trails(users: list[str], *, start: float, tag: str) -> list[ClickEvent]:
    """Each user walks one of three trails of items: shared transitions for the co-visits."""
    trails = [ITEM_IDS[10 * t:10 * t + 8] for t in range(3)]
    events = []
    for step in range(8):
        for n, user in enumerate(users):
            trail = trails[n % 3]
            item = trail[(step + n) % len(trail)]
            events.append(ClickEvent(event_id=f"{tag}-{user}-{step}", event_time=start + len(events) * 0.001,
                                     user_id=user, item_id=item, action="purchase" if step % 3 else "click"))
    return events


def _ranking_differences(one: list[tuple[float, str]], other: list[tuple[float, str]],
                         tolerance: float = 1e-4) -> list[str]:
    """How two top-k lists differ beyond float summation order; [] when they agree.

    Two processes add the same lessons in another order, so a score may differ
    in its last digits, and items whose scores tie at the cut may be swapped for
    one another. Anything else (an item missing above the cut, a score off by
    more than ``tolerance``) is a difference.
    """
    if len(one) != len(other):
        return [f"{len(one)} items against {len(other)}"]
    problems = []
    for (score, item), (other_score, other_item) in zip(sorted(one, reverse=True), sorted(other, reverse=True)):
        if abs(score - other_score) > tolerance:
            problems.append(f"{item} {score:.5f} against {other_item} {other_score:.5f}")
    scores, other_scores = dict((i, s) for s, i in one), dict((i, s) for s, i in other)
    cut = min(min(scores.values()), min(other_scores.values()))
    for item in scores.keys() ^ other_scores.keys():
        score = scores.get(item, other_scores.get(item))
        if score > cut + tolerance:
            problems.append(f"{item} ({score:.5f}) is in one list only, above the cut {cut:.5f}")
    return problems


def _ask(address: str, user: str, *, pass_on: bool) -> tuple[int, bytes]:
    request = RecRequest(request_id=uuid.uuid4().hex, user_id=user, k=10)
    return process_request(address, "POST", "/recommend", request.to_bytes(), pass_on=pass_on)


def test_each_process_owns_its_partitions_and_answers_for_every_user(four: Settings, tmp_path: Path) -> None:
    with LocalStack(four, log_dir=tmp_path / "logs", start_broker=False, processes=2) as stack:
        worker = stack.worker
        ownership = worker.ownership
        _catalogue_everywhere(four, [worker])
        users = [f"own-u{n}" for n in range(16)]
        owner = {user: ownership.owner_of(user.encode(), PARTITIONS) for user in users}
        assert set(owner.values()) == {0, 1}
        events = _trails(users, start=time.time(), tag="own")
        publish(four, events)
        wait_until(lambda: sum(_per_process(worker, "clicks")) >= len(events), 120, "every click applied")
        # Each process applied exactly the clicks of the users it owns.
        expected = [sum(1 for e in events if owner[e.user_id] == i) for i in range(2)]
        assert _per_process(worker, "clicks") == expected

        sequences = _expected_sequences(events, four.user_sequence_length)
        # The process that does not own a user answers it from the owner's shared user table,
        # with trending and co-visits it learnt from the owner's lessons.
        wait_until(worker.lessons_exchanged, 60, "every lesson learnt by the other process")
        for user in users:
            other = ownership.socket_address(1 - owner[user])
            # Asked on the process that does not hold the user: passed on to the owner.
            status, body = process_request(other, "GET", f"/users/{user}", pass_on=True)
            assert status == 200, body
            assert json.loads(body)["items"] == sequences[user]
            status, body = _ask(other, user, pass_on=True)
            assert status == 200, body
            passed_on = [item.item_id for item in RecResponse.model_validate_json(body).items]
            # The process that does not hold the user, answering itself, knows nothing of it.
            status, body = process_request(other, "GET", f"/users/{user}")
            assert status == 404, body
            status, body = _ask(ownership.socket_address(owner[user]), user, pass_on=False)
            direct = [item.item_id for item in RecResponse.model_validate_json(body).items]
            assert passed_on == direct
            assert len(direct) == 10 and not set(direct) & set(sequences[user])
            # And on the shared port, whichever process takes the connection.
            assert user_state(four, user)["items"] == sequences[user]
        # Every user was answered where it was asked; a user no process has applied is passed on.
        answered = worker.metric_per_process("streamrec_peer_user_requests_total", {"answered": "here"})
        assert answered == [sum(1 for user in users if owner[user] == 1 - i) for i in range(2)]
        assert worker.metric_per_process("streamrec_user_table_users") == \
            [sum(1 for user in users if owner[user] == i) for i in range(2)]
        stranger = next(f"own-new{n}" for n in range(100) if ownership.owner_of(f"own-new{n}".encode(), PARTITIONS))
        status, body = _ask(ownership.socket_address(0), stranger, pass_on=True)
        assert status == 200 and RecResponse.model_validate_json(body).items, body
        assert worker.metric_per_process("streamrec_peer_user_requests_total", {"answered": "passed_on"})[0] == 1
        health = worker.health()
        assert health is not None and health["healthy"] and health["ready"]
        # One scrape of the shared port holds every process's series, whichever process takes it.
        for _ in range(4):
            with urllib.request.urlopen(f"http://{four.http_host}:{four.http_port}/metrics", timeout=15) as reply:
                samples = [s for family in text_string_to_metric_families(reply.read().decode())
                           for s in family.samples]
            scraped = {(s.labels.get(PROCESS_LABEL), s.value) for s in samples
                       if s.name == "streamrec_events_processed_total" and s.labels.get("topic") == "clicks"}
            assert scraped == {("0", expected[0]), ("1", expected[1])}
            # Each process runs numpy's BLAS on one thread (STREAMREC_BLAS_THREADS).
            assert {(s.labels.get(PROCESS_LABEL), s.value) for s in samples
                    if s.name == "streamrec_blas_threads"} == {("0", 1.0), ("1", 1.0)}
            # Each process froze its start-up objects out of the garbage collector's walks
            # (STREAMREC_GC_FREEZE_S), and observed that collection's pause.
            frozen = {s.labels.get(PROCESS_LABEL): s.value for s in samples if s.name == "streamrec_gc_frozen_objects"}
            assert set(frozen) == {"0", "1"} and min(frozen.values()) > 10_000, frozen
            assert {s.labels.get(PROCESS_LABEL) for s in samples
                    if s.name == "streamrec_gc_pause_seconds_count" and s.labels.get("generation") == "2"
                    and s.value >= 1} == {"0", "1"}


def test_two_processes_recommend_as_one_does(four: Settings, tmp_path: Path) -> None:
    """Same events, same recommendations: trending and co-visits learn from every click."""
    two = four.model_copy(update={"app_id": four.app_id + "-two", "data_dir": tmp_path / "two",
                                  "http_port": free_port()})
    with LocalStack(four, log_dir=tmp_path / "logs-one", start_broker=False) as one, \
            LocalStack(two, log_dir=tmp_path / "logs-two", start_broker=False, processes=2) as pair:
        _catalogue_everywhere(four, [one.worker, pair.worker])
        users = [f"glob-u{n}" for n in range(12)]
        events = _trails(users, start=time.time(), tag="glob")
        publish(four, events)
        counts = _counts(events)

        def applied(settings: Settings) -> bool:
            return all((user_state(settings, user) or {}).get("applied_count") == count
                       for user, count in counts.items())

        wait_until(lambda: applied(four) and applied(two), 120, "every click applied by both workers")
        # Users with a history, and users with none (trending alone ranks for them).
        asked = [*users, "glob-new-a", "glob-new-b", "glob-new-c"]

        def answers(settings: Settings) -> dict[str, list[tuple[float, str]]]:
            return {user: [(item.score, item.item_id) for item in ask_http(settings, user, k=10).items]
                    for user in asked}

        # A lesson reaches the other process a moment after the click is applied.
        wait_until(pair.worker.lessons_exchanged, 60, "every lesson learnt by the other process")
        single, double = answers(four), answers(two)
        assert {user: _ranking_differences(single[user], double[user]) for user in asked} == {user: [] for user in asked}
    # Each process's own store restores the same global signals the single worker holds.
    reference = read_store(four)
    assert reference.trending is not None and reference.covisit is not None
    totals = {item: total for item, _, total in reference.trending.entries()[1]}
    rows = {source: learnt for source, learnt, _ in reference.covisit.entries()}
    for index in range(2):
        snapshot = read_store(Ownership(index, 2, two.data_dir).settings_for(two))
        assert snapshot.trending is not None and snapshot.covisit is not None
        assert {item: total for item, _, total in snapshot.trending.entries()[1]} == pytest.approx(totals)
        assert {source: learnt for source, learnt, _ in snapshot.covisit.entries()} == pytest.approx(rows)
    assert any(single[user] for user in asked)


def test_a_killed_process_is_restarted_and_nothing_is_lost_or_applied_twice(four: Settings,
                                                                             tmp_path: Path) -> None:
    settings = four.model_copy(update={"signals_snapshot_every": 2, "batch_size": 100})
    asyncio.run(ensure_topics(settings))
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log", processes=2).start()
    try:
        worker.wait_ready()
        _catalogue_everywhere(settings, [worker])
        users = [f"kill-u{n}" for n in range(30)]
        events = [ClickEvent(event_id=f"kill-{n}", event_time=time.time() + n * 0.001, user_id=users[n % 30],
                             item_id=ITEM_IDS[(n % 30 * 7 + n // 30) % len(ITEM_IDS)]) for n in range(1200)]
        publish(settings, events[:600])
        wait_until(lambda: worker.process_metric(1, "streamrec_events_processed_total", {"topic": "clicks"}) > 0,
                   60, "process 1 applying clicks")
        killed = worker.kill_process(1)
        publish(settings, events[600:])
        wait_until(lambda: worker.pids().get(1) not in (None, killed), 60, "process 1 restarted")
        worker.wait_ready()
        counts = _counts(events)
        wait_until(lambda: all((user_state(settings, u) or {}).get("applied_count") == c for u, c in counts.items()),
                   300, "every click applied after the restart")
        wait_until(worker.lessons_exchanged, 60, "every lesson learnt by the other process")
        # The restarted process emptied its shared user table, refilled it from its store and went
        # on writing: the other process reads each user as its owner holds it now.
        sequences = _expected_sequences(events, settings.user_sequence_length)
        tables = PeerTables(settings.data_dir)
        try:
            shared = {user: tables.read(Ownership(0, 2).owner_of(user.encode(), PARTITIONS), user) for user in users}
        finally:
            tables.close()
        assert {user: s and s.items for user, s in shared.items()} == {user: sequences[user] for user in users}
    finally:
        worker.stop()
    assert not [path for path in (table_path(settings.data_dir, i) for i in range(2)) if path.exists()]
    trending, taught, rows = _expected_signals(events, settings)
    owner = {user: Ownership(0, 2).owner_of(user.encode(), PARTITIONS) for user in users}
    expected = _expected_sequences(events, settings.user_sequence_length)
    for index in range(2):
        snapshot = read_store(Ownership(index, 2, settings.data_dir).settings_for(settings))
        mine = {user for user in users if owner[user] == index}
        assert set(snapshot.users) == mine, "a process holds exactly the users it owns"
        for user in mine:
            payload = snapshot.users[user].payload
            assert payload["applied_count"] == counts[user], f"{user}: applied {payload['applied_count']}"
            assert payload["items"] == expected[user]
        assert snapshot.trending is not None and snapshot.covisit is not None
        assert {item: total for item, _, total in snapshot.trending.entries()[1]} == pytest.approx(trending)
        assert {source: learnt for source, learnt, _ in snapshot.covisit.entries()} == pytest.approx(taught)
        assert {source: dict(row) for source, _, row in snapshot.covisit.entries()} == rows


def test_compose_runs_two_replicas_that_split_the_partitions_and_share_lessons() -> None:
    import shutil
    import subprocess

    import yaml

    repo = Path(__file__).resolve().parents[2]
    compose = repo / "docker-compose.yml"
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is not installed")
    result = subprocess.run([tool, "-f", str(compose), "config", "-q"], cwd=repo, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load(compose.read_text())["services"]
    replicas = [services["worker"], services["worker-2"]]
    environments = [replica["environment"] for replica in replicas]
    # One consumer group (Kafka splits the partitions), one Qdrant server (state moves with them) ...
    assert {env["STREAMREC_APP_ID"] for env in environments} == {"streamrec"}
    assert all(env["STREAMREC_STORE_BACKEND"] == "qdrant" for env in environments)
    assert all(replica["command"][-2:] == ["--processes", "1"] for replica in replicas)
    # ... a trending/co-visit log each, and the topic on which they share lessons.
    assert sorted(env["STREAMREC_REPLICA"] for env in environments) == ["0", "1"]
    assert "--topic signals.lessons --partitions 1" in services["kafka-init"]["command"][0]
    # Prometheus finds both replicas under one name.
    assert services["worker-2"]["networks"]["default"]["aliases"] == ["worker"]


def test_no_answer_recommends_what_the_user_already_has_while_clicks_stream(four: Settings,
                                                                            tmp_path: Path) -> None:
    """Whichever process takes the connection, an answer never holds an item the user's
    applied history had when the request was sent, while clicks that make those very items
    trend are being applied."""
    import threading

    with LocalStack(four, log_dir=tmp_path / "logs", start_broker=False, processes=2) as stack:
        _catalogue_everywhere(four, [stack.worker])
        users = [f"fresh-u{n}" for n in range(6)]
        shoppers = [f"fresh-s{n}" for n in range(10)]
        bursts = [ITEM_IDS[40 + 3 * b:43 + 3 * b] for b in range(6)]
        done = threading.Event()

        def stream() -> None:
            try:
                for b, burst in enumerate(bursts):
                    events = [ClickEvent(event_id=f"fresh-{b}-{who}-{item}", event_time=time.time(), user_id=who,
                                         item_id=item, action="purchase")
                              for who in [*users, *shoppers] for item in burst]
                    publish(four, events)
                    time.sleep(0.5)
            finally:
                done.set()

        def _history(user: str) -> list[str]:  # from the owner, whichever process would answer
            owner = stack.worker.ownership.owner_of(user.encode(), PARTITIONS)
            status, body = process_request(stack.worker.ownership.socket_address(owner), "GET", f"/users/{user}")
            return json.loads(body)["items"] if status == 200 else []

        producer = threading.Thread(target=stream, daemon=True)
        producer.start()
        checked = seen = 0
        while not done.is_set() or checked < 60:
            for user in users:
                before = set(_history(user))
                answer = [item.item_id for item in ask_http(four, user, k=10).items]
                assert not before & set(answer), f"{user} was offered {sorted(before & set(answer))} it already has"
                checked += 1
                seen += bool(before)
        producer.join()
        assert seen > 0, "no request was answered with a history to check against"
        # Some were answered by the process that does not own the user, from the owner's shared table.
        assert sum(stack.worker.metric_per_process("streamrec_peer_user_requests_total", {"answered": "here"})) > 0


def test_more_processes_than_partitions_are_refused_at_start(settings: Settings) -> None:
    from core.errors import ConfigError
    from stream.worker import run_worker

    with pytest.raises(ConfigError, match="3 worker processes need at least as many partitions, but the "
                                          "user-keyed topics have 2"):
        run_worker(settings, processes=3)  # the fixture's topics have 2 partitions
    assert not (settings.data_dir / "processes.json").exists()


def test_the_request_benches_seed_every_process_and_count_what_each_answers(four: Settings,
                                                                           tmp_path: Path) -> None:
    """``bench serve --processes 2``'s set-up: the bulk-loaded catalogue is in every process's
    store, each seeded user is kept by its owner alone, and each process counts the requests
    it answered."""
    from bench.common import process_owning, process_settings
    from bench.ingest import collection_specs, open_bench_store
    from bench.serve import PerProcess, http_load, prepare, user_vectors_sample

    args = argparse.Namespace(items=300, users=30, clicks_per_user=4, clients=2, seed=3, processes=2)
    prepared = prepare(args, four, tmp_path)
    try:
        with PerProcess(prepared.worker, "http") as share:
            asyncio.run(http_load(four, prepared.user_ids, clients=2, requests=60, seed=1))
        peer_users = {answered: prepared.worker.metric_per_process("streamrec_peer_user_requests_total",
                                                                   {"answered": answered})
                      for answered in ("here", "passed_on")}
    finally:
        prepared.worker.stop()
    owner = {user: process_owning(user, four, 2) for user in prepared.user_ids}
    assert set(owner.values()) == {0, 1}
    # Each request is answered by the process its connection landed on: every seeded user is in
    # its owner's shared user table, so none is passed on.
    assert sum(share.answered) == 60
    assert sum(peer_users["here"]) > 0 and peer_users["passed_on"] == [0, 0]
    assert len(share.figures("http")["http_cpu_share_per_process"]) == 2
    for index, own in enumerate(process_settings(four, 2)):
        store = open_bench_store(own)
        try:
            specs = collection_specs(own)
            assert len(list(store.scroll_ids(specs["items"].name))) == 300
            held = set(store.scroll_ids(specs["users"].name))
        finally:
            store.close()
        assert held == {user for user, i in owner.items() if i == index}
    users, vectors = user_vectors_sample(four, 100, seed=0, processes=2)
    assert sorted(users) == prepared.user_ids and vectors.shape[0] == len(users)
