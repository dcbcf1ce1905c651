"""``streamrec bench freshness``: time from a click's publish to the first recommendation that reflects it.

A probe is a new user's first click, on a random catalogue item X. Before it
the user is cold: every recommendation says "trending now" or "from the
catalogue". Once the worker has applied the click the user has a vector, the
personal candidates come first and each says "because you viewed '<title of
X>'". A probe publishes the click, then asks for the user's recommendations
over HTTP, one request at a time and at most one every ``--poll-interval-ms``
(a tighter loop would take the worker's CPU from the clicks it waits for); its
freshness is the time from just before the publish to the arrival of the first
response that cites X's title. The resolution is one poll interval or request
round trip, whichever is longer, and is included. A poll the
worker answers with an error is counted (``server_errors``) and the probe goes on.

Probes run one after another while a background producer publishes other
users' clicks at ``--background-rate``, so each probe waits behind real batches.

The probes run in ``--rounds`` rounds (default 3) on the same worker, each with
its own background producer. Two whole runs once gave p99 262 and 451 ms: one
figure hides how much a tail moves from run to run, so the JSON has the pooled
percentiles under the usual keys and each round's p50/p99 with their spread.

With ``--processes N`` the worker runs as N processes on the shared port. A
probe's clicks go to the process that owns the user, its polls to whichever
process took the HTTP connection, which answers a user it does not own from
the owner's shared user table (or passes the request on to the owner where
that table does not hold the user yet): freshness is measured whichever
process answers.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import (
    add_processes_option,
    bench_parser,
    paced,
    percentiles,
    report,
    run_on_one_stack,
    start_worker,
)
from bench.ingest import item_id, item_vectors, seed_catalogue, served_fused_dim
from core.events import ClickEvent, RecRequest
from core.settings import Settings
from stream.client import EventPublisher, http_recommend

PROBE_TIMEOUT_S = 10.0


@dataclass
class Probes:
    latencies_ms: list[float] = field(default_factory=list)
    polls: list[int] = field(default_factory=list)  # requests each probe needed
    timed_out: int = 0
    server_errors: list[str] = field(default_factory=list)  # polls the worker failed (counted, then retried)
    # For each timed-out probe: its item and the reasons of the last answer it got.
    timeouts_seen: list[str] = field(default_factory=list)

    def merge(self, other: "Probes") -> None:
        self.latencies_ms += other.latencies_ms
        self.polls += other.polls
        self.timed_out += other.timed_out
        self.timeouts_seen += other.timeouts_seen
        self.server_errors += other.server_errors


def reflects(response: object, title: str) -> bool:
    """Whether any recommendation is explained by the probe's click.

    Either reason that names an item reads it from the user's stored history:
    "because you viewed" for a candidate the user's vector found, "often chosen
    after" for one the co-visits put first. Once the background clicks have
    taught co-visits for the clicked item, a whole answer may carry the second
    only (counting the first alone left such probes waiting until they timed out).
    """
    cited = {f"because you viewed '{title}'", f"often chosen after '{title}'"}
    return any(item.reason in cited for item in response.items)  # type: ignore[attr-defined]


async def background_clicks(publisher: EventPublisher, *, rate: float, users: int, items: int,
                            stop: asyncio.Event, seed: int) -> int:
    """Other users' clicks at ``rate`` per second until ``stop``; how many were sent."""
    rng = random.Random(seed)
    sent = 0
    async for _ in paced(itertools.count(), rate):
        if stop.is_set():
            break
        await publisher.publish(ClickEvent(event_id=f"bg-{seed}-{sent}", event_time=time.time(),
                                           user_id=f"bg{rng.randrange(users)}",
                                           item_id=item_id(rng.randrange(items)), action="click"))
        sent += 1
    return sent


