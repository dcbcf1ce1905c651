"""``streamrec bench serve``: request latency over HTTP and Kafka under concurrent load, ANN recall, scoring cost.

A synthetic catalogue (clustered unit vectors, written through the store's
upsert: no text tower) is indexed with HNSW before the worker starts, as an
operator does after a bulk load; users get their state through
``apply_interactions``, the click agent's own code. Then, against the running
worker, several closed-loop clients each send a request for a random user and
wait for the answer before the next: first over HTTP (POST /recommend), then
over ``rec.requests``/``rec.responses``. A request retrieves the top
``candidates`` by the user vector, scores them with the served model and
re-ranks with MMR. Latency is what the client sees, from sending to having the
parsed response.

Recall@100 compares the store's ANN search (top 100, ``hnsw_ef`` as
configured) with its exact search for the users' own vectors. The candidate
sizing rows measure, for a few candidate
counts with ``hnsw_ef`` equal to the count (the engine searches with
``max(hnsw_ef, limit)``, so a smaller ef changes nothing), how many of the
exact top 100 the candidate search returns and what that search costs,
both as requests search (through the int8 copy, ``STREAMREC_QUANTIZATION``)
and over the stored floats on the same graph, query by query in turn.
``--sizing`` adds those rows; ``--profile N`` serves N requests in this process after the load (worker
stopped) and prints where their time goes (cProfile). Scoring cost compares, for 500 candidates, the served
scorer and the trained ranker's architecture in ONNX fp32, ONNX int8
(``quantize_dynamic``) and torch eager, in this process, on one thread.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np

from bench import wrk
from bench.common import (
    CpuShares,
    add_processes_option,
    bench_parser,
    percentiles,
    process_owning,
    process_settings,
    report,
    run_on_one_stack,
    start_worker,
    wait_for,
)
from bench.ingest import (
    Seeded,
    click_stream,
    collection_specs,
    item_vectors,
    open_bench_store,
    seed_catalogue,
    served_fused_dim,
)
from bench.stack import WorkerProcess
from core.events import RecRequest
from core.settings import Settings
from exporter.status import (
    bucket_delta,
    bucket_quantile,
    histogram_buckets,
    parse_metrics,
)
from stream.client import EventPublisher, ResponseListener, http_recommend

QUANTILES = (50, 99, 99.9)


# -- users -----------------------------------------------------------------------------


def seed_users_through(worker: WorkerProcess, settings: Settings, *, users: int, clicks_per_user: int,
                       items: int, seed: int) -> list[str]:
    """Give ``users`` users a history by publishing their clicks to the running worker; their ids.

    Through Kafka, as any click arrives: with N processes each user lands in the
    process that owns it, and every process learns the clicks' co-visits and
    trending from the others (waited for, so that all answer from the same signals).
    """
    clicks = click_stream(events=users * clicks_per_user, users=users, items=items, seed=seed,
                          start_time=time.time() - 86_400, prefix="seed")

    async def publish() -> None:
        async with EventPublisher(settings, linger_ms=20) as publisher:
            for click in clicks:
                await publisher.publish(click)
            await publisher.flush()

    asyncio.run(publish())

    def applied() -> float:
        return worker.metric("streamrec_events_processed_total", {"topic": "clicks"})

    if not wait_for(lambda: applied() >= len(clicks) and worker.lessons_exchanged(), timeout_s=900,
                    progress=applied, interval_s=0.1):
        raise RuntimeError(f"the worker applied {applied():.0f} of {len(clicks)} seed clicks; see its log")
    return sorted({click.user_id for click in clicks})


def user_vectors_sample(settings: Settings, count: int, seed: int, processes: int = 1) -> tuple[list[str], np.ndarray]:
    """Up to ``count`` users that have a vector, and their vectors (count, fused_dim), read from
    every process's store (each holds the users it owns)."""
    chosen: list[str] = []
    vectors: list[np.ndarray] = []
    for own in process_settings(settings, processes):
        store = open_bench_store(own)
        try:
            users = collection_specs(own)["users"].name
            hits = store.retrieve(users, sorted(store.scroll_ids(users)), with_vectors=["user"])
            for uid, hit in hits.items():
                if "user" in hit.vectors:
                    chosen.append(uid)
                    vectors.append(hit.vectors["user"])
        finally:
            store.close()
    order = sorted(range(len(chosen)), key=lambda n: chosen[n])
    random.Random(seed).shuffle(order)
    order = order[:count]
    return [chosen[n] for n in order], np.stack([vectors[n] for n in order])


