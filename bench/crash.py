"""``streamrec bench crash``: SIGKILL the worker while clicks stream in; the state must come out exact.

Two stacks on one embedded broker consume the same click stream (real
MovieLens-100k item ids, synthetic users): a reference worker that is never
interrupted, and a worker killed with SIGKILL at random moments and restarted,
as a supervisor would, while the producer keeps publishing. Afterwards every
user's stored state (sequence, actions, applied offsets and times, recent
event ids, applied count, user vector) and every catalogue item must equal the
reference, and every user must have applied each of their events exactly once.
So must the signals a restart restores (``stream.signals``): each item's
undecayed trending weight, and each co-visit row's taught weight and, where
the two runs' learning orders cannot differ, its entries (``covisit_differences``).

A run has caught up when, for every partition, the user who owns the last
message the broker acknowledged there has applied that offset (read back over
GET /users/{id}); the broker's end offsets are never consulted.

``--processes N`` runs the crashed stack as ``streamrec worker --processes N``
(the reference stays one process): a kill SIGKILLs one worker process (each
in turn), and the supervisor restarts it. Each process's store must then hold
exactly its own users, a catalogue equal to the reference's, and the signals
of every click (each process learns the others' lessons).
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import movielens
from bench.common import (
    HANDLED_METRICS,
    RecordingPublisher,
    StoreSnapshot,
    bench_parser,
    covisit_differences,
    handled,
    metric_totals,
    mismatched,
    paced,
    read_store,
    report,
    stack_settings,
    start_broker,
    start_worker,
    trending_differences,
    user_state,
    wait_for,
    work_dir,
)
from bench.stack import WorkerProcess
from core.events import CatalogItem, ClickEvent
from core.settings import Settings, load_settings
from stream.broker import EmbeddedBroker, ensure_topics
from stream.partitions import Ownership

ACTIONS = ("view", "click", "add_to_cart", "purchase")
ACTION_WEIGHTS = (4, 8, 2, 1)
CATCH_UP_TIMEOUT_S = 1800.0
STALL_S = 120.0
DUPLICATES_METRIC = "streamrec_events_duplicate_total"
# A paced producer with a 5 ms linger writes record batches of one or two
# clicks per partition; the embedded broker served such a log of ~100k batches
# so slowly that consumers starved (see docs/reliability.md). 50 ms batches
# them as a bulk producer would.
PRODUCER_LINGER_MS = 50


def click_stream(item_ids: list[str], weights: list[int], *, events: int, users: int, seed: int,
                 start_time: float) -> list[ClickEvent]:
    """``events`` clicks of ``users`` users on real items, popular items more often; times increase."""
    rng = random.Random(seed)
    user_ids = [f"cu{n}" for n in range(users)]
    chosen_users = rng.choices(user_ids, k=events)
    chosen_items = rng.choices(item_ids, weights=weights, k=events)
    chosen_actions = rng.choices(ACTIONS, weights=ACTION_WEIGHTS, k=events)
    return [
        ClickEvent(event_id=f"crash-{seed}-{n}", event_time=start_time + n * 0.001, user_id=user,
                   item_id=item, action=action)  # type: ignore[arg-type]
        for n, (user, item, action) in enumerate(zip(chosen_users, chosen_items, chosen_actions))
    ]


@dataclass
class Run:
    """One stack's consumption of the stream."""

    settings: Settings
    log_path: Path
    kills: int = 0
    caught_up: bool = False
    seconds: float = 0.0
    snapshot: StoreSnapshot | None = None
    kill_points: list[float] = field(default_factory=list)  # messages handled by the killed process
    redelivered_skipped: int = 0  # deliveries skipped as already applied, over all worker processes
    processes: int = 1
    killed: list[int] = field(default_factory=list)  # which worker process each kill hit
    per_process: list[StoreSnapshot] = field(default_factory=list)  # with N > 1, each process's store
    handled: list[float] = field(default_factory=list)  # per worker process, at the end of the run


