"""The event-loop watch: lateness measured, and the stack of what held the loop written while it is held."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from exporter.metrics import Metrics
from stream.loop_watch import watch_loop


def _hold_the_loop_for(seconds: float) -> None:
    time.sleep(seconds)


async def _watch_while(metrics: Metrics, hold_s: float, **options: object) -> None:
    stop = asyncio.Event()
    watching = asyncio.create_task(watch_loop(metrics, stop, interval_s=0.01, **options))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    asyncio.get_running_loop().call_soon(_hold_the_loop_for, hold_s)
    await asyncio.sleep(0.05)
    stop.set()
    await watching


def _lag(metrics: Metrics, bucket: str) -> float:
    return metrics.registry.get_sample_value("streamrec_event_loop_lag_seconds_bucket", {"le": bucket}) or 0.0


def test_a_held_loop_shows_as_lag_and_its_stack_is_dumped_while_held(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    dump = tmp_path / "stacks.txt"
    with dump.open("w") as out:
        asyncio.run(_watch_while(metrics, 0.3, dump_after_ms=100, dump_to=out))
    count = metrics.registry.get_sample_value("streamrec_event_loop_lag_seconds_count")
    assert count and count >= 5
    # The wake-up after the hold came at least 0.25 s late: above the 0.25 s bucket.
    assert _lag(metrics, "0.25") <= count - 1
    text = dump.read_text()
    assert "_hold_the_loop_for" in text, text


def test_a_free_loop_dumps_nothing(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    dump = tmp_path / "stacks.txt"
    with dump.open("w") as out:
        asyncio.run(_watch_while(metrics, 0.0, dump_after_ms=2000, dump_to=out))
    assert dump.read_text() == ""
