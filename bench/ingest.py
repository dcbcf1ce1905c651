"""``streamrec bench ingest``: click events/s through the real worker, against two Faust references.

The same clicks (synthetic users on a synthetic catalogue) are published to
three click topics on one embedded broker before anything consumes them; then,
one after the other so that none competes with another for the CPU:

* the *ceiling*: a bare Faust agent that takes batches (``stream.take_events``)
  and does nothing with them: Faust's own cost per event;
* the *baseline*: a plain Faust agent keeping a changelog-backed Table with one
  update per event (clicks per user): the textbook way to keep state in Faust;
* the worker: its click consumer (a direct aiokafka consumer, see
  ``stream.agents.clicks``) decodes, dead-letters, updates each user's sequence
  and vector in the vector store and trending, and commits after the store write.

The three are measured ``--rounds`` times (default 3). Every round publishes
the clicks again to its own topics and seeds its own store, and starts with a
different consumer: a single pass, run in a fixed order, compared consumers
that met different machine noise and read topics of a broker whose reads slow
as a partition grows (two runs of it gave worker/ceiling ratios of 1.48 and
0.61). The JSON reports the median over the rounds under the usual keys, each
round's figures and the spread (min, median, max) of the rate and the ratios.

Each rate is events over the time from the first to the last applied event
(the events applied before the first reading are left out of the count). The
worker's progress is read from ``streamrec_events_processed_total`` and the
result checked against the store afterwards (every user's ``applied_count``);
the broker's end offsets are never read. With ``--processes N`` the worker runs
as N processes, each applying the partitions it owns: its rate and CPU are all
of them together, and each round lists what each process applied. Beside events per second, events per
CPU-second of the consuming process are reported: on a shared machine they
compare the three even when each got a different share of the cores.
``--profile`` records the worker with py-spy while it ingests; the synthetic
catalogue and click helpers here are shared by the other benchmarks.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import (
    add_processes_option,
    bench_parser,
    process_cpu_seconds,
    process_settings,
    report,
    run_on_one_stack,
)
from bench.stack import WorkerProcess, settings_env
from core.events import ClickEvent
from core.settings import Settings, load_settings
from stream.broker import ensure_topics
from stream.store import CollectionSpec, Point, VectorStore, open_store
from stream.worker import faust_worker

ACTIONS = ("view", "click", "add_to_cart", "purchase")
ACTION_WEIGHTS = (4, 8, 2, 1)
CLUSTERS = 256  # synthetic items are drawn around this many topics (real embeddings cluster)
POLL_S = 0.1
PROBE_TIMEOUT_S = 1800.0


# -- a synthetic catalogue, written straight into the store ------------------------------


def item_vectors(count: int, dim: int, seed: int, *, spread: float = 0.7) -> np.ndarray:
    """(count, dim) unit vectors around ``CLUSTERS`` random centres (in-cluster cosine ~0.6)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
    vectors = np.empty((count, dim), np.float32)
    for start in range(0, count, 65_536):  # bounded temporaries at a million items
        stop = min(count, start + 65_536)
        noise = rng.standard_normal((stop - start, dim)).astype(np.float32)
        block = centres[rng.integers(0, CLUSTERS, stop - start)] + spread * noise
        vectors[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return vectors


def item_id(n: int) -> str:
    return f"item{n}"


def item_points(vectors: np.ndarray, first: int, created_at: float) -> list[Point]:
    """Catalogue points with a ``fused`` vector only: what retrieval and user vectors read.

    Without text and photo vectors the store builds one HNSW graph, not three;
    scoring reads zero rows for them, which costs the same as real ones.
    """
    return [
        Point(item_id(first + n), {"fused": row},
              {"title": f"synthetic item {first + n}", "category": f"c{(first + n) % 20}",
               "price": float(5 + (first + n) % 200), "attributes": {}, "created_at": created_at,
               "has_image": False, "image_uri": None})
        for n, row in enumerate(vectors)
    ]


def collection_specs(settings: Settings) -> dict[str, CollectionSpec]:
    """The collections a worker with these settings serves from (as ``Services.open`` opens them)."""
    from stream.services import load_serving_model
    from stream.versions import collection_specs as specs_of
    from stream.versions import serving_collections

    model = load_serving_model(settings)
    specs = specs_of(serving_collections(settings, model.version), model)
    return dict(zip(("items", "users", "queries"), specs))


def served_fused_dim(settings: Settings) -> int:
    """Width of the retrieval space the worker serves (384 for the rule model, the trained model's own)."""
    return collection_specs(settings)["items"].vectors["fused"]


def open_bench_store(settings: Settings) -> VectorStore:
    """The worker's store with its collections open; only while no worker runs on it."""
    store = open_store(settings.store_backend, data_dir=settings.store_path, url=settings.qdrant_url,
                       api_key=settings.qdrant_api_key, hnsw_ef=settings.hnsw_ef,
                       quantization=settings.quantization)
    for spec in collection_specs(settings).values():
        store.ensure_collection(spec)
    return store


def applied_in_store(settings: Settings, page: int = 1000) -> int:
    """Sum of every user's ``applied_count``, read after the worker stopped."""
    store = open_bench_store(settings)
    try:
        users = collection_specs(settings)["users"].name
        ids = list(store.scroll_ids(users))
        return sum(int(hit.payload.get("applied_count", 0))
                   for start in range(0, len(ids), page)
                   for hit in store.retrieve(users, ids[start:start + page]).values())
    finally:
        store.close()


@dataclass
class Seeded:
    items: int
    upsert_seconds: float
    upsert_cpu_seconds: float  # this process's CPU time (all threads) while upserting
    index_seconds: float = 0.0
    index_cpu_seconds: float = 0.0


def seed_catalogue(settings: Settings, vectors: np.ndarray, *, optimize: bool, batch: int = 1000,
                   processes: int = 1) -> Seeded:
    """Write the items through ``VectorStore.upsert`` (no towers); the worker must not be running.

    With ``optimize`` the HNSW graph is built here, as an operator does after a
    bulk load (``optimize`` holds the GIL: never inside a serving worker's loop).
    For a worker of ``processes`` processes, each of which holds the whole
    catalogue in a store of its own, the first process's store is seeded and
    copied to the others' (the figures are the first one's).
    """
    stores = process_settings(settings, processes)
    seeded = _seed_one(stores[0], vectors, optimize=optimize, batch=batch)
    for other in stores[1:]:
        shutil.copytree(stores[0].store_path, other.store_path)
    return seeded


def _seed_one(settings: Settings, vectors: np.ndarray, *, optimize: bool, batch: int) -> Seeded:
    store = open_bench_store(settings)
    try:
        items = collection_specs(settings)["items"].name
        now = time.time()
        # Only the store's work is timed: building the bench's own Point objects is the producer's.
        wall = cpu = 0.0
        for start in range(0, len(vectors), batch):
            points = item_points(vectors[start:start + batch], start, now)
            started, cpu_started = time.perf_counter(), time.process_time()
            store.upsert(items, points)
            wall += time.perf_counter() - started
            cpu += time.process_time() - cpu_started
        seeded = Seeded(len(vectors), wall, cpu)
        if optimize:
            started, cpu = time.perf_counter(), time.process_time()
            store.optimize(items)
            seeded.index_seconds = time.perf_counter() - started
            seeded.index_cpu_seconds = time.process_time() - cpu
        store.flush()
    finally:
        store.close()
    return seeded


# -- the click stream ------------------------------------------------------------------


def click_stream(*, events: int, users: int, items: int, seed: int, start_time: float,
                 prefix: str = "ingest") -> list[ClickEvent]:
    """Uniform users, Zipf-like item popularity, increasing event times."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 10) for rank in range(items)]
    chosen_users = rng.choices(range(users), k=events)
    chosen_items = rng.choices(range(items), weights=weights, k=events)
    chosen_actions = rng.choices(ACTIONS, weights=ACTION_WEIGHTS, k=events)
    return [
        ClickEvent(event_id=f"{prefix}-{seed}-{n}", event_time=start_time + n * 1e-4, user_id=f"u{user}",
                   item_id=item_id(item), action=action)  # type: ignore[arg-type]
        for n, (user, item, action) in enumerate(zip(chosen_users, chosen_items, chosen_actions))
    ]


async def publish_raw(settings: Settings, topics: list[str], messages: list[tuple[bytes, bytes]]) -> float:
    """Publish (key, value) pairs to each topic; seconds taken. Every send must be acknowledged."""
    from stream import kafka

    producer = kafka.producer(settings, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    started = time.perf_counter()
    try:
        for topic in topics:
            pending = []
            for key, value in messages:
                pending.append(await producer.send(topic, value, key=key))
                if len(pending) >= 20_000:
                    await asyncio.gather(*pending)
                    pending = []
            await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


# -- measuring a consumer --------------------------------------------------------------


@dataclass
class Rate:
    """Applied events over the time between the first reading that saw progress and the end.

    ``cpu_seconds`` is the CPU time the consuming process used meanwhile (all
    its threads): on a shared machine events per CPU-second compare consumers
    even when they got different shares of the cores.
    """

    events: int
    seconds: float
    first_seen: int  # applied when progress was first seen (left out of the rate)
    cpu_seconds: float = float("nan")

    @property
    def per_s(self) -> float:
        return (self.events - self.first_seen) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def per_cpu_s(self) -> float:
        return (self.events - self.first_seen) / self.cpu_seconds if self.cpu_seconds > 0 else float("nan")


class ProgressFile:
    """What a Faust probe reports: when it first saw events, and when it had them all."""

    def __init__(self, path: Path, expected: int) -> None:
        self.path = path
        self.expected = expected
        self.count = 0
        self.first_at = self.first_cpu = 0.0
        self.first_count = 0

    def add(self, n: int) -> None:
        self.count += n
        now = time.perf_counter()
        if not self.first_at:
            self.first_at, self.first_cpu, self.first_count = now, time.process_time(), self.count
        if self.count >= self.expected and not self.path.exists():
            record = {"events": self.count, "first_count": self.first_count, "seconds": now - self.first_at,
                      "cpu_seconds": time.process_time() - self.first_cpu}
            self.path.write_text(json.dumps(record))


def run_faust_probe(role: str, topic: str, expected: int, result_path: Path) -> None:
    """Child process: the ceiling (take batches, do nothing) or the baseline (Table count per user)."""
    import faust

    from stream.app import cap_fetch_wait, faust_options

    settings = load_settings()
    # The same consumer options as the worker's click consumer (its fetch wait included), so only the work differs.
    cap_fetch_wait(settings.ingest_fetch_max_wait_ms)
    app = faust.App(f"{settings.app_id}-{role}", **faust_options(settings))
    source = app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                       partitions=settings.partitions)
    progress = ProgressFile(result_path, expected)
    if role == "ceiling":
        @app.agent(source, name=f"{settings.app_id}.ceiling")
        async def take_only(stream: faust.StreamT) -> None:
            async for events in stream.take_events(settings.batch_size, within=settings.batch_within_s):
                progress.add(len(events))
    else:
        clicks_per_user = app.Table("clicks_per_user", default=int, partitions=settings.partitions)

        @app.agent(source, name=f"{settings.app_id}.baseline")
        async def count_clicks(stream: faust.StreamT) -> None:
            async for value in stream:
                clicks_per_user[json.loads(value)["user_id"]] += 1
                progress.add(1)
    sys.argv = [sys.argv[0], "worker"]  # faust's Worker reads argv
    # Logging as in a worker process (no debug records built), so that the comparison is fair.
    faust_worker(app, "warning").execute_from_commandline()


def measure_probe(settings: Settings, role: str, topic: str, expected: int, folder: Path) -> Rate:
    result_path = folder / f"{role}.json"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "bench.ingest", "--probe", role, "--probe-topic", topic,
               "--events", str(expected), "--probe-result", str(result_path)]
    with (folder / f"{role}.log").open("ab") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while not result_path.exists():
            if process.poll() is not None:
                raise RuntimeError(f"{role} probe exited with {process.returncode}; see {folder / (role + '.log')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{role} probe did not finish in {PROBE_TIMEOUT_S:.0f}s")
            time.sleep(POLL_S)
        time.sleep(0.05)  # the file is written in one call; let it land
        record = json.loads(result_path.read_text())
    finally:
        _stop_group(process)
    return Rate(int(record["events"]), float(record["seconds"]), int(record["first_count"]),
                float(record["cpu_seconds"]))


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def measure_worker(settings: Settings, expected: int, folder: Path, profile: Path | None,
                   processes: int = 1) -> tuple[Rate, int, list[int]]:
    """Start the worker on the published clicks; (rate, events applied according to the
    store, events each process applied). With N processes the rate and CPU are all of them
    together; ``profile`` records the first process."""
    worker = WorkerProcess(settings, log_path=folder / "worker.log", processes=processes).start()
    profiler: subprocess.Popen[bytes] | None = None

    def cpu_seconds() -> float:
        return sum(process_cpu_seconds(pid) for pid in worker.pids().values())

    try:
        applied, first_seen, first_at, first_cpu = 0.0, 0.0, 0.0, 0.0
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while applied < expected:
            if worker.process is not None and worker.process.poll() is not None:
                raise RuntimeError(f"the worker exited; see {folder / 'worker.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker applied {applied:.0f} of {expected} clicks in time")
            time.sleep(POLL_S)
            try:
                applied = worker.metric("streamrec_events_processed_total", {"topic": "clicks"})
            except OSError:
                continue  # HTTP not up yet
            if applied and not first_at:
                first_at, first_seen = time.perf_counter(), applied
                first_cpu = cpu_seconds()
                if profile is not None and worker.process is not None:
                    profiler = subprocess.Popen(
                        [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(worker.pids()[0]),
                         "--rate", "100", "--format", "raw", "--output", str(profile)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rate = Rate(int(applied), time.perf_counter() - first_at, int(first_seen), cpu_seconds() - first_cpu)
        per_process = [int(n) for n in worker.metric_per_process("streamrec_events_processed_total",
                                                                   {"topic": "clicks"})]
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            profiler.wait(timeout=60)
        worker.stop()
    return rate, sum(applied_in_store(own) for own in process_settings(settings, processes)), per_process


# -- the benchmark ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("ingest", __doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure every consumer this many times, each round in a different order, "
                             "and report the median and the spread")
    parser.add_argument("--worker-only", action="store_true",
                        help="skip the ceiling and baseline (e.g. while profiling the worker)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record the worker with py-spy into this file (raw, flamegraph-ready)")
    add_processes_option(parser)
    parser.add_argument("--probe", choices=("ceiling", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-topic", help=argparse.SUPPRESS)
    parser.add_argument("--probe-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.probe:
        run_faust_probe(args.probe, args.probe_topic, args.events, args.probe_result)
        return 0
    result, _ = run_on_one_stack(args, "ingest", run)
    report(f"ingest: {args.events} clicks of {args.users} users on {args.items} items, "
           f"{args.partitions} partitions", result)
    return 0


CONSUMERS = ("ceiling", "baseline", "worker")


@dataclass
class Round:
    """One measurement of each consumer on its own freshly published copy of the clicks."""

    order: tuple[str, ...]
    rates: dict[str, Rate]
    applied_in_store: int
    applied_per_process: list[int]

    def ratio(self, to: str, *, cpu: bool = False) -> float:
        worker, other = self.rates["worker"], self.rates.get(to)
        if other is None:
            return float("nan")
        return worker.per_cpu_s / other.per_cpu_s if cpu else worker.per_s / other.per_s


def round_order(index: int, consumers: tuple[str, ...]) -> tuple[str, ...]:
    """Round ``index`` starts with a different consumer than the round before it, so
    that none is always measured first (fresh machine) or last (warm caches, a
    broker that has served the most reads)."""
    shift = index % len(consumers)
    return consumers[shift:] + consumers[:shift]


def spread(values: list[float], digits: int) -> dict[str, float | None]:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return {"median": None, "min": None, "max": None}
    return {"median": round(float(np.median(finite)), digits), "min": round(min(finite), digits),
            "max": round(max(finite), digits)}


def run(args: argparse.Namespace, settings: Settings, folder: Path) -> dict[str, object]:
    consumers = ("worker",) if args.worker_only else CONSUMERS
    rounds: list[Round] = []
    publish_seconds, published = 0.0, 0
    for index in range(args.rounds):
        # Each round has its own topics, groups and store: nothing one round read or
        # wrote makes the next one faster or slower, apart from the machine itself.
        tag = f"r{index}"
        round_settings = load_settings(**{
            **settings.model_dump(), "topic_prefix": f"{settings.topic_prefix}{tag}.",
            "app_id": f"{settings.app_id}-{tag}", "data_dir": settings.data_dir / tag})
        topics = {"worker": round_settings.topic("clicks"),
                  "ceiling": f"{round_settings.topic_prefix}ceiling.events.clicks",
                  "baseline": f"{round_settings.topic_prefix}baseline.events.clicks"}
        asyncio.run(ensure_topics(round_settings))
        asyncio.run(ensure_topics(round_settings, [topics["ceiling"], topics["baseline"]]))
        print(f"round {index + 1}/{args.rounds}: seeding {args.items} items and publishing "
              f"{args.events} clicks ...", flush=True)
        seeded = seed_catalogue(round_settings, item_vectors(args.items, served_fused_dim(round_settings),
                                                             args.seed), optimize=False, processes=args.processes)
        clicks = click_stream(events=args.events, users=args.users, items=args.items, seed=args.seed,
                              start_time=time.time())
        messages = [(c.user_id.encode(), c.to_bytes()) for c in clicks]
        del clicks
        publish_seconds += asyncio.run(publish_raw(round_settings, [topics[c] for c in consumers], messages))
        published += len(consumers) * len(messages)
        del messages
        order = round_order(index, consumers)
        rates: dict[str, Rate] = {}
        in_store, per_process = 0, []
        logs = folder / "logs" / tag
        logs.mkdir(parents=True, exist_ok=True)
        for consumer in order:
            if consumer == "worker":
                rates[consumer], in_store, per_process = measure_worker(
                    round_settings, args.events, logs, args.profile if index == 0 else None, args.processes)
            else:
                rates[consumer] = measure_probe(round_settings, consumer, topics[consumer], args.events, logs)
            rate = rates[consumer]
            print(f"  {consumer:<8} {rate.per_s:8.0f} events/s ({rate.per_cpu_s:.0f} per CPU-second)", flush=True)
        rounds.append(Round(order, rates, in_store, per_process))
        if in_store != args.events:
            print(f"  the store holds {in_store} applied clicks of {args.events}", flush=True)
    return summary(args, rounds, items=seeded.items, batch_size=settings.batch_size,
                   publish_per_s=published / publish_seconds)


def summary(args: argparse.Namespace, rounds: list[Round], *, items: int, batch_size: int,
            publish_per_s: float) -> dict[str, object]:
    """The JSON line: medians over the rounds under the historical keys, each
    round's figures and the spread (min, median, max) beside them."""
    def rates(consumer: str, cpu: bool = False) -> list[float]:
        return [(r.rates[consumer].per_cpu_s if cpu else r.rates[consumer].per_s) if consumer in r.rates
                else float("nan") for r in rounds]

    def median(values: list[float], digits: int) -> float | None:
        return spread(values, digits)["median"]

    ratios = {f"{kind}ratio_to_{to}": [r.ratio(to, cpu=bool(kind)) for r in rounds]
              for kind in ("", "cpu_") for to in ("ceiling", "baseline")}
    return {
        "events_per_s": median(rates("worker"), 1),
        "ceiling_events_per_s": median(rates("ceiling"), 1),
        "baseline_events_per_s": median(rates("baseline"), 1),
        "ratio_to_ceiling": median(ratios["ratio_to_ceiling"], 3),
        "ratio_to_baseline": median(ratios["ratio_to_baseline"], 3),
        "events_per_cpu_s": median(rates("worker", cpu=True), 1),
        "ceiling_events_per_cpu_s": median(rates("ceiling", cpu=True), 1),
        "baseline_events_per_cpu_s": median(rates("baseline", cpu=True), 1),
        "cpu_ratio_to_ceiling": median(ratios["cpu_ratio_to_ceiling"], 3),
        "cpu_ratio_to_baseline": median(ratios["cpu_ratio_to_baseline"], 3),
        "events": args.events,
        "applied_in_store": min(r.applied_in_store for r in rounds),
        "worker_seconds": median([r.rates["worker"].seconds for r in rounds], 2),
        "ceiling_seconds": median([r.rates["ceiling"].seconds if "ceiling" in r.rates else float("nan")
                                   for r in rounds], 2),
        "baseline_seconds": median([r.rates["baseline"].seconds if "baseline" in r.rates else float("nan")
                                    for r in rounds], 2),
        "users": args.users,
        "items": items,
        "partitions": args.partitions,
        "batch_size": batch_size,
        "publish_events_per_s": round(publish_per_s, 1),
        "rounds": len(rounds),
        "spread": {
            "events_per_s": spread(rates("worker"), 1),
            **{key: spread(values, 3) for key, values in ratios.items()},
        },
        "processes": args.processes,
        "per_round": [{"order": list(r.order), **{f"{c}_events_per_s": _rounded(r.rates[c].per_s, 1)
                                                   for c in r.order},
                       "worker_events_per_process": r.applied_per_process}
                      for r in rounds],
    }


def _rounded(value: float, digits: int) -> float | None:
    """None where a reference was skipped (JSON has no NaN)."""
    return round(value, digits) if np.isfinite(value) else None


if __name__ == "__main__":
    sys.exit(main())