async def run_probes(settings: Settings, *, probes: int, items: int, background_rate: float,
                     background_users: int, poll_interval_s: float, seed: int) -> tuple[Probes, int]:
    rng = random.Random(seed)
    result = Probes()
    stop = asyncio.Event()
    run_id = uuid.uuid4().hex[:8]
    async with EventPublisher(settings, linger_ms=0) as probe_publisher, \
            EventPublisher(settings, linger_ms=5) as background_publisher, \
            aiohttp.ClientSession() as session:
        background = asyncio.create_task(background_clicks(
            background_publisher, rate=background_rate, users=background_users, items=items, stop=stop,
            seed=seed))
        try:
            await asyncio.sleep(2.0)  # let the background reach its rate
            for n in range(probes):
                user, item = f"fresh-{run_id}-{n}", rng.randrange(items)
                title = f"synthetic item {item}"
                click = ClickEvent(event_id=f"probe-{run_id}-{n}", event_time=time.time(), user_id=user,
                                   item_id=item_id(item), action="click")
                started = time.perf_counter()
                await probe_publisher.publish(click)
                polls, asked, response = 0, started, None
                while time.perf_counter() - started < PROBE_TIMEOUT_S:
                    if polls:
                        await asyncio.sleep(max(0.0, asked + poll_interval_s - time.perf_counter()))
                    polls += 1
                    asked = time.perf_counter()
                    try:
                        response = await http_recommend(
                            settings, RecRequest(request_id=uuid.uuid4().hex, user_id=user), session=session)
                    except RuntimeError as exc:  # an HTTP 5xx: reported, and the probe goes on
                        result.server_errors.append(str(exc)[:200])
                        continue
                    if reflects(response, title):
                        result.latencies_ms.append(1e3 * (time.perf_counter() - started))
                        result.polls.append(polls)
                        break
                else:
                    result.timed_out += 1
                    reasons = [item.reason for item in response.items] if response is not None else []
                    result.timeouts_seen.append(f"{title}: {reasons}")
        finally:
            stop.set()
            sent = await background
    return result, sent


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("freshness", __doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=1000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--background-rate", type=float, default=100.0, help="other users' clicks per second")
    parser.add_argument("--poll-interval-ms", type=float, default=10.0,
                        help="shortest time between the starts of two polls of one probe")
    parser.add_argument("--background-users", type=int, default=5000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3,
                        help="run --probes probes this many times and report each round's percentiles")
    add_processes_option(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    result, _ = run_on_one_stack(args, "freshness", run)
    report(f"freshness: {args.rounds} x {args.probes} probes under {args.background_rate:.0f} background clicks/s, "
           f"{args.items} items", result)
    return 0


def run(args: argparse.Namespace, settings: Settings, folder: Path) -> dict[str, object]:
    print(f"seeding {args.items} items ...", flush=True)
    seed_catalogue(settings, item_vectors(args.items, served_fused_dim(settings), args.seed), optimize=False,
                   processes=args.processes)
    worker = start_worker(settings, folder / "logs" / "worker.log", processes=args.processes)
    try:
        probes, rounds, background_sent, seconds = Probes(), [], 0, 0.0
        for index in range(args.rounds):
            print(f"round {index + 1}/{args.rounds}: {args.probes} probes ...", flush=True)
            started = time.perf_counter()
            round_probes, sent = asyncio.run(run_probes(
                settings, probes=args.probes, items=args.items, background_rate=args.background_rate,
                background_users=args.background_users, poll_interval_s=args.poll_interval_ms / 1000,
                seed=args.seed + index))
            seconds += time.perf_counter() - started
            background_sent += sent
            probes.merge(round_probes)
            rounds.append(round_figures(round_probes))
            print(f"  p50 {rounds[-1]['p50_ms']} ms, p99 {rounds[-1]['p99_ms']} ms", flush=True)
        applied = worker.metric_per_process("streamrec_events_processed_total", {"topic": "clicks"})
    finally:
        worker.stop()
    shown = percentiles(probes.latencies_ms, (50, 90, 99))
    return {
        "p50_ms": round(shown["p50"], 2),
        "p99_ms": round(shown["p99"], 2),
        "probes": len(probes.latencies_ms),
        "p90_ms": round(shown["p90"], 2),
        "max_ms": round(max(probes.latencies_ms, default=float("nan")), 2),
        "timed_out": probes.timed_out,
        "timed_out_last_answers": probes.timeouts_seen[:5],
        "server_errors": len(probes.server_errors),
        "mean_polls": round(sum(probes.polls) / max(1, len(probes.polls)), 2),
        "background_clicks_per_s": round(background_sent / seconds, 1),
        "poll_interval_ms": args.poll_interval_ms,
        "clicks_applied": int(sum(applied)),
        "processes": args.processes,
        "clicks_applied_per_process": [int(value) for value in applied],
        "items": args.items,
        "partitions": args.partitions,
        "rounds": args.rounds,
        "spread": {key: {"min": min(values, default=None), "max": max(values, default=None)}
                   for key in ("p50_ms", "p99_ms")
                   for values in [[r[key] for r in rounds if r[key] is not None]]},
        "per_round": rounds,
    }


def round_figures(probes: Probes) -> dict[str, float | int]:
    shown = {key: None if math.isnan(value) else round(value, 2)  # JSON has no NaN
             for key, value in percentiles(probes.latencies_ms, (50, 99)).items()}
    return {"p50_ms": shown["p50"], "p99_ms": shown["p99"],
            "probes": len(probes.latencies_ms), "timed_out": probes.timed_out}


if __name__ == "__main__":
    sys.exit(main())