def _publish(settings: Settings, catalogue: list[CatalogItem] | None, clicks: list[ClickEvent],
             rate: float | None, publisher_box: dict[str, object]) -> None:
    """Publish (paced when ``rate``); leaves the RecordingPublisher in ``publisher_box``."""

    async def run() -> None:
        async with RecordingPublisher(settings, linger_ms=PRODUCER_LINGER_MS) as publisher:
            publisher_box["publisher"] = publisher
            for item in catalogue or []:
                await publisher.publish(item)
            await publisher.settle()
            async for event in paced(clicks, rate):
                await publisher.publish(event, tag=event.user_id)
            await publisher.settle()

    try:
        asyncio.run(run())
    except BaseException as exc:  # surfaced by the caller
        publisher_box["error"] = exc
    publisher_box["done"] = True


def _publish_catalogue(settings: Settings, worker: WorkerProcess, catalogue: list[CatalogItem]) -> None:
    box: dict[str, object] = {}
    _publish(settings, catalogue, [], None, box)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]

    def applied() -> bool:  # by every process: each holds the whole catalogue
        return all(worker.process_metric(i, "streamrec_events_processed_total", {"topic": "catalog"})
                   >= len(catalogue) for i in range(worker.processes)) if worker.processes > 1 else \
            worker.metric("streamrec_events_processed_total", {"topic": "catalog"}) >= len(catalogue)

    done = wait_for(applied, timeout_s=600, progress=lambda: handled(worker))
    if not done:
        raise RuntimeError("the catalogue was not applied; see the worker log")


def _caught_up(settings: Settings, publisher: RecordingPublisher) -> bool:
    clicks = settings.topic("clicks")
    for (topic, partition), last in publisher.tail.items():
        if topic != clicks:
            continue
        state = user_state(settings, str(last.tag))
        if state is None or state.get("applied", {}).get(f"{topic}/{partition}", -1) < last.offset:
            return False
    return True


def _start(run: Run) -> WorkerProcess:
    if run.processes == 1:
        return start_worker(run.settings, run.log_path)
    asyncio.run(ensure_topics(run.settings))
    worker = WorkerProcess(run.settings, log_path=run.log_path, processes=run.processes).start()
    try:
        worker.wait_ready(180.0)
    except BaseException:
        worker.kill()
        raise
    return worker


def _kill_one_process(run: Run, worker: WorkerProcess) -> None:
    """SIGKILL one worker process of a supervised worker; return once the supervisor has restarted it."""
    index = run.kills % run.processes  # each process in turn, at a random moment
    text = worker.process_metrics_text(index)
    run.kill_points.append(sum(_metric_sum(text, name) for name in HANDLED_METRICS))
    run.redelivered_skipped += int(_metric_sum(text, DUPLICATES_METRIC))
    killed = worker.kill_process(index)
    run.kills += 1
    run.killed.append(index)
    if not wait_for(lambda: worker.pids().get(index) not in (None, killed) and worker.process_ready(index),
                    timeout_s=180):
        raise RuntimeError(f"worker process {index} was not restarted; see {run.log_path}")


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if not line.startswith("#") and line.split("{")[0].split(" ")[0] == name)


def run_stack(run: Run, catalogue: list[CatalogItem], clicks: list[ClickEvent], *, kills: int, rate: float | None,
              rng: random.Random) -> None:
    if run.processes > 1:
        _run_processes(run, catalogue, clicks, kills=kills, rate=rate, rng=rng)
        return
    started = time.perf_counter()
    workers = [start_worker(run.settings, run.log_path)]
    try:
        _publish_catalogue(run.settings, workers[-1], catalogue)

        def kill() -> None:
            totals = metric_totals(workers[-1], (*HANDLED_METRICS, DUPLICATES_METRIC))
            run.kill_points.append(sum(totals[name] for name in HANDLED_METRICS))
            run.redelivered_skipped += int(totals[DUPLICATES_METRIC])
            workers[-1].kill()
            run.kills += 1
            time.sleep(rng.uniform(0.0, 1.0))
            workers.append(start_worker(run.settings, run.log_path))

        publisher = _publish_with_kills(run, clicks, rate, kills, rng, kill)
        run.caught_up = wait_for(lambda: _caught_up(run.settings, publisher), timeout_s=CATCH_UP_TIMEOUT_S,
                                 progress=lambda: handled(workers[-1]), stall_s=STALL_S)
        run.seconds = time.perf_counter() - started
        run.redelivered_skipped += int(workers[-1].metric(DUPLICATES_METRIC))
    finally:
        workers[-1].stop()
    run.snapshot = read_store(run.settings)


