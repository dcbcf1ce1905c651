"""Item vectors and payloads close to the request path, in contiguous matrices.

Fetching 500 candidates' named vectors from the store on every request costs
more than everything else a request does (the vectors cross into Python as
lists), and so does assembling per-candidate rows into matrices. The worker
therefore keeps the items it has written or read in one matrix per named
vector, so a request gathers its candidates with one fancy index per vector.
Rows older than ``ttl_s`` are re-read from the store (another worker may have
updated them); with the in-process store there is no other writer and the TTL
can be infinite.

Memory is bounded: each named vector has its own matrix holding only the items
that have that vector (photos are often missing, and a 1280-d image row is most
of an item's bytes), and at most ``max_items`` items are kept: beyond that the
least recently used eighth is evicted and read from the store again when asked
for.

Requests (HTTP views in a thread pool, the request consumer) and click batches
use one cache from several threads at once, so every change and every gather
holds a lock; a fetch from the store runs outside it.

Items are keyed by their integer point id (``stream.store.point_id``), the form
in which a search returns them (``VectorStore.search_points``): the request
path gathers candidates by point id and copies only the vectors it asks for.
A ``Derived`` column holds a per-item vector computed from an item's stored
vectors when it is put (the ranker's item-only part), so a request reads a
short row instead of every candidate's text and photo vectors.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream.store import Hit, point_id


@dataclass(frozen=True)
class Gathered:
    """Candidates found in the cache, aligned row by row."""

    item_ids: list[str]
    vectors: dict[str, np.ndarray]  # name -> (n, dim); zero rows where an item lacks that vector
    present: dict[str, np.ndarray]  # name -> (n,) bool, for every held vector name
    payloads: list[dict[str, Any]]
    point_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (n,) int64

    def subset(self, keep: Sequence[int] | np.ndarray) -> "Gathered":
        """The rows at positions ``keep``, in that order."""
        keep = np.asarray(keep, np.int64)
        return Gathered(
            item_ids=[self.item_ids[n] for n in keep.tolist()],
            vectors={name: m[keep] for name, m in self.vectors.items()},
            present={name: m[keep] for name, m in self.present.items()},
            payloads=[self.payloads[n] for n in keep.tolist()],
            point_ids=self.point_ids[keep],
        )


@dataclass(frozen=True)
class Derived:
    """A per-item vector computed from the item's stored vectors when it is put.

    ``compute`` takes name -> (n, dim) matrices of ``n`` items (zero rows where
    an item lacks a vector) and name -> (n,) presence flags; returns (n, dim).
    """

    name: str
    dim: int
    compute: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], np.ndarray]


MIN_ITEMS = 1024  # the least ``max_items`` may be: a request's candidates must fit many times over
EVICT_SHARE = 8  # a full cache evicts 1/EVICT_SHARE of its items at once


class _Column:
    """One named vector's matrix; a slot per item that has the vector, free slots reused."""

    def __init__(self, dim: int, capacity: int) -> None:
        self.data = np.zeros((capacity, dim), np.float32)
        self.free: list[int] = list(range(capacity - 1, -1, -1))

    def take(self, limit: int) -> int:
        if not self.free:
            old = len(self.data)
            new = max(old + 1, min(old * 2, limit))
            grown = np.zeros((new, self.data.shape[1]), np.float32)
            grown[:old] = self.data
            self.data = grown
            self.free.extend(range(new - 1, old - 1, -1))
        return self.free.pop()


