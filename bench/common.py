"""What the benchmarks share: a private broker and stack, recorded publishing,
progress from the worker's metrics, store snapshots, percentiles, the JSON last line.

A benchmark talks to the system as a producer, an HTTP client and an operator
would (Kafka, HTTP, process signals) and opens the store itself only after its
worker has stopped (an embedded store directory has one owner at a time).
Progress is counted from what the producer was told (partition and offset of
every send) and what the worker reports, never from the broker's end offsets,
which the embedded broker gets wrong.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord

from bench.stack import WorkerProcess, free_port
from core.events import Event, RecRequest
from core.settings import Settings, load_settings
from stream import kafka
from stream.broker import EmbeddedBroker, ensure_topics
from stream.client import EventPublisher
from stream.covisit import StreamTransitions
from stream.partitions import Ownership
from stream.store import Hit, open_store
from stream.trending import Trending

T = TypeVar("T")
# Payload keys that legitimately differ between two runs over the same events.
VOLATILE_PAYLOAD_KEYS = frozenset({"updated_at"})
HANDLED_METRICS = ("streamrec_events_processed_total", "streamrec_deadletter_total")


# -- set-up ---------------------------------------------------------------------------


def bench_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"streamrec bench {prog}", description=description)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="folder for logs and stores (default: a temporary one, removed afterwards)")
    parser.add_argument("--seed", type=int, default=7)
    return parser


@contextmanager
def work_dir(path: Path | None, prefix: str) -> Iterator[Path]:
    """The given folder (kept), or a temporary one removed on exit."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    folder = Path(tempfile.mkdtemp(prefix=f"streamrec-{prefix}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_broker(log_dir: Path) -> EmbeddedBroker:
    log_dir.mkdir(parents=True, exist_ok=True)
    return EmbeddedBroker(free_port(), log_path=log_dir / "broker.log").start()


def stack_settings(base: Settings, broker: EmbeddedBroker, data_dir: Path, tag: str, **overrides: Any) -> Settings:
    """Settings of one isolated stack: own topics, group, store folder and HTTP port.

    Models are shared with ``base`` (its model folder), never rebuilt per run.
    """
    fields = {
        **base.model_dump(),
        "bootstrap_servers": broker.bootstrap,
        "embedded_broker": True,
        "topic_prefix": f"{tag}.",
        "app_id": f"streamrec-bench-{tag}",
        "data_dir": data_dir,
        "model_dir": base.models_path.resolve(),
        "http_port": free_port(),
        **overrides,
    }
    return load_settings(**fields)


def run_on_one_stack(
    args: argparse.Namespace,
    name: str,
    run: Callable[[argparse.Namespace, Settings, Path], dict[str, Any]],
) -> tuple[dict[str, Any], Settings]:
    """Start a broker in the work folder, run ``run(args, settings, folder)`` on one
    isolated stack (``args.partitions`` partitions), stop the broker; the result and the settings."""
    base = load_settings()
    with work_dir(args.work_dir, name) as folder:
        broker = start_broker(folder / "logs")
        try:
            settings = stack_settings(base, broker, folder / name, name, partitions=args.partitions)
            return run(args, settings, folder), settings
        finally:
            broker.stop()


def start_worker(settings: Settings, log_path: Path, *, ready_timeout_s: float = 180.0,
                 processes: int = 1) -> WorkerProcess:
    asyncio.run(ensure_topics(settings))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(settings, log_path=log_path, processes=processes).start()
    try:
        worker.wait_ready(ready_timeout_s)
    except BaseException:
        worker.kill()  # never leave a half-started worker behind
        raise
    return worker


def add_processes_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=int, default=1,
                        help="run the worker as `streamrec worker --processes N` (figures per process and in all)")


def process_settings(settings: Settings, processes: int) -> list[Settings]:
    """The settings each process of ``streamrec worker --processes N`` runs with (its own data
    dir under ``settings.data_dir``); one process: ``settings`` itself."""
    return [Ownership(index, processes, settings.data_dir).settings_for(settings) for index in range(processes)]


def process_owning(user_id: str, settings: Settings, processes: int) -> int:
    """The worker process that owns ``user_id``'s clicks and requests."""
    return Ownership(0, processes).owner_of(user_id.encode(), settings.partitions)