def _publish_with_kills(run: Run, clicks: list[ClickEvent], rate: float | None, kills: int,
                        rng: random.Random, kill: Callable[[], None]) -> RecordingPublisher:
    """Publish ``clicks`` from a thread while calling ``kill`` ``kills`` times; the finished publisher."""
    box: dict[str, object] = {}
    producer = threading.Thread(target=_publish, args=(run.settings, None, clicks, rate, box), daemon=True)
    producer.start()
    publish_seconds = len(clicks) / rate if rate else 0.0
    for _ in range(kills):
        # Spread the kills over the publishing window, each at a random moment.
        time.sleep(rng.uniform(1.0, max(2.0, publish_seconds / (kills + 1))))
        kill()
    producer.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    publisher = box["publisher"]
    assert isinstance(publisher, RecordingPublisher)
    return publisher


def _run_processes(run: Run, catalogue: list[CatalogItem], clicks: list[ClickEvent], *, kills: int,
                   rate: float | None, rng: random.Random) -> None:
    """``run_stack`` for a supervised worker of ``run.processes`` processes."""
    started = time.perf_counter()
    worker = _start(run)
    try:
        _publish_catalogue(run.settings, worker, catalogue)
        publisher = _publish_with_kills(run, clicks, rate, kills, rng, lambda: _kill_one_process(run, worker))
        run.caught_up = wait_for(lambda: _caught_up(run.settings, publisher), timeout_s=CATCH_UP_TIMEOUT_S,
                                 progress=lambda: handled(worker), stall_s=STALL_S)
        # Every process must also have learnt the others' lessons before the stores are read.
        run.caught_up = run.caught_up and wait_for(worker.lessons_exchanged, timeout_s=120)
        run.seconds = time.perf_counter() - started
        run.redelivered_skipped += int(worker.metric(DUPLICATES_METRIC))
        run.handled = [sum(_metric_sum(worker.process_metrics_text(i), name) for name in HANDLED_METRICS)
                       for i in range(run.processes)]
    finally:
        worker.stop()
    run.per_process = [read_store(Ownership(i, run.processes, run.settings.data_dir).settings_for(run.settings))
                       for i in range(run.processes)]
    users = {user: hit for part in run.per_process for user, hit in part.users.items()}
    half = {kind: frozenset().union(*(part.half.get(kind, frozenset()) for part in run.per_process))
            for kind in ("users", "items")}
    first = run.per_process[0]
    run.snapshot = StoreSnapshot(users=users, items=first.items, half=half, trending=first.trending,
                                 covisit=first.covisit)


def misplaced_users(run: Run, partitions: int) -> int:
    """Users stored by a process other than their partition's owner (or by more than one)."""
    wrong = 0
    for index, part in enumerate(run.per_process):
        ownership = Ownership(index, run.processes)
        wrong += sum(1 for user in part.users if ownership.owner_of(user.encode(), partitions) != index)
    return wrong


