"""Run the embedded production shape on one machine: broker + worker processes.

The demo, the benchmarks and the integration tests start the system exactly as
an operator would (``streamrec broker``-equivalent and ``streamrec worker``
processes), then talk to it only through Kafka and HTTP.
"""
from __future__ import annotations

import asyncio
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


class WorkerProcess:
    def __init__(self, settings: Settings, *, log_path: Path | None = None) -> None:
        self.settings = settings
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> "WorkerProcess":
        env = {**os.environ, **settings_env(self.settings), "PYTHONUNBUFFERED": "1"}
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "streamrec.cli", "--log-level", "warning", "worker"],
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
        """Until /health says healthy and the agents hold their partitions."""
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
        url = f"http://{self.settings.http_host}:{self.settings.http_port}/metrics"
        # Generous: a worker busy embedding a catalogue answers slowly on a small machine.
        with urllib.request.urlopen(url, timeout=15) as reply:
            return reply.read().decode()

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Sum of a metric's samples that carry ``labels`` (0 when absent)."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            if head.split("{")[0] != name:
                continue
            if labels and not all(f'{k}="{v}"' in head for k, v in labels.items()):
                continue
            total += float(value)
        return total

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


class LocalStack:
    """Broker (when embedded) + one worker, for the demo, benchmarks and tests."""

    def __init__(self, settings: Settings, *, log_dir: Path, start_broker: bool = True) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.start_broker = start_broker and settings.embedded_broker
        self.broker: EmbeddedBroker | None = None
        self.worker = WorkerProcess(settings, log_path=log_dir / "worker.log")

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