class CpuShares:
    """CPU time of the worker processes and the broker over a ``with`` block, as shares of one core:
    a process near 1.0 is bound by its own interpreter; all of them near the core count, by the machine."""

    def __init__(self, pids: dict[int, int], broker_pid: int | None = None) -> None:
        self.pids, self.broker_pid = dict(sorted(pids.items())), broker_pid
        self.processes: list[float] = []
        self.broker: float | None = None

    def _times(self) -> tuple[list[float], float | None]:
        broker = process_cpu_seconds(self.broker_pid) if self.broker_pid else None
        return [process_cpu_seconds(pid) for pid in self.pids.values()], broker

    def __enter__(self) -> "CpuShares":
        self._started, self._before = time.perf_counter(), self._times()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        after, broker = self._times()
        self.processes = [round((a - b) / elapsed, 2) for a, b in zip(after, self._before[0])]
        if broker is not None and self._before[1] is not None:
            self.broker = round((broker - self._before[1]) / elapsed, 2)


@dataclass
class Supervisor:
    """Keeps one worker running, as a process supervisor would, and counts restarts."""

    settings: Settings
    log_path: Path
    worker: WorkerProcess | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)

    def start(self) -> WorkerProcess:
        self.worker = start_worker(self.settings, self.log_path)
        return self.worker

    def check(self) -> bool:
        """Restart the worker if it has exited; True if it was running."""
        process = self.worker.process if self.worker else None
        if process is not None and process.poll() is None:
            return True
        if process is not None:
            self.exit_codes.append(int(process.returncode))
        self.restarts += 1
        self.start()
        return False

    def stop(self) -> None:
        if self.worker:
            self.worker.stop()


# -- publishing -----------------------------------------------------------------------


@dataclass(frozen=True)
class Landed:
    """Where the broker put one message, as its produce acknowledgement said."""

    topic: str
    partition: int
    offset: int
    tag: object


