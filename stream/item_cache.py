"""Item vectors and payloads close to the request path.

Fetching 500 candidates' named vectors from the store on every request costs
more than everything else a request does (the vectors cross into Python as
lists). The worker therefore keeps what it has written or read in memory,
keyed by item id, and asks the store only for ids it does not hold or holds
for longer than ``ttl_s`` (another worker may have updated them).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream.store import Hit


@dataclass(frozen=True)
class CachedItem:
    vectors: dict[str, np.ndarray]
    payload: dict[str, Any]
    cached_at: float


class ItemCache:
    def __init__(self, ttl_s: float = 30.0, max_items: int = 2_000_000) -> None:
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._items: dict[str, CachedItem] = {}

    def put(self, item_id: str, vectors: dict[str, np.ndarray], payload: dict[str, Any]) -> None:
        if len(self._items) >= self.max_items and item_id not in self._items:
            self._items.pop(next(iter(self._items)))  # oldest insertion first
        self._items[item_id] = CachedItem(vectors, payload, time.monotonic())

    def drop(self, item_ids: Sequence[str]) -> None:
        for item_id in item_ids:
            self._items.pop(item_id, None)

    def get_many(
        self, item_ids: Sequence[str], fetch: Callable[[list[str]], dict[str, Hit]]
    ) -> dict[str, CachedItem]:
        """Cached items for ``item_ids``; ``fetch`` loads the missing or stale ones."""
        now = time.monotonic()
        found: dict[str, CachedItem] = {}
        missing: list[str] = []
        for item_id in item_ids:
            entry = self._items.get(item_id)
            if entry is not None and now - entry.cached_at < self.ttl_s:
                found[item_id] = entry
            else:
                missing.append(item_id)
        if missing:
            for item_id, hit in fetch(missing).items():
                payload = {k: v for k, v in hit.payload.items() if k != "id"}
                self.put(item_id, hit.vectors, payload)
                found[item_id] = self._items[item_id]
        return found

    def __len__(self) -> int:
        return len(self._items)
