"""How long the worker's event loop is held, and by what.

Every HTTP answer, Kafka fetch and commit of a worker waits for its one event
loop, so a callback that runs for 200 ms delays every request by up to 200 ms
whatever the request itself costs. ``watch_loop`` sleeps a short interval over
and over and records how late each wake-up came
(``streamrec_event_loop_lag_seconds``). With ``STREAMREC_LOOP_STALL_DUMP_MS``
set, each wake-up also re-arms ``faulthandler.dump_traceback_later``: its
watchdog is a C thread that needs no GIL, so when the loop misses the deadline
every thread's stack is written to the process's standard error (file
descriptor 2, whatever object ``sys.stderr`` has been replaced by) *while* the
loop is held, even by a native call that keeps the GIL.
"""
from __future__ import annotations

import asyncio
import faulthandler
import sys
from typing import TextIO

from exporter.metrics import Metrics

INTERVAL_S = 0.02


async def watch_loop(metrics: Metrics, stop: asyncio.Event, *, dump_after_ms: int = 0,
                     interval_s: float = INTERVAL_S, dump_to: TextIO | None = None) -> None:
    """Until ``stop`` is set: observe the loop's lateness every ``interval_s``; dump stacks on a stall.

    ``dump_to`` must be a real file (it needs a file descriptor); default: standard error.
    """
    loop = asyncio.get_running_loop()
    dump_to = dump_to or sys.__stderr__
    dump_after_s = dump_after_ms / 1000
    try:
        while not stop.is_set():
            if dump_after_s:
                faulthandler.dump_traceback_later(dump_after_s, repeat=False, file=dump_to, exit=False)
            asked = loop.time()
            await asyncio.sleep(interval_s)
            metrics.event_loop_lag.observe(max(0.0, loop.time() - asked - interval_s))
    finally:
        if dump_after_s:
            faulthandler.cancel_dump_traceback_later()