class RecordingPublisher:
    """Publishes and counts what the broker acknowledged, and where it put it.

    ``tail`` maps (topic, partition) to the last message acknowledged there:
    once the worker has applied that one, it has seen the whole partition.
    ``acknowledged`` counts as acknowledgements arrive; ``refused`` lists the
    messages the producer or broker would not take, with the error.
    """

    def __init__(self, settings: Settings, *, linger_ms: int = 5, settle_every: int = 5000,
                 keep_positions: bool = False) -> None:
        self._publisher = EventPublisher(settings, linger_ms=linger_ms)
        self._settle_every = settle_every
        self._pending: list[asyncio.Future] = []
        self.tail: dict[tuple[str, int], Landed] = {}
        self.positions: list[Landed] | None = [] if keep_positions else None
        self.acknowledged = 0
        self.refused: list[tuple[object, str]] = []

    async def __aenter__(self) -> "RecordingPublisher":
        await self._publisher.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._publisher.__aexit__(*exc)

    async def publish(self, event: Event | RecRequest, tag: object = None) -> None:
        await self._track(self._publisher.publish(event), tag)

    async def publish_raw(self, topic: str, value: bytes | None, key: bytes | None, tag: object = None) -> None:
        await self._track(self._publisher.publish_raw(topic, value, key=key), tag)

    async def settle(self) -> None:
        """Wait until every message sent so far is acknowledged or refused."""
        pending, self._pending = self._pending, []
        await asyncio.gather(*pending, return_exceptions=True)

    async def _track(self, sending: Awaitable[asyncio.Future], tag: object) -> None:
        try:
            future = await sending
        except KafkaError as exc:  # refused before it left, e.g. over the request size
            self.refused.append((tag, f"{type(exc).__name__}: {exc}"))
            return
        future.add_done_callback(functools.partial(self._acknowledge, tag))
        self._pending.append(future)
        if len(self._pending) >= self._settle_every:
            await self.settle()

    def _acknowledge(self, tag: object, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            self.refused.append((tag, repr(None if future.cancelled() else future.exception())))
            return
        metadata = future.result()
        where = Landed(metadata.topic, metadata.partition, metadata.offset, tag)
        previous = self.tail.get((where.topic, where.partition))
        if previous is None or where.offset > previous.offset:
            self.tail[(where.topic, where.partition)] = where
        if self.positions is not None:
            self.positions.append(where)
        self.acknowledged += 1


async def paced(items: Iterable[T], rate: float | None) -> AsyncIterator[T]:
    """Yield ``items`` at ``rate`` per second on average (bursts of up to 10 ms); no rate: at once."""
    started = time.perf_counter()
    for n, item in enumerate(items):
        ahead = n / rate - (time.perf_counter() - started) if rate else 0.0
        if ahead > 0.01:
            await asyncio.sleep(ahead)
        yield item


# -- reading a running worker ---------------------------------------------------------


def metric_totals(worker: WorkerProcess, names: Sequence[str]) -> dict[str, float]:
    """Each metric summed over its labels, from one scrape (0 when absent)."""
    totals = dict.fromkeys(names, 0.0)
    for line in worker.metrics_text().splitlines():
        if line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{")[0]
        if name in totals:
            totals[name] += float(value)
    return totals


def handled(worker: WorkerProcess) -> float:
    """Messages this worker process has finished with: applied or dead-lettered."""
    return sum(metric_totals(worker, HANDLED_METRICS).values())


def user_state(settings: Settings, user_id: str) -> dict[str, Any] | None:
    """GET /users/{id}; None if the user has no state or the worker does not answer."""
    url = f"http://{settings.http_host}:{settings.http_port}/users/{user_id}"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_for(condition: Callable[[], bool], *, timeout_s: float, progress: Callable[[], float] | None = None,
             stall_s: float = 60.0, interval_s: float = 0.5) -> bool:
    """Poll until ``condition``; give up after ``timeout_s``, or when ``progress`` stalls for ``stall_s``."""
    deadline = time.monotonic() + timeout_s
    last_value, last_change = None, time.monotonic()
    while time.monotonic() < deadline:
        if condition():
            return True
        if progress is not None:
            try:
                value = progress()
            except OSError:  # the worker is restarting; not a stall of the pipeline
                value = last_value
            if value != last_value:
                last_value, last_change = value, time.monotonic()
            elif time.monotonic() - last_change > stall_s:
                return False
        time.sleep(interval_s)
    return False


class TopicFollower:
    """Reads a topic from its beginning in a background thread, as a downstream consumer would."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self._settings = settings
        self._topic = topic
        self._records: list[ConsumerRecord] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._follow()), daemon=True)

    def __enter__(self) -> "TopicFollower":
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            raise RuntimeError(f"cannot follow {self._topic}: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def records(self) -> list[ConsumerRecord]:
        with self._lock:
            return list(self._records)

    async def _follow(self) -> None:
        # Nothing waits on the follower: it need not poll as often as the worker's consumers.
        consumer = kafka.consumer(self._settings, group_id=None, fetch_max_wait_ms=500)
        try:
            await consumer.start()
            partitions = consumer.partitions_for_topic(self._topic)
            while not partitions:
                await asyncio.sleep(0.1)
                await consumer.topics()  # refreshes metadata
                partitions = consumer.partitions_for_topic(self._topic)
            assigned = [TopicPartition(self._topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            await consumer.seek_to_beginning(*assigned)
            self._ready.set()
            while not self._stop.is_set():
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    with self._lock:
                        self._records.extend(records)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        finally:
            await consumer.stop()


# -- the store after the worker stopped -----------------------------------------------


@dataclass(frozen=True)
class StoreSnapshot:
    users: dict[str, Hit]
    items: dict[str, Hit]
    half: dict[str, frozenset[str]] = field(default_factory=dict)  # "users"/"items" -> vectors stored as float16
    # What a worker restarted on this store would hold (stream.signals).
    trending: Trending | None = None
    covisit: StreamTransitions | None = None


def read_store(settings: Settings, page: int = 1000) -> StoreSnapshot:
    """Every user and item with payload and vectors, and the signals a restart restores.
    The worker must have stopped."""
    from stream.services import load_serving_model
    from stream.signals import read_signals
    from stream.versions import collection_specs, serving_collections

    model = load_serving_model(settings)
    collections = serving_collections(settings, model.version)
    store = open_store(settings.store_backend, data_dir=settings.store_path, url=settings.qdrant_url,
                       api_key=settings.qdrant_api_key)
    specs = {spec.name: spec for spec in collection_specs(collections, model)}
    try:
        for spec in specs.values():
            store.ensure_collection(spec)
        contents: dict[str, dict[str, Hit]] = {}
        for name in (collections.users, collections.items):
            ids = sorted(store.scroll_ids(name))
            hits: dict[str, Hit] = {}
            for start in range(0, len(ids), page):
                hits.update(store.retrieve(name, ids[start:start + page], with_vectors=True))
            contents[name] = hits
        trending, covisit, _ = read_signals(store, settings)
    finally:
        store.close()
    return StoreSnapshot(users=contents[collections.users], items=contents[collections.items],
                         half={"users": specs[collections.users].half, "items": specs[collections.items].half},
                         trending=trending, covisit=covisit)


def without_topic_prefix(payload: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A user payload with ``prefix`` taken off its ``topic/partition`` keys (to compare two stacks)."""
    def strip(positions: dict[str, Any]) -> dict[str, Any]:
        return {key.removeprefix(prefix): value for key, value in positions.items()}

    return {key: strip(value) if key in ("applied", "applied_time") and isinstance(value, dict) else value
            for key, value in payload.items() if key not in VOLATILE_PAYLOAD_KEYS}


def same_vector(expected: np.ndarray, actual: np.ndarray, *, atol: float, half: bool) -> bool:
    """Equal within ``atol``; a vector stored as float16 also within one float16 step.

    The text tower's output for an item changes in its last float32 bits with
    the batch it was embedded in (padding changes the kernels' summation
    order); stored as float16 such a difference becomes one step of float16
    where it crosses a rounding boundary (6.1e-5 for values in [1/16, 1/8)).
    Stored vectors are compared at the precision they are stored in.
    """
    expected, actual = np.asarray(expected, np.float32), np.asarray(actual, np.float32)
    if expected.shape != actual.shape:
        return False
    tolerance = np.full(expected.shape, atol, np.float32)
    if half:
        tolerance += np.spacing(np.abs(expected).astype(np.float16)).astype(np.float32)
    return bool(np.all(np.abs(expected - actual) <= tolerance))


def same_point(expected: Hit, actual: Hit, *, atol: float = 1e-5, half: frozenset[str] = frozenset(),
               expected_prefix: str = "", actual_prefix: str = "") -> bool:
    """Equal payloads (volatile keys and topic prefixes aside) and equal named vectors
    (``half``: the vectors stored as float16, compared at that precision)."""
    if without_topic_prefix(expected.payload, expected_prefix) != without_topic_prefix(actual.payload, actual_prefix):
        return False
    if set(expected.vectors) != set(actual.vectors):
        return False
    return all(same_vector(expected.vectors[name], actual.vectors[name], atol=atol, half=name in half)
               for name in expected.vectors)


def mismatched(expected: dict[str, Hit], actual: dict[str, Hit], *, atol: float = 1e-5,
               half: frozenset[str] = frozenset(), expected_prefix: str = "", actual_prefix: str = "") -> list[str]:
    """Ids missing on either side or stored differently."""
    return sorted(
        point_id for point_id in expected.keys() | actual.keys()
        if point_id not in expected or point_id not in actual
        or not same_point(expected[point_id], actual[point_id], atol=atol, half=half,
                          expected_prefix=expected_prefix, actual_prefix=actual_prefix)
    )


def _close(expected: float, actual: float, tolerance: float = 1e-9) -> bool:
    return abs(expected - actual) <= tolerance * max(1.0, abs(expected))


def trending_differences(expected: Trending, actual: Trending) -> list[str]:
    """Items whose undecayed trending weight differs (two runs at different wall
    times have different decayed scores, but the same weights)."""
    weights = [{item_id: total for item_id, _, total in trending.entries()[1]} for trending in (expected, actual)]
    return sorted(item_id for item_id in weights[0].keys() | weights[1].keys()
                  if not _close(weights[0].get(item_id, 0.0), weights[1].get(item_id, 0.0)))


def covisit_differences(expected: StreamTransitions, actual: StreamTransitions, *, every_row: bool) -> list[str]:
    """Sources whose co-visit row differs, within 1e-9.

    Every row must have been taught the same weight. A row pruned to its
    heaviest successors depends on the order in which clicks of different
    partitions were learnt, which differs between two runs: its entries are
    compared only when ``every_row`` (one partition: one order), otherwise only
    rows neither run pruned (whose entries add up to what they were taught).
    """
    rows = [{source: (learnt, dict(pairs)) for source, learnt, pairs in covisit.entries()}
            for covisit in (expected, actual)]
    differ = []
    for source in rows[0].keys() | rows[1].keys():
        (taught, row), (other_taught, other) = (side.get(source, (0.0, {})) for side in rows)
        if not _close(taught, other_taught):
            differ.append(source)
        elif every_row or (_close(taught, sum(row.values())) and _close(other_taught, sum(other.values()))):
            if row.keys() != other.keys() or not all(abs(row[k] - other[k]) <= 1e-9 for k in row):
                differ.append(source)
    return sorted(differ)


# -- numbers --------------------------------------------------------------------------


def percentiles(values: Sequence[float], quantiles: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """Nearest-rank percentiles, keyed ``p50`` etc.; NaN for no values."""
    ordered = sorted(values)
    result = {}
    for q in quantiles:
        if not ordered:
            result[f"p{q:g}"] = math.nan
            continue
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        result[f"p{q:g}"] = ordered[rank - 1]
    return result


def report(title: str, result: dict[str, Any]) -> None:
    """A readable table, then the result as one JSON object on the last line."""
    print(f"\n{title}")
    width = max(len(key) for key in result)
    for key, value in result.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        print(f"  {key:<{width}}  {shown}")
    print(json.dumps(result), flush=True)
