"""Item vectors and payloads close to the request path, in contiguous matrices.

Fetching 500 candidates' named vectors from the store on every request costs
more than everything else a request does (the vectors cross into Python as
lists), and so does assembling per-candidate rows into matrices. The worker
therefore keeps every item it has written or read in one matrix per named
vector (row = item), so a request gathers its candidates with one fancy index
per vector. Rows older than ``ttl_s`` are re-read from the store (another worker
may have updated them); with the in-process store there is no other writer and
the TTL can be infinite.

Requests (HTTP views in a thread pool, the request consumer) and click batches
use one cache from several threads at once, so every change and every gather
holds a lock; a fetch from the store runs outside it.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream.store import Hit


@dataclass(frozen=True)
class Gathered:
    """Candidates found in the cache, aligned row by row."""

    item_ids: list[str]
    vectors: dict[str, np.ndarray]  # name -> (n, dim); zero rows where an item lacks that vector
    present: dict[str, np.ndarray]  # name -> (n,) bool
    payloads: list[dict[str, Any]]


class ItemCache:
    def __init__(self, dims: dict[str, int], ttl_s: float = float("inf"), capacity: int = 1024) -> None:
        self.dims = dict(dims)
        self.ttl_s = ttl_s
        self._rows: dict[str, int] = {}
        self._free: list[int] = []
        self._vectors = {name: np.zeros((capacity, dim), np.float32) for name, dim in dims.items()}
        self._present = {name: np.zeros(capacity, bool) for name in dims}
        self._payloads: list[dict[str, Any] | None] = [None] * capacity
        self._stamp = np.zeros(capacity, np.float64)
        # Growing replaces the matrices: a reader between two threads' writes
        # would index rows that are not there yet.
        self._lock = threading.Lock()

    def _grow(self) -> None:
        old = len(self._payloads)
        new = old * 2
        for name in self.dims:
            grown = np.zeros((new, self.dims[name]), np.float32)
            grown[:old] = self._vectors[name]
            self._vectors[name] = grown
            present = np.zeros(new, bool)
            present[:old] = self._present[name]
            self._present[name] = present
        stamp = np.zeros(new, np.float64)
        stamp[:old] = self._stamp
        self._stamp = stamp
        self._payloads.extend([None] * (new - old))
        self._free.extend(range(new - 1, old - 1, -1))

    def put(self, item_id: str, vectors: dict[str, np.ndarray], payload: dict[str, Any]) -> None:
        with self._lock:
            self._put(item_id, vectors, payload)

    def _put(self, item_id: str, vectors: dict[str, np.ndarray], payload: dict[str, Any]) -> None:
        row = self._rows.get(item_id)
        if row is None:
            if not self._free:
                if len(self._rows) < len(self._payloads):
                    self._free.extend(range(len(self._payloads) - 1, len(self._rows) - 1, -1))
                else:
                    self._grow()
            row = self._free.pop()
            self._rows[item_id] = row
        for name in self.dims:
            vector = vectors.get(name)
            self._present[name][row] = vector is not None
            self._vectors[name][row] = vector if vector is not None else 0.0
        self._payloads[row] = {k: v for k, v in payload.items() if k != "id"}
        self._stamp[row] = time.monotonic()

    def drop(self, item_ids: Sequence[str]) -> None:
        with self._lock:
            self._drop(item_ids)

    def _drop(self, item_ids: Sequence[str]) -> None:
        for item_id in item_ids:
            row = self._rows.pop(item_id, None)
            if row is not None:
                self._payloads[row] = None
                for name in self.dims:
                    self._present[name][row] = False
                self._free.append(row)

    def gather(self, item_ids: Sequence[str], fetch: Callable[[list[str]], dict[str, Hit]]) -> Gathered:
        """Rows for ``item_ids`` (in order, unknown ids left out); ``fetch`` loads missing or stale ones."""
        now = time.monotonic()
        with self._lock:
            missing = [
                i for i in item_ids
                if (row := self._rows.get(i)) is None or now - self._stamp[row] >= self.ttl_s
            ]
        fetched = fetch(missing) if missing else {}
        with self._lock:
            for item_id, hit in fetched.items():
                row = self._rows.get(item_id)
                if row is None or self._stamp[row] < now:  # not rewritten (e.g. by the catalogue) meanwhile
                    self._put(item_id, hit.vectors, hit.payload)
            return self._rows_of(item_ids)

    def _rows_of(self, item_ids: Sequence[str]) -> Gathered:
        found = [i for i in item_ids if i in self._rows]
        rows = np.fromiter((self._rows[i] for i in found), np.int64, len(found))
        present = {name: self._present[name][rows] for name in self.dims}
        return Gathered(
            item_ids=found,
            vectors={name: self._matrix(name, rows, present[name]) for name in self.dims},
            present=present,
            payloads=[self._payloads[r] for r in rows],  # type: ignore[misc]
        )

    def _matrix(self, name: str, rows: np.ndarray, present: np.ndarray) -> np.ndarray:
        """(n, dim) rows of one named vector; copies only rows that have it.

        Photos are often missing, and their 1280-d rows were most of the bytes
        a request copied.
        """
        if present.all():
            return self._vectors[name][rows]
        matrix = np.zeros((len(rows), self.dims[name]), np.float32)
        if present.any():
            matrix[present] = self._vectors[name][rows[present]]
        return matrix

    def __len__(self) -> int:
        return len(self._rows)