# -- ANN quality -----------------------------------------------------------------------


def ann_recall(settings: Settings, queries: np.ndarray, k: int = 100) -> dict[str, float]:
    """Mean recall@k of the ANN search against exact search, and both searches' latency."""
    store = open_bench_store(settings)
    try:
        items = collection_specs(settings)["items"].name
        recalls, ann_seconds, exact_seconds = [], [], []
        for query in queries:
            started = time.perf_counter()
            approximate, _ = store.search_points(items, "fused", query, k)
            ann_seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
            exact, _ = store.search_points(items, "fused", query, k, exact=True)
            exact_seconds.append(time.perf_counter() - started)
            truth = set(exact.tolist())
            recalls.append(len(truth & set(approximate.tolist())) / max(1, len(truth)))
    finally:
        store.close()
    ann, brute = percentiles(ann_seconds, (50, 99)), percentiles(exact_seconds, (50, 99))
    return {"recall": float(np.mean(recalls)), "ann_p50_ms": 1e3 * ann["p50"], "ann_p99_ms": 1e3 * ann["p99"],
            "exact_p50_ms": 1e3 * brute["p50"], "exact_p99_ms": 1e3 * brute["p99"]}


SIZING = (100, 200, 300, 500)  # candidate counts the sizing rows measure, each with hnsw_ef = count


def candidate_sizing(settings: Settings, queries: np.ndarray, sizes: tuple[int, ...] = SIZING,
                     k: int = 100) -> list[dict[str, float]]:
    """Recall@``k`` and search latency per (candidates, ef): ef = count for ``sizes``, plus the configured pair.

    Recall is the share of the exact top ``k`` that the candidate search
    returns (an exact top-``k`` item found at all ranks in the ANN top ``k``:
    scores are exact), so it is what the rest of a request can work with.
    """
    from stream.store import open_store

    settings_pair = (settings.candidates, max(settings.candidates, settings.hnsw_ef))
    pairs = [(size, size) for size in sizes] + ([settings_pair] if settings_pair[0] != settings_pair[1]
                                                 or settings_pair[0] not in sizes else [])
    rows = []
    exact: list[set[int]] | None = None
    for size, ef in pairs:
        store = open_store(settings.store_backend, data_dir=settings.store_path, url=settings.qdrant_url,
                           api_key=settings.qdrant_api_key, hnsw_ef=ef)
        try:
            items = collection_specs(settings)["items"]
            store.ensure_collection(items)
            if exact is None:
                exact = [set(store.search_points(items.name, "fused", q, k, exact=True)[0].tolist())
                         for q in queries]
            # Each query searched twice in turn: as requests do (through the int8 copy where the
            # store keeps one) and over the stored floats on the same graph.
            found: dict[bool, list[float]] = {True: [], False: []}
            seconds: dict[bool, list[float]] = {True: [], False: []}
            for query, truth in zip(queries, exact):
                for use_int8 in (True, False):
                    started = time.perf_counter()
                    ids, _ = store.search_points(items.name, "fused", query, size, use_int8=use_int8)
                    seconds[use_int8].append(time.perf_counter() - started)
                    found[use_int8].append(len(truth & set(ids.tolist())) / max(1, len(truth)))
        finally:
            store.close()
        latency, floats = percentiles(seconds[True], (50, 99)), percentiles(seconds[False], (50, 99))
        rows.append({"candidates": size, "hnsw_ef": ef, "recall_at_100": round(float(np.mean(found[True])), 4),
                     "search_p50_ms": round(1e3 * latency["p50"], 3), "search_p99_ms": round(1e3 * latency["p99"], 3),
                     "float_recall_at_100": round(float(np.mean(found[False])), 4),
                     "float_search_p50_ms": round(1e3 * floats["p50"], 3),
                     "float_search_p99_ms": round(1e3 * floats["p99"], 3)})
        row = rows[-1]
        print(f"  candidates {size:>4}, ef {ef:>4}: recall@100 {row['recall_at_100']:.3f}, "
              f"search p50 {row['search_p50_ms']:.2f} / p99 {row['search_p99_ms']:.2f} ms; over the floats: "
              f"recall@100 {row['float_recall_at_100']:.3f}, p50 {row['float_search_p50_ms']:.2f} / "
              f"p99 {row['float_search_p99_ms']:.2f} ms", flush=True)
    return rows


