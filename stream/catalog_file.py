"""Bulk load: a JSON-lines file of catalogue items straight into a worker's store.

Each line is one ``CatalogItem`` as the ``catalog.items`` topic carries it,
decoded by the same ``decode`` and applied by the same ``apply_catalog`` as the
catalogue agent, in batches far larger than a Kafka poll, with the HNSW index
built once at the end instead of by the engine as it goes. A bad line is
reported with its file and line number and the rest of the file still loads.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError, DecodeError
from core.events import CatalogItem, decode
from stream.catalog import apply_catalog
from stream.services import Services

DEFAULT_BATCH_SIZE = 1024  # lines per apply_catalog call: the more, the tighter the text batches


@dataclass(frozen=True)
class BadLine:
    path: Path
    line: int  # 1-based
    error: DecodeError

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.error}"


@dataclass
class LoadReport:
    loaded: int = 0  # lines applied (an item given twice counts twice; the last one wins)
    rejected: list[BadLine] = field(default_factory=list)
    load_seconds: float = 0.0  # reading, embedding and upserting
    index_seconds: float = 0.0  # the one index build at the end

    @property
    def items_per_s(self) -> float:
        return self.loaded / self.load_seconds if self.load_seconds > 0 else 0.0


def count_lines(path: Path) -> int:
    """Non-blank lines of ``path``: what a progress bar counts to."""
    try:
        with path.open("rb") as handle:
            return sum(1 for raw in handle if raw.strip())
    except OSError as exc:
        raise ConfigError(f"cannot read catalogue file {path}: {exc}") from exc


def read_catalogue(path: Path, max_bytes: int) -> Iterator[tuple[int, CatalogItem | DecodeError]]:
    """(line number, item or why the line is not one) for every non-blank line."""
    try:
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    yield number, decode(CatalogItem, raw.rstrip(b"\r\n"), max_bytes=max_bytes)
                except DecodeError as exc:
                    yield number, exc
    except OSError as exc:
        raise ConfigError(f"cannot read catalogue file {path}: {exc}") from exc


def load_catalogue(
    services: Services,
    path: Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], None] = lambda lines: None,
) -> LoadReport:
    """Apply every item of ``path`` to ``services``' store, then build its index once.

    ``progress`` is told how many lines each step has dealt with.
    """
    report = LoadReport()
    batch: list[tuple[int, CatalogItem]] = []

    def apply_batch() -> None:
        rejected = apply_catalog(services, [item for _, item in batch])  # e.g. an unreadable photo
        report.rejected.extend(BadLine(path, batch[r.index][0], r.error) for r in rejected)
        report.loaded += len(batch) - len(rejected)
        progress(len(batch))
        batch.clear()

    started = time.perf_counter()
    for number, row in read_catalogue(path, services.settings.max_event_bytes):
        if isinstance(row, DecodeError):
            report.rejected.append(BadLine(path, number, row))
            progress(1)
            continue
        batch.append((number, row))
        if len(batch) == batch_size:
            apply_batch()
    if batch:
        apply_batch()
    report.load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    services.store.optimize(services.collections.items)
    report.index_seconds = time.perf_counter() - started
    report.rejected.sort(key=lambda bad: bad.line)
    return report
