"""Windowed item popularity: exponentially decayed interaction counts.

A count decays with the configured half-life, so "trending" means popular
*recently*. Kept by the worker that sees the clicks and rebuilt from the click
stream after a restart (it steers candidates and a context feature; user state
does not depend on it).
"""
from __future__ import annotations

import heapq
import math
import threading


class Trending:
    def __init__(self, half_life_s: float) -> None:
        self._rate = math.log(2) / half_life_s
        # Scores are stored relative to a fixed origin time so that decay is a
        # single multiplication at read time: score(t) = stored * exp(-rate (t - t0)).
        self._origin: float | None = None
        self._stored: dict[str, float] = {}
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

    def _rebase(self, at: float) -> None:
        if self._origin is None:
            return
        factor = math.exp(-self._rate * (at - self._origin))
        self._stored = {k: v * factor for k, v in self._stored.items() if v * factor > 1e-9}
        self._origin = at

    def score(self, item_id: str, now: float) -> float:
        if self._origin is None:
            return 0.0
        return self._stored.get(item_id, 0.0) * math.exp(-self._rate * (now - self._origin))

    def top(self, n: int, now: float, exclude: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, float]]:
        """The ``n`` items with the highest decayed count, best first."""
        with self._lock:  # a snapshot: iterating the live dict races with add()
            origin, stored = self._origin, list(self._stored.items())
        if origin is None:
            return []
        factor = math.exp(-self._rate * (now - origin))
        best = heapq.nlargest(n + len(exclude), stored, key=lambda kv: (kv[1], kv[0]))
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

    def __len__(self) -> int:
        return len(self._stored)
