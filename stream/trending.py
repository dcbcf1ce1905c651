"""Windowed item popularity: exponentially decayed interaction counts.

A count decays with the configured half-life, so "trending" means popular
*recently*. Kept in memory by the worker that sees the clicks (it steers
candidates and a context feature; user state does not depend on it), and
restored exactly after a restart from the signal log (``stream.signals``).

Beside the decayed score, each item keeps the undecayed weight it was given
(``total``): two runs over the same clicks at different wall times have
different scores but the same totals, which is how a run is checked for
clicks counted twice or not at all.
"""
from __future__ import annotations

import heapq
import math
import threading

import numpy as np


class Trending:
    def __init__(self, half_life_s: float) -> None:
        self._rate = math.log(2) / half_life_s
        # Scores are stored relative to a fixed origin time so that decay is a
        # single multiplication at read time: score(t) = stored * exp(-rate (t - t0)).
        self._origin: float | None = None
        self._stored: dict[str, float] = {}
        self._totals: dict[str, float] = {}  # undecayed weight per item, same keys as _stored
        self._cache: tuple[float, int, list[tuple[str, float]]] | None = None
        # Clicks are applied in one worker thread while requests rank in others.
        self._lock = threading.Lock()

    def add(self, item_id: str, weight: float, at: float) -> None:
        with self._lock:
            self._add(item_id, weight, at)

    def _add(self, item_id: str, weight: float, at: float) -> None:
        if self._origin is None:
            self._origin = at
        exponent = self._rate * (at - self._origin)
        if exponent > 50:  # rebase before the stored numbers overflow
            self._rebase(at)
            exponent = 0.0
        self._stored[item_id] = self._stored.get(item_id, 0.0) + weight * math.exp(exponent)
        self._totals[item_id] = self._totals.get(item_id, 0.0) + weight

    def _rebase(self, at: float) -> None:
        if self._origin is None:
            return
        factor = math.exp(-self._rate * (at - self._origin))
        self._stored = {k: v * factor for k, v in self._stored.items() if v * factor > 1e-9}
        self._totals = {k: self._totals[k] for k in self._stored}
        self._origin = at

    def score(self, item_id: str, now: float) -> float:
        if self._origin is None:
            return 0.0
        return self._stored.get(item_id, 0.0) * math.exp(-self._rate * (now - self._origin))

    def scores(self, item_ids: list[str], now: float) -> list[float]:
        """``score`` of each item, read under one decay factor (the request path's form)."""
        if self._origin is None:
            return [0.0] * len(item_ids)
        factor = math.exp(-self._rate * (now - self._origin))
        stored = self._stored
        return [stored.get(i, 0.0) * factor for i in item_ids]

    def top(self, n: int, now: float, exclude: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, float]]:
        """The ``n`` items with the highest decayed count, best first."""
        with self._lock:  # a snapshot: iterating the live dict races with add()
            origin, stored = self._origin, list(self._stored.items())
        if origin is None:
            return []
        factor = math.exp(-self._rate * (now - origin))
        wanted = n + len(exclude)
        if len(stored) > 4 * wanted:
            # Only items scoring at least the wanted-th best can be among the best (ties
            # included, so the order below is exactly the full sort's): a partition in
            # numpy instead of a Python key per item (a 100k catalogue: ~25 ms -> a few).
            values = np.fromiter((v for _, v in stored), np.float64, len(stored))
            threshold = np.partition(values, len(values) - wanted)[len(values) - wanted]
            stored = [stored[i] for i in np.flatnonzero(values >= threshold).tolist()]
        best = heapq.nlargest(wanted, stored, key=lambda kv: (kv[1], kv[0]))
        return [(k, v * factor) for k, v in best if k not in exclude][:n]

    def top_cached(self, n: int, now: float, exclude: set[str] | frozenset[str] = frozenset(),
                   max_age_s: float = 1.0) -> list[tuple[str, float]]:
        """``top`` for the request path: the ranking is recomputed at most every
        ``max_age_s`` (a full sort over the catalogue is too slow per request)."""
        pool = 4 * n + 64
        if self._cache is None or now - self._cache[0] > max_age_s or self._cache[1] < pool:
            self._cache = (now, pool, self.top(pool, now))
        ranked = [(k, v) for k, v in self._cache[2] if k not in exclude][:n]
        if len(ranked) < n and len(self._cache[2]) == pool:
            # More exclusions than the cached pool covers: rank everything once.
            return self.top(n, now, exclude)
        return ranked

    def forget(self, item_id: str) -> None:
        with self._lock:
            self._stored.pop(item_id, None)
            self._totals.pop(item_id, None)

    def total(self, item_id: str) -> float:
        """The undecayed weight ``item_id`` was given since it was last forgotten (or dropped as faded)."""
        with self._lock:
            return self._totals.get(item_id, 0.0)

    def entries(self) -> tuple[float | None, list[tuple[str, float, float]]]:
        """Everything ``load`` needs to rebuild this exact state: the origin and
        (item, stored score, total) per item."""
        with self._lock:
            return self._origin, [(k, v, self._totals[k]) for k, v in self._stored.items()]

    def load(self, origin: float | None, entries: list[tuple[str, float, float]]) -> None:
        """Replace the state with one ``entries`` returned."""
        with self._lock:
            self._origin = origin
            self._stored = {item_id: stored for item_id, stored, _ in entries}
            self._totals = {item_id: total for item_id, _, total in entries}
            self._cache = None

    def __len__(self) -> int:
        return len(self._stored)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._stored