def profile_requests(settings: Settings, user_ids: list[str], count: int, top: int = 30) -> dict[str, float]:
    """Serve ``count`` requests in this process (no worker running), then ``count`` more under cProfile."""
    import cProfile
    import io
    import pstats

    from prometheus_client import CollectorRegistry

    from stream.recommend import recommend
    from stream.services import Services

    services = Services.open(settings, CollectorRegistry())
    try:
        def one(n: int) -> None:
            request = RecRequest(request_id=uuid.uuid4().hex, user_id=user_ids[n % len(user_ids)], k=10)
            recommend(services, request, path="http")

        for n in range(len(user_ids)):  # every candidate in the item cache, as in the load phases
            one(n)
        seconds = []
        for n in range(count):
            started = time.perf_counter()
            one(n)
            seconds.append(time.perf_counter() - started)
        profiler = cProfile.Profile()
        profiler.enable()
        for n in range(count):
            one(n)
        profiler.disable()
    finally:
        services.close()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    print(f"profile of {count} in-process requests (cProfile; cumulative seconds):\n{text.getvalue()}", flush=True)
    latency = percentiles([1e3 * s for s in seconds], (50, 99))
    return {"inprocess_request_p50_ms": round(latency["p50"], 3), "inprocess_request_p99_ms": round(latency["p99"], 3)}


# -- load ------------------------------------------------------------------------------


Ask = Callable[[RecRequest], Awaitable[object]]


async def closed_loop(ask: Ask, user_ids: list[str], *, clients: int, requests: int, seed: int,
                      k: int = 10, server_ms: list[float] | None = None) -> list[float]:
    """``clients`` tasks, each asking and waiting, until ``requests`` answers in all; seconds each.

    ``server_ms`` collects each response's own ``latency_ms`` (the worker's compute time).
    """
    latencies: list[float] = []
    issued = 0

    async def client(number: int) -> None:
        nonlocal issued
        rng = random.Random(seed * 1000 + number)
        while issued < requests:
            issued += 1
            request = RecRequest(request_id=uuid.uuid4().hex, user_id=rng.choice(user_ids), k=k)
            started = time.perf_counter()
            response = await ask(request)
            latencies.append(time.perf_counter() - started)
            if server_ms is not None:
                server_ms.append(float(response.latency_ms))  # type: ignore[attr-defined]

    await asyncio.gather(*(client(n) for n in range(clients)))
    return latencies


async def http_load(settings: Settings, user_ids: list[str], *, clients: int, requests: int,
                    seed: int, server_ms: list[float] | None = None) -> list[float]:
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def ask(request: RecRequest) -> object:
            return await http_recommend(settings, request, session=session)

        return await closed_loop(ask, user_ids, clients=clients, requests=requests, seed=seed,
                                 server_ms=server_ms)


async def kafka_load(settings: Settings, user_ids: list[str], *, clients: int, requests: int,
                     seed: int, timeout_s: float = 30.0) -> list[float]:
    async with ResponseListener(settings) as listener, EventPublisher(settings, linger_ms=0) as publisher:
        async def ask(request: RecRequest) -> object:
            waiter = listener.expect(request.request_id)
            await publisher.publish(request)
            return await asyncio.wait_for(waiter, timeout_s)

        return await closed_loop(ask, user_ids, clients=clients, requests=requests, seed=seed)


