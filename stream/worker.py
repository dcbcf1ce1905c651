"""The worker entry point: ``streamrec worker [--processes N]``.

One process (``--processes 1``) runs the agents and the HTTP endpoint itself,
with its state in the data dir. With N > 1 this process is a supervisor: it
creates the topics, starts N worker processes (``--process-index i``), each
owning the partitions ``p mod N == i`` (``stream.partitions``) with its own
store under ``<data_dir>/processes/<i>/``, restarts one that dies, and stops
them all on SIGTERM or Ctrl-C.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import ConfigError
from core.settings import Settings
from stream.broker import ensure_topics, wait_for_broker
from stream.partitions import Ownership, check_layout
from stream.user_table import OwnTable, remove_tables, table_path

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # waits before restarting a child that keeps dying
HEALTHY_RUN_S = 60.0  # a child that ran this long starts its backoff afresh
STOP_GRACE_S = 20.0


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process load exactly these settings."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[f"STREAMREC_{name.upper()}"] = str(value)
    return env


def default_processes() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def run_worker(settings: Settings, *, loglevel: str = "info", processes: int = 1,
               process_index: int | None = None) -> None:
    if processes < 1:
        raise ConfigError(f"--processes must be at least 1, not {processes}")
    if process_index is None and processes > 1 and settings.replica is not None:
        raise ConfigError(
            f"STREAMREC_REPLICA={settings.replica} makes this worker one replica of a group that Kafka "
            f"splits the partitions among; it takes --processes 1, not {processes} (run one container per core)")
    if process_index is not None:
        run_process(settings, Ownership(process_index, processes, settings.data_dir), loglevel=loglevel)
        return
    asyncio.run(wait_for_broker(settings.bootstrap_servers, 60,
                                client_options=settings.kafka_client_options()))
    asyncio.run(ensure_topics(settings))
    if processes > 1:
        from stream.app import topic_partitions

        partitions = asyncio.run(topic_partitions(settings))
        if partitions < processes:
            raise ConfigError(
                f"{processes} worker processes need at least as many partitions, but the user-keyed topics "
                f"have {partitions}: start --processes {partitions} or fewer, or create the topics with more "
                "(STREAMREC_PARTITIONS)")
    check_layout(settings, processes)
    if processes > 1 or settings.replica is not None:  # there are peers to share lessons with
        from stream.agents.lessons import ensure_lessons_topic

        asyncio.run(ensure_lessons_topic(settings))
    if processes == 1:
        run_process(settings, Ownership(), loglevel=loglevel)
        return
    Supervisor(settings, processes, loglevel=loglevel).run()


def run_process(settings: Settings, ownership: Ownership, *, loglevel: str) -> None:
    """One worker process: the agents of the partitions it owns, and HTTP."""
    from stream.app import create_app, topic_partitions
    from stream.services import Services
    from stream.swap import reconcile

    limit_blas_threads(settings.blas_threads)
    own = ownership.settings_for(settings)
    own.data_dir.mkdir(parents=True, exist_ok=True)
    partitions = 0
    if not ownership.single:
        partitions = asyncio.run(topic_partitions(settings))
        (own.data_dir / "pid").write_text(f"{os.getpid()}\n")
    services = Services.open(own)
    services.metrics.blas_threads.set(blas_threads())
    reconcile(services)  # stored vectors of a version promoted while this worker was down
    if not ownership.single:
        from stream.users import share_stored_users

        services.user_table = own_user_table(settings, ownership)
        shared = share_stored_users(services)
        log.info("process %d shares %d stored users with its peers", ownership.index, shared)
    app = create_app(own, services, ownership, partitions=partitions)
    worker = faust_worker(app, loglevel)
    try:
        worker.execute_from_commandline()
    finally:
        services.close()


def faust_worker(app: faust.App, loglevel: str) -> faust.Worker:
    """Faust's worker for ``app``, without its terminal spinner.

    At a log level of warning or above the spinner sets the root logger to DEBUG
    so that it turns on every record: every library's debug call (aiokafka logs
    each frame it reads and each message it sends) then built a record no
    handler kept: up to 3.6% of a worker's event loop in profiles under load
    (docs/performance.md). The root logger stays at ``loglevel``.
    """
    import faust

    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.spinner = None
    return worker


def own_user_table(settings: Settings, ownership: Ownership) -> OwnTable | None:
    """This process's shared user table, emptied (None: off, or no room for it: requests are passed on)."""
    if not settings.user_table_slots:
        return None
    path = table_path(settings.data_dir, ownership.index)
    try:
        return OwnTable(path, settings.user_table_slots, settings.user_table_slot_bytes)
    except OSError as error:
        log.warning("no shared user table (%s): requests for this process's users are passed on to it", error)
        return None


