"""Which worker process owns which partitions, and which partition a key lands in.

``streamrec worker --processes N`` runs N processes on one machine. Partitions
are the unit of ownership: process ``i`` of ``N`` owns partition ``p`` of
``events.clicks``, ``events.searches`` and ``rec.requests`` when ``p mod N == i``.
The three topics are keyed by user id and have the same number of partitions,
so a user's clicks, searches and requests all meet in the process that owns the
user, which keeps that user's state in its own store directory (an embedded
store opens in one process only). The catalogue is not owned: every process
reads all of it, under a consumer group of its own.

``partition_of`` is the producer's partitioner (murmur2 of the key, as the
Java client and aiokafka compute it), so a process can tell, from a user id
alone, which process holds that user.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from aiokafka.partitioner import murmur2

from core.errors import ConfigError
from core.settings import Settings

LAYOUT_FILE = "processes.json"


def partition_of(key: bytes, partitions: int) -> int:
    """The partition the default producer partitioner sends ``key`` to, of ``partitions``."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Ownership:
    """Process ``index`` of ``count``: the partitions it owns and where its peers listen."""

    index: int = 0
    count: int = 1
    root: Path | None = None  # the data dir all processes share (None: one process, today's layout)

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"process index {self.index} is not one of {self.count} processes")

    @property
    def single(self) -> bool:
        return self.count == 1

    def owns(self, partition: int) -> bool:
        return partition % self.count == self.index

    def owner_of(self, key: bytes, partitions: int) -> int:
        """The process that owns ``key`` when its topic has ``partitions`` partitions."""
        return partition_of(key, partitions) % self.count

    def owned(self, partitions: int) -> list[int]:
        return [p for p in range(partitions) if self.owns(p)]

    def process_dir(self, index: int | None = None) -> Path:
        """Process ``index``'s own data directory (its store, its Faust folder)."""
        if self.root is None:
            raise ConfigError("a single worker process keeps its state in the data dir itself")
        return self.root / "processes" / str(self.index if index is None else index)

    def socket_address(self, index: int | None = None) -> str:
        """The unix socket on which process ``index`` answers requests passed on by its peers.

        An abstract socket (Linux): no file to leave behind when a process is
        killed, and no limit from the length of the data dir's path; named
        after the data dir, so two workers on one machine never meet.
        """
        if self.root is None:
            raise ConfigError("a single worker process has no peers")
        digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:16]
        return f"\0streamrec-{digest}-{self.index if index is None else index}"

    def group(self, base: str) -> str:
        """A consumer group of this process alone (for topics every process reads whole)."""
        return base if self.single else f"{base}.p{self.index}"

    def settings_for(self, settings: Settings) -> Settings:
        """This process's settings: its own data dir, the shared models folder."""
        if self.single:
            return settings
        return settings.model_copy(update={"data_dir": self.process_dir(), "model_dir": settings.models_path,
                                           "replica": self.origin(settings)})

    def origin(self, settings: Settings) -> int:
        """This process's number among every process of the app (``STREAMREC_REPLICA`` x N + i):
        it names its lessons and its signal log."""
        return (settings.replica or 0) * self.count + self.index


SINGLE = Ownership()  # one process: today's layout, group-assigned partitions


def check_layout(settings: Settings, count: int) -> None:
    """Refuse to start ``count`` processes on a data dir laid out for another count.

    Users live in the store of the process that owns their partition; with a
    different count they would be looked for in the wrong store.
    """
    import json

    path = settings.data_dir / LAYOUT_FILE
    if path.exists():
        try:
            recorded = int(json.loads(path.read_text())["processes"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{path} is not a process layout ({error}); remove it to lay out afresh") from error
        if recorded != count:
            raise ConfigError(
                f"the data dir {settings.data_dir} holds the state of {recorded} worker process(es) "
                f"({path}); start `streamrec worker --processes {recorded}`, or use a fresh "
                "STREAMREC_DATA_DIR for a different count")
        return
    single_store = settings.store_path.exists() and any(settings.store_path.iterdir())
    if count > 1 and single_store:
        raise ConfigError(
            f"the data dir {settings.data_dir} holds a single worker's store ({settings.store_path}); "
            f"start `streamrec worker --processes 1`, or use a fresh STREAMREC_DATA_DIR for {count} processes")
    if count > 1 and (settings.data_dir / "processes").exists() is False:
        (settings.data_dir / "processes").mkdir(parents=True, exist_ok=True)
    if count > 1:
        path.write_text(json.dumps({"processes": count}) + "\n")
