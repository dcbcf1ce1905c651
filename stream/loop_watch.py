"""How long the worker's event loop is held, and by what.

Every HTTP answer, Kafka fetch and commit of a worker waits for its one event
loop, so a callback that runs for 200 ms delays every request by up to 200 ms
whatever the request itself costs. ``watch_loop`` sleeps a short interval over
and over and records how late each wake-up came
(``streamrec_event_loop_lag_seconds``). With ``STREAMREC_LOOP_STALL_DUMP_MS``
set, a watchdog thread writes every thread's stack, the loop's first, when a
wake-up is that late, *while* the loop is still held.

The watchdog is a Python thread: it reads the stacks holding the GIL
(``sys._current_frames``), where they cannot change under it. A C watchdog
(``faulthandler.dump_traceback_later``, used before) reads them without the
GIL while the threads run on, and killed a worker under load mid-dump in two
runs of two (``bench serve --items 100000`` with the dump at 25 ms; a frame
freed while it was being read). The price: a native call that keeps the GIL
is seen only once it lets go, at the line that made the call or after it.
"""
from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
import traceback
from typing import TextIO

from exporter.metrics import Metrics

INTERVAL_S = 0.02


class StallDumper:
    """A daemon thread that writes the stacks when the loop is ``after_s`` late back from a sleep."""

    def __init__(self, after_s: float, out: TextIO) -> None:
        self.after_s = after_s
        self.out = out
        self.loop_thread = threading.get_ident()
        self._deadline = math.inf
        self._armed_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loop-stall-dumper", daemon=True)
        self._thread.start()

    def arm(self, sleeping_s: float = 0.0) -> None:
        """The loop sleeps ``sleeping_s``: dump unless it is back within that plus ``after_s``."""
        self._armed_at = time.monotonic() + sleeping_s
        self._deadline = self._armed_at + self.after_s

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        poll = min(0.05, self.after_s / 4)
        while not self._stop.wait(poll):
            deadline = self._deadline
            if time.monotonic() > deadline:
                self._deadline = math.inf  # one dump per stall
                self._dump(time.monotonic() - self._armed_at)

    def _dump(self, held_s: float) -> None:
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        frames = sys._current_frames()  # every thread's current frame, read under the GIL
        me = threading.get_ident()
        order = sorted((ident for ident in frames if ident != me), key=lambda ident: ident != self.loop_thread)
        lines = [f"event loop held for {1000 * held_s:.0f} ms so far; every thread's stack, the loop's first:\n"]
        for ident in order:
            role = " (the event loop)" if ident == self.loop_thread else ""
            lines.append(f"Thread {ident:#x} {names.get(ident, '?')}{role}, most recent call last:\n")
            lines.extend(traceback.format_stack(frames[ident]))
        self.out.write("".join(lines) + "\n")
        self.out.flush()


async def watch_loop(metrics: Metrics, stop: asyncio.Event, *, dump_after_ms: int = 0,
                     interval_s: float = INTERVAL_S, dump_to: TextIO | None = None) -> None:
    """Until ``stop`` is set: observe the loop's lateness every ``interval_s``; dump stacks on a stall.

    ``dump_to``: where stall dumps go (default: the process's standard error, whatever ``sys.stderr`` became).
    """
    loop = asyncio.get_running_loop()
    dumper = StallDumper(dump_after_ms / 1000, dump_to or sys.__stderr__) if dump_after_ms else None
    try:
        while not stop.is_set():
            if dumper is not None:
                dumper.arm(interval_s)
            asked = loop.time()
            await asyncio.sleep(interval_s)
            metrics.event_loop_lag.observe(max(0.0, loop.time() - asked - interval_s))
    finally:
        if dumper is not None:
            dumper.stop()
