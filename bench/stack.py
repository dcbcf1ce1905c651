"""Run the embedded production shape on one machine: broker + worker processes.

The demo, the benchmarks and the integration tests start the system exactly as
an operator would (``streamrec broker``-equivalent and ``streamrec worker``
processes), then talk to it only through Kafka and HTTP.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from core.errors import StreamrecError
from core.settings import Settings
from stream.broker import EmbeddedBroker, ensure_topics
from stream.http_api import FORWARDED
from stream.partitions import Ownership
from stream.worker import child_pids, settings_env

__all__ = ["LocalStack", "WorkerProcess", "free_port", "settings_env"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, address: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._address)


def process_request(address: str, method: str, path: str, body: bytes | None = None, *,
                    pass_on: bool = False, timeout: float = 15.0) -> tuple[int, bytes]:
    """(status, body) of one worker process asked on its own unix socket; it answers itself
    unless ``pass_on``, when it passes a request for another process's user on, as on the shared port."""
    connection = _UnixHTTPConnection(address, timeout)
    headers = {"Content-Type": "application/json"}
    if not pass_on:
        headers[FORWARDED] = "bench"
    try:
        connection.request(method, path, body=body, headers=headers)
        reply = connection.getresponse()
        return reply.status, reply.read()
    finally:
        connection.close()


def process_get(address: str, path: str, timeout: float = 15.0) -> bytes:
    """GET ``path`` from one worker process on its own unix socket (not passed on to a peer)."""
    return process_request(address, "GET", path, timeout=timeout)[1]


class WorkerProcess:
    """``streamrec worker --processes N``: one process, or a supervisor and N worker processes."""

    def __init__(self, settings: Settings, *, log_path: Path | None = None, processes: int = 1) -> None:
        self.settings = settings
        self.log_path = log_path
        self.processes = processes
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ownership(self) -> Ownership:
        return Ownership(0, self.processes, self.settings.data_dir)

    def start(self) -> "WorkerProcess":
        env = {**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1"}
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamrec.cli", "--log-level", "warning", "worker",
             "--processes", str(self.processes)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if self.log_path:
            out.close()  # the child holds its own descriptor
        return self

    def health(self) -> dict[str, object] | None:
        url = f"http://{self.settings.http_host}:{self.settings.http_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())
        except OSError:
            return None

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Until /health says healthy and the agents hold their partitions (with N processes the
        shared port answers for all of them: ready only when every one is)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise StreamrecError(
                    f"worker exited with code {self.process.returncode}; see {self.log_path}"
                )
            status = self.health()
            if status and status.get("healthy") and status.get("ready"):
                return
            time.sleep(0.2)
        raise StreamrecError(f"worker not ready within {timeout_s}s; see {self.log_path}")

    def metrics_text(self) -> str:
        """The worker's metrics; with N processes each one's, one after another (``metric`` sums them)."""
        if self.processes > 1:  # a process being restarted counts nothing until it answers
            texts = []
            for index in range(self.processes):
                try:
                    texts.append(self.process_metrics_text(index))
                except OSError:
                    continue
            return "".join(texts)
        url = f"http://{self.settings.http_host}:{self.settings.http_port}/metrics"
        # Generous: a worker busy embedding a catalogue answers slowly on a small machine.
        with urllib.request.urlopen(url, timeout=15) as reply:
            return reply.read().decode()

    def process_metrics_text(self, index: int) -> str:
        return process_get(self.ownership.socket_address(index), "/metrics").decode()

    def process_metric(self, index: int, name: str, labels: dict[str, str] | None = None) -> float:
        """``metric`` of worker process ``index`` alone."""
        return _sum_metric(self.process_metrics_text(index), name, labels)

    def metric_per_process(self, name: str, labels: dict[str, str] | None = None) -> list[float]:
        """``metric`` of each worker process, in process order (one process: a list of one)."""
        if self.processes == 1:
            return [self.metric(name, labels)]
        return [self.process_metric(i, name, labels) for i in range(self.processes)]

    def lessons_exchanged(self) -> bool:
        """With N processes: whether every process has learnt every lesson the others sent
        (``stream.agents.lessons.ExchangeGauges``); always true with one."""
        if self.processes == 1:
            return True
        try:
            texts = [self.process_metrics_text(i) for i in range(self.processes)]
        except OSError:  # one is being restarted
            return False
        if any(_sum_metric(text, "streamrec_signal_lessons_unsent", None) for text in texts):
            return False
        seq = [[_sum_metric(text, "streamrec_signal_lessons_seq", {"process": str(j)}) for j in range(self.processes)]
               for text in texts]
        return all(seq[i][j] == seq[j][j] for i in range(self.processes) for j in range(self.processes))

    def process_ready(self, index: int) -> bool:
        """Whether worker process ``index`` answers on its socket, healthy and holding its partitions."""
        try:
            status = json.loads(process_get(self.ownership.socket_address(index), "/health", timeout=2))
        except (OSError, ValueError):
            return False
        return bool(status.get("healthy") and status.get("ready"))

    def pids(self) -> dict[int, int]:
        """The worker processes' pids (with one process, the worker's own)."""
        if self.processes == 1:
            return {0: self.process.pid} if self.process else {}
        return child_pids(self.settings)

    def kill_process(self, index: int) -> int:
        """SIGKILL worker process ``index`` alone (its supervisor restarts it); returns its pid."""
        pid = self.pids()[index]
        os.kill(pid, signal.SIGKILL)
        return pid

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Sum of a metric's samples that carry ``labels`` (0 when absent), over every process."""
        return _sum_metric(self.metrics_text(), name, labels)

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None


def _sum_metric(text: str, name: str, labels: dict[str, str] | None) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        if labels and not all(f'{k}="{v}"' in head for k, v in labels.items()):
            continue
        total += float(value)
    return total


class LocalStack:
    """Broker (when embedded) + one worker, for the demo, benchmarks and tests."""

    def __init__(self, settings: Settings, *, log_dir: Path, start_broker: bool = True, processes: int = 1) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.start_broker = start_broker and settings.embedded_broker
        self.broker: EmbeddedBroker | None = None
        self.worker = WorkerProcess(settings, log_path=log_dir / "worker.log", processes=processes)

    def __enter__(self) -> "LocalStack":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.start_broker:
            port = int(self.settings.bootstrap_list[0].rpartition(":")[2])
            self.broker = EmbeddedBroker(port, log_path=self.log_dir / "broker.log").start()
        try:
            asyncio.run(ensure_topics(self.settings))
            self.worker.start().wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()
        if self.broker:
            self.broker.stop()
