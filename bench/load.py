"""``streamrec bench load``: hold a publish rate of clicks (plus a few malformed messages) and watch the lag.

Lag is what the broker acknowledged to the producer minus what the worker has
finished with (``streamrec_events_processed_total`` + ``streamrec_deadletter_total``),
sampled every second; the broker's end offsets are never read. ``--find-max``
ramps the rate in steps, draining between them, to find the highest rate the
worker sustains (lag bounded and not growing); then hold 80% of that rate
with ``--rate``.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from bench import movielens
from bench.common import (
    RecordingPublisher,
    Supervisor,
    bench_parser,
    handled,
    metric_totals,
    paced,
    percentiles,
    report,
    stack_settings,
    start_broker,
    work_dir,
)
from bench.fuzzcases import MUTATIONS, FuzzCase, FuzzLimits, generate_cases
from bench.stack import WorkerProcess
from core.events import CatalogItem, ClickEvent
from core.settings import Settings, load_settings

# Oversize cases are left out of the mix: the embedded broker keeps every byte
# in memory, and a long run at 1% malformed would hold gigabytes of padding.
MALFORMED_KINDS = frozenset(MUTATIONS) - {"oversize"}
SAMPLE_INTERVAL_S = 1.0
DRAIN_STALL_S = 60.0
PRINT_EVERY_SAMPLES = 30


@dataclass
class Step:
    """One rate held for a while, and what the worker did meanwhile."""

    rate: float
    seconds: float
    sent: int = 0
    refused: int = 0
    malformed_sent: int = 0
    applied: int = 0
    dead_lettered: int = 0
    publish_seconds: float = 0.0
    drain_seconds: float = 0.0
    drained: bool = False
    worker_restarts: int = 0
    # (seconds since start, lag) sampled every second while publishing, then while draining
    lag_samples: list[tuple[float, float]] = field(default_factory=list)
    drain_samples: list[tuple[float, float]] = field(default_factory=list)

    @property
    def max_lag(self) -> float:
        return max((lag for _, lag in self.lag_samples + self.drain_samples), default=0.0)

    @property
    def lost(self) -> int | None:
        """Messages never finished, once the worker drained; None when it did not drain in time."""
        return self.sent - self.applied - self.dead_lettered if self.drained else None

    @property
    def backlog(self) -> int:
        """Messages not finished when the benchmark stopped waiting."""
        return self.sent - self.applied - self.dead_lettered

    def sustained(self) -> bool:
        """The producer held the rate, and over the second half the lag stayed bounded and flat.

        Bounded: under two seconds' worth of messages. Flat: growing by less than
        10% of the rate per second, unless it stays under half a second's worth
        (batching alone makes the lag jump by a few hundred messages).
        """
        if self.sent < 0.95 * self.rate * self.seconds or self.worker_restarts:
            return False
        half = [(t, lag) for t, lag in self.lag_samples if t >= self.seconds / 2]
        if len(half) < 3:
            return False
        times, lags = np.array(half).T
        slope = float(np.polyfit(times, lags, 1)[0])  # lag growth, messages/s
        bounded = lags.max() <= max(2.0 * self.rate, 1000.0)
        flat = slope < 0.1 * self.rate or lags.max() <= max(0.5 * self.rate, 500.0)
        return bool(bounded and flat)


def click_events(item_ids: list[str], users: int, seed: int) -> Iterator[ClickEvent]:
    rng = random.Random(seed)
    n = 0
    while True:
        n += 1
        yield ClickEvent(event_id=f"load-{seed}-{n}", event_time=time.time(), user_id=f"lu{rng.randrange(users)}",
                         item_id=rng.choice(item_ids), action=rng.choice(("view", "click", "click", "add_to_cart")))


async def hold_rate(settings: Settings, supervisor: Supervisor, rate: float, seconds: float, *,
                    clicks: Iterator[ClickEvent], malformed: Iterator[FuzzCase], malformed_share: float,
                    seed: int, drain_timeout_s: float, linger_ms: int) -> Step:
    step = Step(rate=rate, seconds=seconds)
    worker = supervisor.worker
    assert worker is not None
    before = await asyncio.to_thread(metric_totals, worker, ("streamrec_events_processed_total",
                                                             "streamrec_deadletter_total"))
    baseline = sum(before.values())
    rng = random.Random(seed)
    started = time.perf_counter()
    async with RecordingPublisher(settings, settle_every=2000, linger_ms=linger_ms) as publisher:

        async def produce() -> None:
            deadline = started + seconds
            async for _ in paced(itertools.count(), rate):
                if time.perf_counter() >= deadline:
                    break
                if rng.random() < malformed_share:
                    case = next(malformed)
                    await publisher.publish_raw(settings.topic(case.topic_key), case.value, case.key)
                    step.malformed_sent += 1
                else:
                    await publisher.publish(next(clicks))
            await publisher.settle()
            step.publish_seconds = time.perf_counter() - started

        async def sample(samples: list[tuple[float, float]]) -> float:
            done = await asyncio.to_thread(handled, _running(supervisor)) - baseline
            elapsed = time.perf_counter() - started
            samples.append((elapsed, publisher.acknowledged - done))
            if len(samples) % PRINT_EVERY_SAMPLES == 0:
                print(f"    {elapsed:6.0f}s  acknowledged {publisher.acknowledged:8d}  finished {done:8.0f}"
                      f"  lag {publisher.acknowledged - done:8.0f}", flush=True)
            return done

        producer = asyncio.create_task(produce())
        while not producer.done():
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            await sample(step.lag_samples)
        await producer
        drain_started = time.perf_counter()
        last_done, last_change = -1.0, time.perf_counter()
        while time.perf_counter() - drain_started < drain_timeout_s:
            done = await sample(step.drain_samples)
            if done >= publisher.acknowledged:
                step.drained = True
                break
            if done != last_done:
                last_done, last_change = done, time.perf_counter()
            elif time.perf_counter() - last_change > DRAIN_STALL_S:
                break
            await asyncio.sleep(SAMPLE_INTERVAL_S)
        step.drain_seconds = time.perf_counter() - drain_started
        step.sent, step.refused = publisher.acknowledged, len(publisher.refused)
    after = await asyncio.to_thread(metric_totals, _running(supervisor), tuple(before))
    step.applied = int(after["streamrec_events_processed_total"] - before["streamrec_events_processed_total"])
    step.dead_lettered = int(after["streamrec_deadletter_total"] - before["streamrec_deadletter_total"])
    return step


def _running(supervisor: Supervisor) -> WorkerProcess:
    """The worker, restarted first if it has exited (counted by the supervisor)."""
    supervisor.check()
    assert supervisor.worker is not None
    return supervisor.worker


def step_row(step: Step) -> str:
    lags = [lag for _, lag in step.lag_samples]
    p = percentiles(lags, (50, 99))
    return (f"  rate {step.rate:8.0f}/s  sent {step.sent:8d}  achieved {step.sent / max(step.publish_seconds, 1e-9):8.0f}/s"
            f"  lag p50 {p['p50']:8.0f}  p99 {p['p99']:8.0f}  max {step.max_lag:8.0f}"
            f"  drain {step.drain_seconds:5.1f}s  {'sustained' if step.sustained() else 'NOT sustained'}")


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("load", __doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="clicks/s to hold")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to hold it")
    parser.add_argument("--malformed", type=float, default=0.01, help="share of malformed messages")
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--find-max", action="store_true", help="ramp the rate to find the highest sustained one")
    parser.add_argument("--start-rate", type=float, default=1000.0)
    parser.add_argument("--step-seconds", type=float, default=20.0)
    parser.add_argument("--refine", type=int, default=2, help="bisection steps after the ramp fails")
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--linger-ms", type=int, default=50,
                        help="producer linger: how long it gathers messages into one record batch")
    args = parser.parse_args(argv)
    base = load_settings()
    catalogue = movielens.catalog_events()
    with work_dir(args.work_dir, "load") as folder:
        broker = start_broker(folder / "logs")
        try:
            settings = stack_settings(base, broker, folder / "load", "load", partitions=args.partitions)
            supervisor = Supervisor(settings, folder / "logs" / "worker.log")
            try:
                supervisor.start()
                result = asyncio.run(_run(args, settings, supervisor, catalogue))
            finally:
                supervisor.stop()
        finally:
            broker.stop()
    report("load: " + ("ramp to the highest sustained rate" if args.find_max else
                       f"{args.rate:.0f} clicks/s for {args.seconds:.0f} s"), result)
    return 0


async def _run(args: argparse.Namespace, settings: Settings, supervisor: Supervisor,
               catalogue: list[CatalogItem]) -> dict[str, object]:
    # The catalogue first, so that clicks meet known items (as in production).
    async with RecordingPublisher(settings) as publisher:
        for item in catalogue:
            await publisher.publish(item)
        await publisher.settle()
    worker = supervisor.worker
    assert worker is not None
    while await asyncio.to_thread(worker.metric, "streamrec_events_processed_total", {"topic": "catalog"}) < len(catalogue):
        await asyncio.sleep(0.5)
    clicks = click_events([item.item_id for item in catalogue], args.users, args.seed)
    limits = FuzzLimits(max_event_bytes=settings.max_event_bytes, max_image_pixels=settings.max_image_pixels)
    malformed = generate_cases(None, seed=args.seed, limits=limits, kinds=MALFORMED_KINDS)

    steps: list[Step] = []

    async def hold(rate: float, seconds: float) -> Step:
        restarts = supervisor.restarts
        step = await hold_rate(settings, supervisor, rate, seconds, clicks=clicks, malformed=malformed,
                               malformed_share=args.malformed, seed=args.seed, drain_timeout_s=args.drain_timeout,
                               linger_ms=args.linger_ms)
        step.worker_restarts = supervisor.restarts - restarts
        steps.append(step)
        print(step_row(step), flush=True)
        return step

    if not args.find_max:
        step = await hold(args.rate, args.seconds)
        lags = [lag for _, lag in step.lag_samples]
        return {
            "rate": args.rate, "seconds": args.seconds, "sent": step.sent, "applied": step.applied,
            "dead_lettered": step.dead_lettered, "max_lag": step.max_lag, "lost": step.lost,
            "backlog_when_stopped": step.backlog,
            "malformed_sent": step.malformed_sent, "refused": step.refused,
            "achieved_rate": round(step.sent / max(step.publish_seconds, 1e-9), 1),
            "lag_p50": percentiles(lags)["p50"], "lag_p99": percentiles(lags)["p99"],
            "drain_seconds": round(step.drain_seconds, 1), "drained": step.drained,
            "sustained": step.sustained(), "worker_restarts": supervisor.restarts,
        }
    good, bad = 0.0, None
    rate = args.start_rate
    while bad is None:
        if (await hold(rate, args.step_seconds)).sustained():
            good, rate = rate, rate * 1.5
        else:
            bad = rate
    for _ in range(args.refine):
        middle = (good + bad) / 2
        if (await hold(middle, args.step_seconds)).sustained():
            good = middle
        else:
            bad = middle
    return {
        "max_sustained_rate": round(good, 1),
        "first_unsustained_rate": round(bad, 1),
        "step_seconds": args.step_seconds,
        "steps": [{"rate": round(s.rate, 1), "sent": s.sent, "max_lag": s.max_lag, "lost": s.lost,
                   "sustained": s.sustained()} for s in steps],
        "lost": sum(s.lost for s in steps) if all(s.drained for s in steps) else None,
        "worker_restarts": supervisor.restarts,
    }
