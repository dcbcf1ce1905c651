"""``streamrec bench processes``: 1 vs N worker processes, requests/s and clicks/s in one run.

For each process count (1, then ``--processes``), on one embedded broker: a
worker on a fresh data dir and topics of its own, the MovieLens-100k catalogue
(every process embeds the whole catalogue), then ``--clicks`` clicks of
``--users`` users published at once and timed until every one is applied
(read from each process's counters), then ``--clients`` closed-loop HTTP
clients on the shared port, ``--requests`` requests over those users. Reports
per process count the clicks/s and requests/s with latency percentiles, how
the clicks and requests fell to each process, and the ratios N : 1.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid
from pathlib import Path

import aiohttp

from bench import movielens, wrk
from bench.common import (
    CpuShares,
    bench_parser,
    report,
    stack_settings,
    start_broker,
    wait_for,
    work_dir,
)
from bench.stack import LocalStack
from core.events import ClickEvent, RecRequest
from core.settings import Settings, load_settings
from stream.client import EventPublisher

LATENCY = "streamrec_request_latency_seconds_count"
PROCESSED = "streamrec_events_processed_total"
PEER_REQUESTS = "streamrec_peer_user_requests_total"


def _clicks(item_ids: list[str], *, users: int, count: int, seed: int) -> list[ClickEvent]:
    rng = random.Random(seed)
    now = time.time()
    return [ClickEvent(event_id=f"proc-{seed}-{n}", event_time=now + n * 0.001, user_id=f"pu{rng.randrange(users)}",
                       item_id=rng.choice(item_ids), action="click") for n in range(count)]


async def _publish(settings: Settings, events: list[object]) -> None:
    async with EventPublisher(settings, linger_ms=20) as publisher:
        for event in events:
            await publisher.publish(event)  # type: ignore[arg-type]
        await publisher.flush()


async def _load(settings: Settings, users: list[str], *, clients: int, requests: int, seed: int) -> list[float]:
    url = f"http://{settings.http_host}:{settings.http_port}/recommend"
    rng = random.Random(seed)
    latencies: list[float] = []
    remaining = [requests]

    async def client(session: aiohttp.ClientSession) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            body = RecRequest(request_id=uuid.uuid4().hex, user_id=rng.choice(users), k=10).to_bytes()
            started = time.perf_counter()
            async with session.post(url, data=body) as reply:
                await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"HTTP {reply.status} from {url}")
            latencies.append(time.perf_counter() - started)

    # A new connection per request: the kernel spreads connections, not requests, over the processes.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return latencies


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(base: Settings, broker: object, folder: Path, processes: int, args: object) -> dict[str, object]:
    settings = stack_settings(base, broker, folder / f"n{processes}", f"n{processes}",  # type: ignore[arg-type]
                              partitions=args.partitions)  # type: ignore[attr-defined]
    catalogue = movielens.catalog_events()
    item_ids = [item.item_id for item in catalogue]
    with LocalStack(settings, log_dir=folder / "logs" / f"n{processes}", start_broker=False,
                    processes=processes) as stack:
        worker = stack.worker

        per_process = worker.metric_per_process

        asyncio.run(_publish(settings, list(catalogue)))
        if not wait_for(lambda: min(per_process(PROCESSED, {"topic": "catalog"})) >= len(catalogue),
                        timeout_s=900):
            raise RuntimeError("the catalogue was not applied; see the worker log")
        clicks = _clicks(item_ids, users=args.users, count=args.clicks, seed=args.seed)  # type: ignore[attr-defined]
        started = time.perf_counter()
        with CpuShares(worker.pids(), broker.pid) as click_cpu:  # type: ignore[attr-defined]
            asyncio.run(_publish(settings, list(clicks)))
            if not wait_for(lambda: sum(per_process(PROCESSED, {"topic": "clicks"})) >= len(clicks), timeout_s=900,
                            interval_s=0.05):
                raise RuntimeError("the clicks were not applied; see the worker log")
        click_seconds = time.perf_counter() - started
        clicks_per_process = per_process(PROCESSED, {"topic": "clicks"})
        users = sorted({click.user_id for click in clicks})
        asyncio.run(_load(settings, users, clients=args.clients, requests=min(200, args.requests),  # type: ignore[attr-defined]
                          seed=args.seed))  # warm-up
        before = per_process(LATENCY, {"path": "http"})
        started = time.perf_counter()
        latencies = asyncio.run(_load(settings, users, clients=args.clients,  # type: ignore[attr-defined]
                                      requests=args.requests, seed=args.seed + 1))  # type: ignore[attr-defined]
        request_seconds = time.perf_counter() - started
        answered = [after - b for after, b in zip(per_process(LATENCY, {"path": "http"}), before)]
        with CpuShares(worker.pids(), broker.pid) as wrk_cpu:  # type: ignore[attr-defined]
            by_wrk = _wrk(settings, users, args)
        if by_wrk:
            by_wrk["wrk_cpu_share_per_process"] = wrk_cpu.processes
            by_wrk["wrk_cpu_share_broker"] = wrk_cpu.broker
        # Requests for a user another process owns, over every load: answered where they landed
        # (from the owner's shared user table) or passed on to the owner.
        peer_users = {answered: int(sum(per_process(PEER_REQUESTS, {"answered": answered})))
                      for answered in ("here", "passed_on")}
    return {
        "processes": processes,
        "clicks_per_s": round(len(clicks) / click_seconds, 1),
        "requests_per_s": round(len(latencies) / request_seconds, 1),
        "http_p50_ms": round(1000 * _percentile(latencies, 0.5), 2),
        "http_p99_ms": round(1000 * _percentile(latencies, 0.99), 2),
        "clicks_per_process": [int(c) for c in clicks_per_process],
        "clicks_cpu_share_per_process": click_cpu.processes,
        "clicks_cpu_share_broker": click_cpu.broker,
        "requests_answered_per_process": [int(a) for a in answered],
        "peer_user_requests_here": peer_users["here"],
        "peer_user_requests_passed_on": peer_users["passed_on"],
        **by_wrk,
    }


def _wrk(settings: Settings, users: list[str], args: object) -> dict[str, object]:
    """The same HTTP load from wrk (a C client that leaves the CPU to the workers); {} when skipped."""
    seconds = args.wrk_seconds  # type: ignore[attr-defined]
    if not seconds or not wrk.available():
        return {}
    figures = wrk.wrk_recommend(f"http://{settings.http_host}:{settings.http_port}", users,
                                connections=args.clients, seconds=seconds, seed=args.seed)  # type: ignore[attr-defined]
    return {"wrk_requests_per_s": round(figures["requests_per_s"], 1), "wrk_p50_ms": round(figures["p50_ms"], 2),
            "wrk_p99_ms": round(figures["p99_ms"], 2), "wrk_errors": int(figures["errors"])}


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("processes", __doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="compared with 1 process")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--clicks", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--wrk-seconds", type=float, default=20.0,
                        help="then load HTTP with wrk for this long (0: skip; skipped when wrk is not installed)")
    args = parser.parse_args(argv)
    if args.wrk_seconds and not wrk.available():
        print("wrk is not installed (apt-get install wrk): no wrk figures", flush=True)
    base = load_settings()
    with work_dir(args.work_dir, "processes") as folder:
        broker = start_broker(folder / "logs")
        try:
            runs = [measure(base, broker, folder, n, args) for n in (1, args.processes)]
        finally:
            broker.stop()
    one, many = runs
    result: dict[str, object] = {
        "processes": args.processes,
        "requests_per_s_1": one["requests_per_s"],
        f"requests_per_s_{args.processes}": many["requests_per_s"],
        "requests_ratio": round(float(many["requests_per_s"]) / float(one["requests_per_s"]), 2),  # type: ignore[arg-type]
        "clicks_per_s_1": one["clicks_per_s"],
        f"clicks_per_s_{args.processes}": many["clicks_per_s"],
        "clicks_ratio": round(float(many["clicks_per_s"]) / float(one["clicks_per_s"]), 2),  # type: ignore[arg-type]
        **({"wrk_requests_ratio": round(float(many["wrk_requests_per_s"]) / float(one["wrk_requests_per_s"]), 2)}  # type: ignore[arg-type]
           if "wrk_requests_per_s" in one and "wrk_requests_per_s" in many else {}),
        "runs": runs,
        "clients": args.clients,
        "requests": args.requests,
        "clicks": args.clicks,
    }
    report(f"1 vs {args.processes} worker processes ({args.clients} HTTP clients, {args.clicks} clicks)", result)
    return 0