def exactness(snapshot: StoreSnapshot, clicks: list[ClickEvent]) -> tuple[int, int]:
    """(lost, double_applied) from each user's applied count against the events sent."""
    expected = Counter(event.user_id for event in clicks)
    lost = double = 0
    for user_id in expected.keys() | snapshot.users.keys():
        hit = snapshot.users.get(user_id)
        applied = int(hit.payload.get("applied_count", 0)) if hit else 0
        lost += max(0, expected[user_id] - applied)
        double += max(0, applied - expected[user_id])
    return lost, double


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("crash", __doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--processes", type=int, default=1,
                        help="worker processes of the crashed stack (a kill hits one; the reference runs one)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="clicks/s published during the kills (default: spread over ~25 s per kill)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    base = load_settings()
    rate = args.rate or max(200.0, args.events / (25.0 * (args.kills + 1)))
    catalogue = movielens.catalog_events()
    popularity = Counter(r.item_id for r in movielens.ratings())
    item_ids = [item.item_id for item in catalogue]
    clicks = click_stream(item_ids, [popularity[i] + 1 for i in item_ids], events=args.events,
                          users=args.users, seed=args.seed, start_time=time.time())
    rng = random.Random(args.seed)
    with work_dir(args.work_dir, "crash") as folder:
        broker: EmbeddedBroker = start_broker(folder / "logs")
        try:
            reference = Run(stack_settings(base, broker, folder / "reference", "reference",
                                           partitions=args.partitions), folder / "logs" / "reference-worker.log")
            print(f"reference run: {len(clicks)} clicks of {args.users} users, no kills ...", flush=True)
            run_stack(reference, catalogue, clicks, kills=0, rate=None, rng=rng)
            crashed = Run(stack_settings(base, broker, folder / "crashed", "crashed",
                                         partitions=args.partitions), folder / "logs" / "crashed-worker.log",
                          processes=args.processes)
            print(f"crash run: {args.kills} SIGKILLs while publishing at {rate:.0f} clicks/s, "
                  f"{args.processes} worker process(es) ...", flush=True)
            run_stack(crashed, catalogue, clicks, kills=args.kills, rate=rate, rng=rng)
        finally:
            broker.stop()
    assert reference.snapshot is not None and crashed.snapshot is not None
    lost, double = exactness(crashed.snapshot, clicks)
    reference_lost, reference_double = exactness(reference.snapshot, clicks)
    assert reference.snapshot.trending is not None and crashed.snapshot.trending is not None
    assert reference.snapshot.covisit is not None and crashed.snapshot.covisit is not None
    result = {
        "users": len(crashed.snapshot.users),
        "mismatched_users": len(mismatched(reference.snapshot.users, crashed.snapshot.users,
                                           half=reference.snapshot.half.get("users", frozenset()),
                                           expected_prefix=reference.settings.topic_prefix,
                                           actual_prefix=crashed.settings.topic_prefix)),
        "lost": lost,
        "double_applied": double,
        "kills": crashed.kills,
        "events": len(clicks),
        "seconds": round(time.perf_counter() - started, 1),
        "catalogue_items": len(crashed.snapshot.items),
        "catalogue_mismatched": len(mismatched(reference.snapshot.items, crashed.snapshot.items,
                                               half=reference.snapshot.half.get("items", frozenset()))),
        "caught_up": crashed.caught_up and reference.caught_up,
        "reference_lost": reference_lost,
        "reference_double_applied": reference_double,
        "reference_seconds": round(reference.seconds, 1),
        "crash_run_seconds": round(crashed.seconds, 1),
        "publish_rate": round(rate, 1),
        "handled_before_each_kill": [int(p) for p in crashed.kill_points],
        "redelivered_skipped": crashed.redelivered_skipped,
        "trending_items": len(crashed.snapshot.trending),
        "trending_mismatched": len(trending_differences(reference.snapshot.trending, crashed.snapshot.trending)),
        "covisit_rows": len(crashed.snapshot.covisit),
        "covisit_mismatched": len(covisit_differences(reference.snapshot.covisit, crashed.snapshot.covisit,
                                                      every_row=args.partitions == 1)),
    }
    if crashed.processes > 1:
        # Every process holds the whole catalogue and every click's signals: each is compared.
        per_process = []
        for index, part in enumerate(crashed.per_process):
            assert part.trending is not None and part.covisit is not None
            per_process.append({
                "process": index,
                "users": len(part.users),
                "kills": crashed.killed.count(index),
                "handled": int(crashed.handled[index]) if crashed.handled else None,
                "catalogue_mismatched": len(mismatched(reference.snapshot.items, part.items,
                                                       half=reference.snapshot.half.get("items", frozenset()))),
                "trending_mismatched": len(trending_differences(reference.snapshot.trending, part.trending)),
                "covisit_mismatched": len(covisit_differences(reference.snapshot.covisit, part.covisit,
                                                              every_row=args.partitions == 1)),
            })
        for key in ("catalogue_mismatched", "trending_mismatched", "covisit_mismatched"):
            result[key] = sum(int(part[key]) for part in per_process)  # type: ignore[call-overload]
        result["processes"] = crashed.processes
        result["misplaced_users"] = misplaced_users(crashed, args.partitions)
        result["per_process"] = per_process
    report("crash exactness (SIGKILL during streaming vs an uninterrupted reference)", result)
    exact = result["mismatched_users"] == result["lost"] == result["double_applied"] == 0
    exact = exact and result.get("misplaced_users", 0) == 0
    signals_exact = result["trending_mismatched"] == result["covisit_mismatched"] == 0
    return 0 if exact and signals_exact and result["catalogue_mismatched"] == 0 and result["caught_up"] else 1
