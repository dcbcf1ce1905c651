"""Keeping the cyclic garbage collector's full walks off the request path.

A worker process holds over a million objects that live as long as it does:
the imported libraries, the models, the item cache. CPython's collector walks
every one of them in each full (generation 2) collection, and holds the event
loop, every request and every Kafka fetch while it does: in
``streamrec bench serve --items 100000`` a worker made 13-14 full collections
of 59 ms on average and up to 140 ms (docs/performance.md, "Garbage collector
pauses"), which is where the HTTP p99.9 of 108-137 ms came from.

The policy (``run_policy``):

- At start-up, and then every ``freeze_s`` seconds, whatever is alive is
  collected and frozen (``gc.freeze``): the collector never walks it again, so
  its walks cover only what was made since the last freeze. A worker's
  long-lived objects (cached items, user states) are frozen as they accumulate.
- Reference counting still frees a frozen object when its last reference
  goes; only a reference cycle among frozen objects outlives it. So every
  ``full_s`` seconds everything is unfrozen, collected in one full walk (one
  pause of the old kind) and frozen again: such cycles are held for at most
  that long.

Each collection's pause is observed in ``streamrec_gc_pause_seconds``
(by generation) and the frozen objects counted in ``streamrec_gc_frozen_objects``.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable
from typing import Any

from exporter.metrics import Metrics


def freeze_survivors() -> None:
    """Collect what is not frozen, then freeze what survived."""
    gc.collect()
    gc.freeze()


def full_collection() -> None:
    """Unfreeze, collect everything (cycles among formerly frozen objects too), freeze the survivors."""
    gc.unfreeze()
    freeze_survivors()


def observe_pauses(metrics: Metrics) -> Callable[[str, dict[str, Any]], None]:
    """Observe every collection's pause in ``metrics``; returns the callback (``gc.callbacks.remove`` it)."""
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            metrics.gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - started[0])

    gc.callbacks.append(callback)
    return callback


async def run_policy(metrics: Metrics, stop: asyncio.Event, *, freeze_s: float, full_s: float) -> None:
    """Until ``stop`` is set: freeze survivors every ``freeze_s``, a full collection every ``full_s`` (0: never).

    ``freeze_s`` 0 leaves the interpreter's own policy alone; pauses are observed either way.
    """
    callback = observe_pauses(metrics)
    try:
        if freeze_s <= 0:
            await stop.wait()
            return
        freeze_survivors()
        metrics.gc_frozen_objects.set(gc.get_freeze_count())
        last_full = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=freeze_s)
            if stop.is_set():
                return
            if full_s > 0 and time.monotonic() - last_full >= full_s:
                full_collection()
                last_full = time.monotonic()
            else:
                freeze_survivors()
            metrics.gc_frozen_objects.set(gc.get_freeze_count())
    finally:
        gc.callbacks.remove(callback)