class WorkerWindow:
    """The worker's histograms over a ``with`` block: quantiles of what it observed in between."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker

    def __enter__(self) -> "WorkerWindow":
        self.first = parse_metrics(self.worker.metrics_text(), time.time())
        return self

    def __exit__(self, *exc: object) -> None:
        self.second = parse_metrics(self.worker.metrics_text(), time.time())

    def quantile_ms(self, name: str, quantile: float, **match: str) -> float | None:
        buckets = bucket_delta(histogram_buckets(self.second, name, **match),
                               histogram_buckets(self.first, name, **match))
        value = bucket_quantile(quantile, buckets)
        return None if value is None else round(value * 1000, 2)

    def delta(self, name: str, **match: str) -> float:
        """How much a counter (or a histogram's ``_count`` or ``_sum``) grew, summed over the other labels."""
        return self.second.total(name, **match) - self.first.total(name, **match)

    def full_collections(self) -> dict[str, object]:
        """The garbage collector's full walks in the block (``stream.gc_policy``): how many, how long."""
        count = self.delta("streamrec_gc_pause_seconds_count", generation="2")
        total = self.delta("streamrec_gc_pause_seconds_sum", generation="2")
        return {"gc_full_collections": int(count),
                "gc_full_pause_mean_ms": round(1000 * total / count, 2) if count else None,
                "gc_full_pause_p99_ms": self.quantile_ms("streamrec_gc_pause_seconds", 0.99, generation="2")}


def wrk_phase(settings: Settings, worker: WorkerProcess, user_ids: list[str],
              args: argparse.Namespace) -> dict[str, object]:
    """``wrk_*`` figures: the HTTP load again from a C client (none when skipped)."""
    if not args.wrk_seconds:
        return {}
    if not wrk.available():
        print("  wrk is not installed (apt-get install wrk): no wrk figures", flush=True)
        return {}
    print(f"HTTP load from wrk ({args.wrk_seconds:.0f} s) ...", flush=True)
    with WorkerWindow(worker) as window:
        figures = wrk.wrk_recommend(f"http://{settings.http_host}:{settings.http_port}", user_ids,
                                    connections=args.clients, seconds=args.wrk_seconds, seed=args.seed)
    return {
        "wrk_p50_ms": round(figures["p50_ms"], 3),
        "wrk_p99_ms": round(figures["p99_ms"], 3),
        "wrk_p999_ms": round(figures["p999_ms"], 3),
        "wrk_requests_per_s": round(figures["requests_per_s"], 1),
        "wrk_errors": int(figures["errors"]),
        "wrk_server_p99_ms": window.quantile_ms("streamrec_request_latency_seconds", 0.99, path="http"),
        "wrk_loop_lag_p99_ms": window.quantile_ms("streamrec_event_loop_lag_seconds", 0.99),
    }


def latency_summary(prefix: str, seconds: list[float]) -> dict[str, float]:
    shown = percentiles([1e3 * s for s in seconds], QUANTILES)
    return {f"{prefix}_{key.replace('.', '')}_ms": round(value, 3) for key, value in shown.items()}


# -- scoring cost ----------------------------------------------------------------------


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    call()  # first run allocates
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return 1e3 * float(np.median(timings))


def _int8_session(source: Path, folder: Path) -> object:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from model.serving.runtime import load_session

    target = folder / f"{source.stem}.int8.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser gives advice on the root logger
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return load_session(target, None, intra_op_threads=1)


def scoring_costs(settings: Settings, *, candidates: int = 500, repeats: int = 200, seed: int = 0) -> dict[str, float]:
    """Median ms to score ``candidates``: the served rule scorer and the trained ranker's architecture."""
    import torch

    from model.export.fused import INPUT_NAMES, Networks, export_network
    from model.export.rule_scorer import rule_scorer_module
    from model.nets.towers import TowerConfig
    from model.serving.runtime import load_session
    from stream.services import load_serving_model

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    model = load_serving_model(settings)
    n, d, t, i = candidates, model.fused_dim, model.text_dim, model.image_dim

    def unit(*shape: int) -> np.ndarray:
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    context = np.stack([rng.uniform(0, 8, n), rng.uniform(0, 30, n), rng.uniform(-1, 1, n)], 1).astype(np.float32)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        # The served scorer: the rule model's ONNX file (or a trained model's ranker, through the model).
        rule_feed = {"user": unit(d), "query": np.zeros(t, np.float32), "cand_fused": unit(n, d),
                     "cand_text": unit(n, t), "cand_image": np.zeros((n, i), np.float32), "context": context}
        results["served_onnx_fp32_ms"] = _median_ms(
            lambda: model.score(rule_feed["user"], None, rule_feed["cand_fused"], rule_feed["cand_text"],
                                rule_feed["cand_image"], context), repeats)
        rule_path = settings.models_path / "rule" / "ranker.onnx"
        if model.version.startswith("rule") and rule_path.exists():
            rule_int8 = _int8_session(rule_path, Path(folder))
            results["served_onnx_int8_ms"] = _median_ms(lambda: rule_int8.run(None, rule_feed), repeats)  # type: ignore[attr-defined]
            scorer = rule_scorer_module().eval()
            rule_tensors = [torch.from_numpy(v) for v in rule_feed.values()]
            with torch.inference_mode():
                results["served_torch_eager_ms"] = _median_ms(lambda: scorer(*rule_tensors), repeats)
        # The trained ranker's architecture (random weights: cost does not depend on their values).
        config = TowerConfig(n_items=1000, n_attributes=100, max_attributes=8)
        networks = Networks.build(config)
        networks.ranker.eval()
        ranker_path = Path(folder) / "ranker.onnx"
        export_network(networks, "ranker", ranker_path)
        cd, ct, ci = config.fused_dim, config.text_dim, config.image_dim
        ranker_feed = dict(zip(INPUT_NAMES["ranker"], (
            np.repeat(unit(1, cd), n, 0), unit(n, cd), unit(n, ct), np.abs(unit(n, ci)),
            np.repeat(unit(1, ct), n, 0), context)))
        fp32, int8 = load_session(ranker_path, None, intra_op_threads=1), _int8_session(ranker_path, Path(folder))
        results["ranker_onnx_fp32_ms"] = _median_ms(lambda: fp32.run(None, ranker_feed), repeats)
        results["ranker_onnx_int8_ms"] = _median_ms(lambda: int8.run(None, ranker_feed), repeats)  # type: ignore[attr-defined]
        results["ranker_int8_max_abs_diff"] = float(np.abs(fp32.run(None, ranker_feed)[0]
                                                           - int8.run(None, ranker_feed)[0]).max())  # type: ignore[attr-defined]
        ranker_tensors = [torch.from_numpy(ranker_feed[name]) for name in INPUT_NAMES["ranker"]]
        with torch.inference_mode():
            results["ranker_torch_eager_ms"] = _median_ms(lambda: networks.ranker(*ranker_tensors), repeats)
    return {key: round(value, 4) for key, value in results.items()}


# -- the benchmark ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("serve", __doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--clicks-per-user", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4, help="concurrent closed-loop clients")
    parser.add_argument("--requests", type=int, default=2000, help="requests per path (HTTP, Kafka)")
    parser.add_argument("--recall-queries", type=int, default=200)
    parser.add_argument("--partitions", type=int, default=4)
    add_processes_option(parser)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the load, serve N requests in this process and print their profile")
    parser.add_argument("--wrk-seconds", type=float, default=20.0,
                        help="also load HTTP with wrk (a C load generator) for this long; 0: skip "
                             "(skipped with a note when wrk is not installed)")
    parser.add_argument("--sizing", action="store_true",
                        help="measure recall and search cost for several candidate counts (hnsw_ef = count)")
    args = parser.parse_args(argv)
    result, settings = run_on_one_stack(args, "serve", run)
    result.update(scoring_costs(settings))
    result["onnx_vs_torch_speedup"] = round(result["served_torch_eager_ms"] / result["served_onnx_fp32_ms"], 3) \
        if "served_torch_eager_ms" in result else None
    result["ranker_onnx_vs_torch_speedup"] = round(result["ranker_torch_eager_ms"] / result["ranker_onnx_fp32_ms"], 3)
    report(f"serve: {args.items} items, {args.users} users, {args.clients} concurrent clients, "
           f"{args.requests} requests per path", result)
    return 0


@dataclass
class Prepared:
    """A running worker over a seeded catalogue and seeded users."""

    worker: WorkerProcess
    seeded: Seeded
    user_ids: list[str]


def prepare(args: argparse.Namespace, settings: Settings, folder: Path) -> Prepared:
    """Seed ``args.items`` items (indexed), start the worker (``args.processes``), give
    ``args.users`` users their clicks through it, and ask for every user once, so the
    item cache holds the candidates as in steady state. The caller stops the worker."""
    print(f"seeding {args.items} items and building their index ...", flush=True)
    seeded = seed_catalogue(settings, item_vectors(args.items, served_fused_dim(settings), args.seed),
                            optimize=True, processes=args.processes)
    print(f"  upserts {seeded.items / seeded.upsert_seconds:.0f}/s, index {seeded.index_seconds:.1f} s\n"
          f"starting the worker ({args.processes} process(es)) ...", flush=True)
    worker = start_worker(settings, folder / "logs" / "worker.log", processes=args.processes)
    try:
        print(f"seeding {args.users} users ({args.clicks_per_user} clicks each) through it ...", flush=True)
        user_ids = seed_users_through(worker, settings, users=args.users, clicks_per_user=args.clicks_per_user,
                                      items=args.items, seed=args.seed)
        asyncio.run(http_load(settings, user_ids, clients=args.clients, requests=len(user_ids), seed=args.seed + 1))
    except BaseException:
        worker.stop()
        raise
    return Prepared(worker, seeded, user_ids)


class PerProcess:
    """Over a ``with`` block: each worker process's CPU share and the requests it answered on ``path``."""

    def __init__(self, worker: WorkerProcess, path: str) -> None:
        self.worker, self.path = worker, path

    def _answered(self) -> list[float]:
        return self.worker.metric_per_process("streamrec_request_latency_seconds_count", {"path": self.path})

    def __enter__(self) -> "PerProcess":
        self._before = self._answered()
        self._cpu = CpuShares(self.worker.pids()).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cpu.__exit__(*exc)
        self.answered = [int(a - b) for a, b in zip(self._answered(), self._before)]

    def figures(self, prefix: str) -> dict[str, object]:
        return {f"{prefix}_answered_per_process": self.answered, f"{prefix}_cpu_share_per_process": self._cpu.processes}


def run(args: argparse.Namespace, settings: Settings, folder: Path) -> dict[str, object]:
    prepared = prepare(args, settings, folder)
    worker, seeded = prepared.worker, prepared.seeded
    try:
        server_ms: list[float] = []
        with WorkerWindow(worker) as whole_load:  # the three loads
            print("HTTP load ...", flush=True)
            with WorkerWindow(worker) as http_window, PerProcess(worker, "http") as http_share:
                http = asyncio.run(http_load(settings, prepared.user_ids, clients=args.clients, requests=args.requests,
                                             seed=args.seed, server_ms=server_ms))
            print("Kafka load ...", flush=True)
            with WorkerWindow(worker) as kafka_window, PerProcess(worker, "kafka") as kafka_share:
                kafka = asyncio.run(kafka_load(settings, prepared.user_ids, clients=args.clients, requests=args.requests,
                                               seed=args.seed))
            with PerProcess(worker, "http") as wrk_share:
                by_wrk = wrk_phase(settings, worker, prepared.user_ids, args)
            if by_wrk:
                by_wrk.update(wrk_share.figures("wrk"))
            served = worker.metric("streamrec_request_latency_seconds_count")
    finally:
        worker.stop()
    stores = process_settings(settings, args.processes)
    user_ids, vectors = user_vectors_sample(settings, args.users, args.seed, args.processes)
    recall = ann_recall(stores[0], vectors[:args.recall_queries])
    print(f"  recall@100 {recall['recall']:.3f}", flush=True)
    sizing = candidate_sizing(stores[0], vectors[:args.recall_queries]) if args.sizing else None
    own = [uid for uid in user_ids if process_owning(uid, settings, args.processes) == 0]
    profiled = profile_requests(stores[0], own, args.profile) if args.profile else {}
    http_summary, kafka_summary = latency_summary("http", http), latency_summary("kafka", kafka)
    result: dict[str, object] = {
        "http_p50_ms": http_summary["http_p50_ms"],
        "http_p99_ms": http_summary["http_p99_ms"],
        "http_p999_ms": http_summary["http_p999_ms"],
        "kafka_p50_ms": kafka_summary["kafka_p50_ms"],
        "kafka_p99_ms": kafka_summary["kafka_p99_ms"],
        "kafka_p999_ms": kafka_summary["kafka_p999_ms"],
        "http_server_p50_ms": round(percentiles(server_ms, (50,))["p50"], 3),
        "http_server_p99_ms": round(percentiles(server_ms, (99,))["p99"], 3),
        "http_loop_lag_p99_ms": http_window.quantile_ms("streamrec_event_loop_lag_seconds", 0.99),
        "kafka_loop_lag_p99_ms": kafka_window.quantile_ms("streamrec_event_loop_lag_seconds", 0.99),
        **by_wrk,
        **whole_load.full_collections(),
        "recall_at_100": round(recall["recall"], 4),
        "ann_search_p50_ms": round(recall["ann_p50_ms"], 3),
        "ann_search_p99_ms": round(recall["ann_p99_ms"], 3),
        "exact_search_p50_ms": round(recall["exact_p50_ms"], 3),
        "http_requests_per_s": round(len(http) / sum(http) * args.clients, 1),
        "kafka_requests_per_s": round(len(kafka) / sum(kafka) * args.clients, 1),
        "requests_served": int(served),
        "processes": args.processes,
        **http_share.figures("http"),
        **kafka_share.figures("kafka"),
        "items": args.items,
        "users": len(user_ids),
        "clients": args.clients,
        "candidates": settings.candidates,
        "hnsw_ef": settings.hnsw_ef,
        "upserts_per_s": round(seeded.items / seeded.upsert_seconds, 1),
        "upserts_per_cpu_s": round(seeded.items / seeded.upsert_cpu_seconds, 1),
        "index_seconds": round(seeded.index_seconds, 1),
        "index_cpu_seconds": round(seeded.index_cpu_seconds, 1),
        **profiled,
    }
    if sizing is not None:
        result["sizing"] = sizing
    return result


if __name__ == "__main__":
    sys.exit(main())