class ItemCache:
    def __init__(self, dims: dict[str, int], ttl_s: float = float("inf"), capacity: int = 1024,
                 max_items: int = 1_000_000, derived: Derived | None = None,
                 held: Sequence[str] | None = None) -> None:
        """``dims``: the stored vectors (what a fetch asks for and ``derived`` reads); ``held``: those
        kept in matrices for requests to copy out (default all). A vector only the derived column
        reads need not be held: a 1,280-d photo row is most of an item's bytes."""
        if max_items < MIN_ITEMS:
            raise ValueError(f"max_items must be at least {MIN_ITEMS}, got {max_items}")
        if derived is not None and derived.name in dims:
            raise ValueError(f"derived column {derived.name!r} clashes with a stored vector name")
        self.dims = dict(dims)  # the stored vectors, as the store's items collection names them
        self.derived = derived
        self.ttl_s = ttl_s
        self.max_items = max_items
        capacity = max(1, min(capacity, max_items))
        held = list(dims) if held is None else list(held)
        if unknown := set(held) - set(dims):
            raise ValueError(f"held vectors {sorted(unknown)} are not among the stored ones {sorted(dims)}")
        self.held = held
        columns = {name: dims[name] for name in held} | ({derived.name: derived.dim} if derived is not None else {})
        self._rows: dict[int, int] = {}  # point id -> row
        self._row_pid = np.full(capacity, -1, np.int64)  # row -> point id, -1: free
        # A sorted copy of ``_rows`` for looking up a request's candidates in
        # one ``searchsorted``; items put since it was built are found in the
        # dict, and rows dropped or reused since are caught by ``_row_pid``.
        self._index_keys = np.zeros(0, np.int64)
        self._index_rows = np.zeros(0, np.int64)
        self._inserted = 0  # items put since the sorted copy was built
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._columns = {name: _Column(dim, capacity) for name, dim in columns.items()}
        self._slots = {name: np.full(capacity, -1, np.int64) for name in columns}  # row -> slot, -1: absent
        self._payloads: list[dict[str, Any] | None] = [None] * capacity
        self._ids: list[str | None] = [None] * capacity
        self._stamp = np.zeros(capacity, np.float64)  # when the row was written or fetched (TTL)
        self._used = np.zeros(capacity, np.float64)  # when the row was last written or gathered (eviction)
        self.evictions = 0
        # Growing replaces the arrays: a reader between two threads' writes
        # would index rows that are not there yet.
        self._lock = threading.Lock()

    def _grow(self) -> None:
        old = len(self._payloads)
        new = max(old + 1, min(old * 2, self.max_items))
        for name in self._columns:
            slots = np.full(new, -1, np.int64)
            slots[:old] = self._slots[name]
            self._slots[name] = slots
        for attribute in ("_stamp", "_used"):
            grown = np.zeros(new, np.float64)
            grown[:old] = getattr(self, attribute)
            setattr(self, attribute, grown)
        row_pid = np.full(new, -1, np.int64)
        row_pid[:old] = self._row_pid
        self._row_pid = row_pid
        self._payloads.extend([None] * (new - old))
        self._ids.extend([None] * (new - old))
        self._free.extend(range(new - 1, old - 1, -1))

    def _evict(self) -> None:
        """Forget the least recently used eighth of the items."""
        rows = np.fromiter(self._rows.values(), np.int64, len(self._rows))
        count = max(1, len(rows) // EVICT_SHARE)
        oldest = rows[np.argpartition(self._used[rows], count - 1)[:count]]
        self._drop(self._row_pid[oldest].tolist())
        self.evictions += count

    def put(self, item_id: str, vectors: dict[str, np.ndarray], payload: dict[str, Any]) -> None:
        vectors = self._with_derived(vectors)
        with self._lock:
            self._put(point_id(item_id), item_id, vectors, payload)

    def _with_derived(self, vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``vectors`` plus the derived column, computed outside the lock."""
        if self.derived is None:
            return vectors
        rows = {name: np.asarray(vectors[name], np.float32).reshape(1, dim) if name in vectors
                else np.zeros((1, dim), np.float32) for name, dim in self.dims.items()}
        present = {name: np.asarray([name in vectors]) for name in self.dims}
        return {**vectors, self.derived.name: self.derived.compute(rows, present)[0]}

    def _put(self, pid: int, item_id: str, vectors: dict[str, np.ndarray], payload: dict[str, Any]) -> None:
        row = self._rows.get(pid)
        if row is None:
            if len(self._rows) >= self.max_items:
                self._evict()
            if not self._free:
                self._grow()
            row = self._free.pop()
            self._rows[pid] = row
            self._row_pid[row] = pid
            self._ids[row] = item_id
            self._inserted += 1
        for name, column in self._columns.items():
            vector = vectors.get(name)
            slot = int(self._slots[name][row])
            if vector is None:
                if slot >= 0:
                    column.free.append(slot)
                    self._slots[name][row] = -1
                continue
            if slot < 0:
                slot = column.take(self.max_items)
                self._slots[name][row] = slot
            column.data[slot] = vector
        self._payloads[row] = {k: v for k, v in payload.items() if k != "id"}
        self._stamp[row] = self._used[row] = time.monotonic()

    def drop(self, item_ids: Sequence[str]) -> None:
        with self._lock:
            self._drop([point_id(i) for i in item_ids])

    def _drop(self, pids: Sequence[int]) -> None:
        for pid in pids:
            row = self._rows.pop(pid, None)
            if row is not None:
                self._payloads[row] = None
                self._ids[row] = None
                self._row_pid[row] = -1
                for name, column in self._columns.items():
                    slot = int(self._slots[name][row])
                    if slot >= 0:
                        column.free.append(slot)
                        self._slots[name][row] = -1
                self._free.append(row)

    def gather(self, item_ids: Sequence[str], fetch: Callable[[list[str]], dict[str, Hit]],
               names: Sequence[str] | None = None) -> Gathered:
        """Rows for ``item_ids`` (in order, unknown ids left out); ``fetch`` loads missing or stale ones.

        ``names``: the vectors to copy out (default: every column); presence
        flags come for every stored vector either way.
        """
        by_point = {point_id(i): i for i in item_ids}

        def fetch_points(missing: list[int]) -> dict[int, Hit]:
            hits = fetch([by_point[p] for p in missing])
            return {point_id(item_id): hit for item_id, hit in hits.items()}

        pids = np.fromiter(by_point, np.int64, len(by_point)) if len(by_point) == len(item_ids) \
            else np.fromiter((point_id(i) for i in item_ids), np.int64, len(item_ids))
        return self.gather_points(pids, fetch_points, names)

    def gather_points(self, point_ids: np.ndarray, fetch: Callable[[list[int]], dict[int, Hit]],
                      names: Sequence[str] | None = None) -> Gathered:
        """Rows for the items with these point ids (in order, unknown ones left out).

        ``fetch`` loads missing or stale ones from the store by point id.
        """
        now = time.monotonic()
        wanted = np.asarray(point_ids, np.int64)
        with self._lock:
            rows = self._lookup(wanted)
            cached = rows >= 0
            if self.ttl_s != float("inf"):
                cached[cached] = now - self._stamp[rows[cached]] < self.ttl_s
            missing = wanted[~cached].tolist()
            # Marked before any fetched row is put: an eviction then spares this request's rows.
            self._used[rows[cached]] = now
        fetched = fetch(missing) if missing else {}
        derived = {pid: self._with_derived(hit.vectors) for pid, hit in fetched.items()}
        with self._lock:
            for pid, hit in fetched.items():
                row = self._rows.get(pid)
                if row is None or self._stamp[row] < now:  # not rewritten (e.g. by the catalogue) meanwhile
                    self._put(pid, hit.id, derived[pid], hit.payload)
            if missing:
                rows = self._lookup(wanted)
            return self._rows_of(wanted, rows, list(self._columns) if names is None else names)

    def _lookup(self, wanted: np.ndarray) -> np.ndarray:
        """The row of each point id, -1 where not cached."""
        if self._inserted >= max(256, len(self._rows) // 16):
            self._index_keys = np.fromiter(self._rows.keys(), np.int64, len(self._rows))
            order = np.argsort(self._index_keys)
            self._index_keys = self._index_keys[order]
            self._index_rows = np.fromiter(self._rows.values(), np.int64, len(self._rows))[order]
            self._inserted = 0
        rows = np.full(len(wanted), -1, np.int64)
        keys = self._index_keys
        if len(keys):
            at = np.searchsorted(keys, wanted).clip(max=len(keys) - 1)
            hit = keys[at] == wanted
            rows[hit] = self._index_rows[at[hit]]
            # Dropped or given to another item since the sorted copy was built.
            rows[(rows >= 0) & (self._row_pid[rows.clip(min=0)] != wanted)] = -1
        unsure = np.flatnonzero(rows < 0)
        if len(unsure):
            get = self._rows.get
            for n, pid in zip(unsure.tolist(), wanted[unsure].tolist()):
                row = get(pid)
                if row is not None:
                    rows[n] = row
        return rows

    def _rows_of(self, wanted: np.ndarray, rows: np.ndarray, names: Sequence[str]) -> Gathered:
        found = rows >= 0
        rows = rows[found]
        slots = {name: self._slots[name][rows] for name in self._columns}
        listed = rows.tolist()
        return Gathered(
            item_ids=[self._ids[r] for r in listed],  # type: ignore[misc]
            vectors={name: self._matrix(name, slots[name]) for name in names},
            present={name: slots[name] >= 0 for name in self.held},
            payloads=[self._payloads[r] for r in listed],  # type: ignore[misc]
            point_ids=wanted[found],
        )

    def _matrix(self, name: str, slots: np.ndarray) -> np.ndarray:
        """(n, dim) rows of one named vector; zero rows where an item lacks it."""
        data = self._columns[name].data
        present = slots >= 0
        if present.all():
            return data[slots]
        matrix = np.zeros((len(slots), data.shape[1]), np.float32)
        if present.any():
            matrix[present] = data[slots[present]]
        return matrix

    def __len__(self) -> int:
        return len(self._rows)
