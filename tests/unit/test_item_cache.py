"""The in-memory item cache in front of the store: TTL, eviction, fetching only what is missing.

The clock is the cache module's ``time.monotonic``, replaced by a settable one
so that expiry is tested without sleeping.
"""
from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import pytest

import stream.item_cache as item_cache_module
from stream.item_cache import ItemCache
from stream.store import Hit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    # Only the cache module sees the fake clock; the real ``time`` module is untouched.
    monkeypatch.setattr(item_cache_module, "time", SimpleNamespace(monotonic=fake))
    return fake


class Store:
    """A dictionary standing in for the vector store; records what it was asked for."""

    def __init__(self, item_ids: Sequence[str]) -> None:
        self.hits = {
            item_id: Hit(item_id, 0.0, {"id": item_id, "title": item_id.upper()},
                         {"fused": np.full(4, n, np.float32)})
            for n, item_id in enumerate(item_ids)
        }
        self.requests: list[list[str]] = []

    def fetch(self, item_ids: list[str]) -> dict[str, Hit]:
        self.requests.append(list(item_ids))
        return {i: self.hits[i] for i in item_ids if i in self.hits}


def vectors(value: float) -> dict[str, np.ndarray]:
    return {"fused": np.full(4, value, np.float32)}


def test_fetch_is_called_only_for_missing_ids(clock: Clock) -> None:
    cache = ItemCache(ttl_s=30.0)
    store = Store(["a", "b", "c"])
    cache.put("a", vectors(9.0), {"title": "cached A"})
    found = cache.get_many(["a", "b", "c"], store.fetch)
    assert store.requests == [["b", "c"]]
    assert found["a"].payload == {"title": "cached A"}  # the cached copy, not the store's
    assert found["b"].payload == {"title": "B"}  # the reserved "id" key is not kept
    assert set(found) == {"a", "b", "c"}


def test_a_second_read_does_not_fetch(clock: Clock) -> None:
    cache = ItemCache(ttl_s=30.0)
    store = Store(["a", "b"])
    cache.get_many(["a", "b"], store.fetch)
    clock.now += 29.0
    cache.get_many(["b", "a"], store.fetch)
    assert store.requests == [["a", "b"]]


def test_nothing_missing_means_no_fetch_at_all(clock: Clock) -> None:
    cache = ItemCache()
    cache.put("a", vectors(1.0), {})

    def refuse(item_ids: list[str]) -> dict[str, Hit]:
        raise AssertionError(f"fetch called for {item_ids}")

    assert set(cache.get_many(["a"], refuse)) == {"a"}
    assert cache.get_many([], refuse) == {}


def test_ttl_expiry_triggers_a_fetch(clock: Clock) -> None:
    cache = ItemCache(ttl_s=30.0)
    store = Store(["a", "b"])
    cache.put("a", vectors(9.0), {"title": "stale A"})
    cache.put("b", vectors(9.0), {"title": "stale B"})
    clock.now += 20.0
    cache.put("b", vectors(8.0), {"title": "fresh B"})  # re-put restarts b's clock
    clock.now += 15.0
    found = cache.get_many(["a", "b"], store.fetch)
    assert store.requests == [["a"]]
    assert found["a"].payload == {"title": "A"}
    assert found["b"].payload == {"title": "fresh B"}
    assert found["a"].cached_at == clock.now


def test_ids_the_store_lacks_are_left_out(clock: Clock) -> None:
    cache = ItemCache()
    store = Store(["a"])
    found = cache.get_many(["a", "ghost"], store.fetch)
    assert set(found) == {"a"}
    assert len(cache) == 1
    cache.get_many(["ghost"], store.fetch)
    assert store.requests == [["a", "ghost"], ["ghost"]]  # a miss is asked for again


def test_put_and_drop(clock: Clock) -> None:
    cache = ItemCache()
    cache.put("a", vectors(1.0), {"title": "A"})
    cache.put("a", vectors(2.0), {"title": "A2"})
    assert len(cache) == 1
    store = Store([])
    assert cache.get_many(["a"], store.fetch)["a"].payload == {"title": "A2"}
    cache.drop(["a", "never-cached"])
    assert len(cache) == 0
    assert cache.get_many(["a"], store.fetch) == {}
    assert store.requests == [["a"]]


def test_max_items_evicts_the_oldest_insertion(clock: Clock) -> None:
    cache = ItemCache(max_items=3)
    for item_id in "abcd":
        cache.put(item_id, vectors(1.0), {})
    assert len(cache) == 3
    store = Store([])
    found = cache.get_many(["a", "b", "c", "d"], store.fetch)
    assert set(found) == {"b", "c", "d"}
    assert store.requests == [["a"]]


def test_re_putting_a_cached_item_at_capacity_evicts_nothing(clock: Clock) -> None:
    cache = ItemCache(max_items=2)
    cache.put("a", vectors(1.0), {})
    cache.put("b", vectors(1.0), {})
    cache.put("a", vectors(2.0), {})
    assert len(cache) == 2
    assert set(cache.get_many(["a", "b"], Store([]).fetch)) == {"a", "b"}


def test_fetching_more_than_max_items_still_returns_them_all(clock: Clock) -> None:
    cache = ItemCache(max_items=2)
    store = Store(["a", "b", "c", "d"])
    found = cache.get_many(["a", "b", "c", "d"], store.fetch)
    assert set(found) == {"a", "b", "c", "d"}
    assert len(cache) == 2
