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


def _spin_in_python_for(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_a_loop_held_by_python_code_is_dumped_with_that_code_on_top(tmp_path: Path) -> None:
    """Pure Python keeps the GIL but lets other threads in between: the watchdog sees the spinning frame."""
    metrics = Metrics(CollectorRegistry())
    dump = tmp_path / "stacks.txt"
    with dump.open("w") as out:
        async def hold() -> None:
            stop = asyncio.Event()
            watching = asyncio.create_task(watch_loop(metrics, stop, interval_s=0.01, dump_after_ms=100, dump_to=out))
            await asyncio.sleep(0.05)
            _spin_in_python_for(0.4)
            stop.set()
            await watching

        asyncio.run(hold())
    text = dump.read_text()
    assert text.count("event loop held for") == 1, "one dump per stall"
    loop_stack = text.split("(the event loop), most recent call last:")[1].split("Thread 0x")[0]
    assert "_spin_in_python_for" in loop_stack, text


def test_a_free_loop_dumps_nothing(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    dump = tmp_path / "stacks.txt"
    with dump.open("w") as out:
        asyncio.run(_watch_while(metrics, 0.0, dump_after_ms=2000, dump_to=out))
    assert dump.read_text() == ""