def limit_blas_threads(threads: int) -> None:
    """Give numpy's BLAS ``threads`` threads in this process, for the rest of its life.

    OpenBLAS starts one thread per core and lets them spin between calls; a
    worker's products are small (candidates x retrieval width), so the spare
    threads only take cores from the event loop, the broker and the other
    worker processes.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")


def blas_threads() -> int:
    """The most threads any BLAS loaded in this process runs with (0 if none is loaded)."""
    from threadpoolctl import threadpool_info

    return max((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=0)


def _die_with_parent() -> None:
    """In a child: receive SIGTERM when the supervisor dies, however it dies (Linux)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Keeps N worker processes running; stops them all when it is told to stop."""

    def __init__(self, settings: Settings, processes: int, *, loglevel: str) -> None:
        self.settings = settings
        self.count = processes
        self.loglevel = loglevel
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.started_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.restarts = 0

    def command(self, index: int) -> list[str]:
        return [sys.executable, "-m", "streamrec.cli", "--log-level", logging.getLevelName(log.getEffectiveLevel()),
                "worker", "--loglevel", self.loglevel, "--processes", str(self.count), "--process-index", str(index)]

    def start(self, index: int) -> None:
        env = {**os.environ, **settings_env(self.settings)}
        self.children[index] = subprocess.Popen(self.command(index), env=env, preexec_fn=_die_with_parent)
        self.started_at[index] = time.monotonic()
        log.warning("worker process %d of %d started (pid %d)", index, self.count, self.children[index].pid)

    def run(self) -> None:
        # Tables a killed worker on this data dir left behind: no process may read them.
        remove_tables(self.settings.data_dir, self.count)
        try:
            for index in range(self.count):
                self.start(index)
            self._watch()
        finally:
            self.stop()

    def _watch(self) -> None:
        pending: dict[int, float] = {}  # child -> when to restart it
        while True:
            now = time.monotonic()
            for index, child in self.children.items():
                if index in pending or child.poll() is None:
                    continue
                ran = now - self.started_at[index]
                self.failures[index] = 0 if ran > HEALTHY_RUN_S else self.failures.get(index, 0) + 1
                wait = RESTART_BACKOFF_S[min(self.failures[index], len(RESTART_BACKOFF_S)) - 1] \
                    if self.failures[index] else 0.0
                log.warning("worker process %d exited with code %s after %.1fs; restarting it in %.1fs",
                            index, child.returncode, ran, wait)
                pending[index] = now + wait
            for index, when in list(pending.items()):
                if now >= when:
                    del pending[index]
                    self.restarts += 1
                    self.start(index)
            time.sleep(0.2)

    def stop(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for index, child in self.children.items():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker process %d did not stop in %.0fs; killing it", index, STOP_GRACE_S)
                child.kill()
                child.wait()
        remove_tables(self.settings.data_dir, self.count)


def child_pids(settings: Settings) -> dict[int, int]:
    """The pid each worker process of a supervised worker on ``settings.data_dir`` last wrote."""
    pids: dict[int, int] = {}
    root = settings.data_dir / "processes"
    layout = settings.data_dir / "processes.json"
    if not layout.exists():
        return pids
    for index in range(int(json.loads(layout.read_text())["processes"])):
        path: Path = root / str(index) / "pid"
        with contextlib.suppress(OSError, ValueError):
            pids[index] = int(path.read_text())
    return pids
