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


DIMS = {"fused": 4, "image": 3}


def test_fetch_is_called_only_for_missing_ids(clock: Clock) -> None:
    cache = ItemCache(DIMS, ttl_s=30.0)
    store = Store(["a", "b", "c"])
    cache.put("a", vectors(9.0), {"title": "cached A"})
    found = cache.gather(["a", "b", "c"], store.fetch)
    assert store.requests == [["b", "c"]]
    assert found.item_ids == ["a", "b", "c"]
    assert found.payloads[0] == {"title": "cached A"}
    np.testing.assert_array_equal(found.vectors["fused"][:, 0], [9.0, 1.0, 2.0])
    # Everything is cached now: no second fetch.
    cache.gather(["c", "a"], store.fetch)
    assert store.requests == [["b", "c"]]


def test_rows_come_back_in_request_order_and_unknown_ids_are_left_out(clock: Clock) -> None:
    cache = ItemCache(DIMS)
    store = Store(["a", "b"])
    found = cache.gather(["b", "zzz", "a"], store.fetch)
    assert found.item_ids == ["b", "a"]
    np.testing.assert_array_equal(found.vectors["fused"][:, 0], [1.0, 0.0])


def test_missing_named_vectors_are_zero_rows_marked_absent(clock: Clock) -> None:
    cache = ItemCache(DIMS)
    cache.put("a", {"fused": np.ones(4, np.float32)}, {})
    cache.put("b", {"fused": np.ones(4, np.float32), "image": np.full(3, 2.0, np.float32)}, {})
    found = cache.gather(["a", "b"], Store([]).fetch)
    np.testing.assert_array_equal(found.present["image"], [False, True])
    np.testing.assert_array_equal(found.vectors["image"][0], np.zeros(3))


def test_stale_rows_are_fetched_again_after_the_ttl(clock: Clock) -> None:
    cache = ItemCache(DIMS, ttl_s=30.0)
    store = Store(["a"])
    cache.gather(["a"], store.fetch)
    clock.now += 29.0
    cache.gather(["a"], store.fetch)
    assert store.requests == [["a"]]
    clock.now += 2.0
    cache.gather(["a"], store.fetch)
    assert store.requests == [["a"], ["a"]]


def test_an_infinite_ttl_never_refetches(clock: Clock) -> None:
    cache = ItemCache(DIMS)
    store = Store(["a"])
    cache.gather(["a"], store.fetch)
    clock.now += 10**9
    cache.gather(["a"], store.fetch)
    assert store.requests == [["a"]]


def test_put_replaces_and_drop_forgets(clock: Clock) -> None:
    cache = ItemCache(DIMS)
    cache.put("a", vectors(1.0), {"title": "old"})
    cache.put("a", vectors(2.0), {"title": "new", "id": "a"})
    found = cache.gather(["a"], Store([]).fetch)
    assert found.payloads == [{"title": "new"}]  # the store's id key is not a payload field
    assert found.vectors["fused"][0, 0] == 2.0
    cache.drop(["a"])
    assert len(cache) == 0
    assert cache.gather(["a"], Store([]).fetch).item_ids == []


def test_growth_keeps_every_row(clock: Clock) -> None:
    cache = ItemCache(DIMS, capacity=2)
    for n in range(50):
        cache.put(f"i{n}", vectors(float(n)), {"n": n})
    cache.drop([f"i{n}" for n in range(0, 50, 2)])
    for n in range(50, 60):
        cache.put(f"i{n}", vectors(float(n)), {"n": n})
    ids = [f"i{n}" for n in range(1, 60, 2)] + [f"i{n}" for n in range(50, 60)]
    found = cache.gather(ids, Store([]).fetch)
    assert found.item_ids == ids
    np.testing.assert_array_equal(found.vectors["fused"][:, 0], [float(i[1:]) for i in ids])
    assert [p["n"] for p in found.payloads] == [int(i[1:]) for i in ids]


def test_a_full_cache_evicts_the_least_recently_used_and_refetches_them(clock: Clock) -> None:
    cache = ItemCache(DIMS, max_items=1024)
    ids = [f"i{n}" for n in range(1024)]
    store = Store(ids + ["new"])
    for n, item_id in enumerate(ids):
        clock.now += 1.0
        cache.put(item_id, vectors(float(n)), {"n": n})
    clock.now += 1.0
    cache.gather(ids[:10], store.fetch)  # the oldest ten are used again: they stay
    clock.now += 1.0
    cache.put("new", vectors(-1.0), {"n": -1})
    assert len(cache) == 1024 - 1024 // 8 + 1
    assert cache.evictions == 128
    found = cache.gather(ids[:10] + ["new"], store.fetch)
    assert store.requests == []  # nothing had to be fetched
    np.testing.assert_array_equal(found.vectors["fused"][:, 0], list(range(10)) + [-1.0])
    # The evicted ones (the least recently used: i10 .. i137) come back from the store.
    again = cache.gather(["i10", "i137", "i138"], store.fetch)
    assert store.requests == [["i10", "i137"]]
    assert again.item_ids == ["i10", "i137", "i138"]
    np.testing.assert_array_equal(again.vectors["fused"][:, 0], [10.0, 137.0, 138.0])


def test_items_without_a_vector_take_no_room_in_its_matrix(clock: Clock) -> None:
    cache = ItemCache({"fused": 4, "image": 1280}, capacity=2)
    for n in range(100):
        image = {"image": np.full(1280, float(n), np.float32)} if n % 50 == 0 else {}
        cache.put(f"i{n}", {**vectors(float(n)), **image}, {})
    assert len(cache._columns["image"].data) <= 2  # two photos among a hundred items
    assert len(cache._columns["fused"].data) >= 100
    found = cache.gather(["i0", "i1", "i50"], Store([]).fetch)
    np.testing.assert_array_equal(found.present["image"], [True, False, True])
    np.testing.assert_array_equal(found.vectors["image"][:, 0], [0.0, 0.0, 50.0])
    # A photo removed by a rewrite frees its slot for the next item that has one.
    cache.put("i50", vectors(50.0), {})
    cache.put("i99", {**vectors(99.0), "image": np.full(1280, 99.0, np.float32)}, {})
    assert len(cache._columns["image"].data) <= 2
    found = cache.gather(["i50", "i99"], Store([]).fetch)
    np.testing.assert_array_equal(found.present["image"], [False, True])
    assert found.vectors["image"][1, 0] == 99.0


def test_max_items_below_the_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="max_items"):
        ItemCache(DIMS, max_items=10)


def test_gather_points_finds_items_by_point_id_and_copies_only_the_names_asked(clock: Clock) -> None:
    from stream.store import point_id, point_ids

    cache = ItemCache(DIMS)
    cache.put("a", {"fused": np.full(4, 1.0, np.float32), "image": np.ones(3, np.float32)}, {"title": "A"})
    store = Store(["b"])
    asked: list[list[int]] = []

    def fetch(missing: list[int]) -> dict[int, Hit]:
        asked.append(missing)
        by_point = {point_id(i): i for i in store.hits}
        return {p: store.hits[by_point[p]] for p in missing if p in by_point}

    found = cache.gather_points(point_ids(["zzz", "b", "a"]), fetch, ["fused"])

    assert asked == [point_ids(["zzz", "b"]).tolist()]
    assert found.item_ids == ["b", "a"] and found.point_ids.tolist() == point_ids(["b", "a"]).tolist()
    assert set(found.vectors) == {"fused"}  # no image rows copied for a request that reads none
    assert found.present["image"].tolist() == [False, True]
    assert found.payloads[1] == {"title": "A"}
    assert found.subset([1]).item_ids == ["a"]


def test_a_derived_column_is_computed_once_per_item_from_its_vectors(clock: Clock) -> None:
    from stream.item_cache import Derived

    calls: list[int] = []

    def photo_sum(vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> np.ndarray:
        calls.append(len(vectors["fused"]))
        return np.stack([vectors["image"].sum(axis=1), present["image"].astype(np.float32)], axis=1)

    cache = ItemCache(DIMS, derived=Derived("part", 2, photo_sum))
    cache.put("a", {"fused": np.ones(4, np.float32), "image": np.full(3, 2.0, np.float32)}, {})
    cache.put("b", {"fused": np.ones(4, np.float32)}, {})
    found = cache.gather(["a", "b", "a"], Store([]).fetch, ["part"])
    found = cache.gather(["a", "b"], Store([]).fetch, ["part"])

    assert calls == [1, 1]  # at put time, not per request
    assert found.vectors["part"].tolist() == [[6.0, 1.0], [0.0, 0.0]]
    assert set(cache.dims) == {"fused", "image"}  # what the store is asked for stays the stored vectors
    with pytest.raises(ValueError, match="clashes"):
        ItemCache(DIMS, derived=Derived("fused", 1, photo_sum))


def test_lookups_stay_exact_through_puts_drops_reused_rows_and_evictions(clock: Clock) -> None:
    """The sorted point index against a plain dictionary, over a long random history of changes."""
    rng = np.random.default_rng(7)
    cache = ItemCache({"fused": 4}, max_items=1024, capacity=8)
    held: dict[str, float] = {}  # what a put wrote, for items not dropped since
    names = [f"i{n}" for n in range(3000)]
    for step in range(6000):
        clock.now += 1.0
        item = names[int(rng.integers(len(names)))]
        if rng.random() < 0.2:
            cache.drop([item])
            held.pop(item, None)
        else:
            cache.put(item, vectors(float(step)), {"title": item})
            held[item] = float(step)
        if step % 97 == 0:
            asked = [names[int(n)] for n in rng.integers(len(names), size=300)]
            found = cache.gather(asked, lambda missing: {}, ["fused"])
            # Evicted items are neither held nor fetched back here (the fetch finds nothing): every
            # item the cache returns is one held, with the vector of its latest put, in the asked order.
            assert set(found.item_ids) <= set(held)
            assert found.item_ids == [i for i in asked if i in set(found.item_ids)]
            assert found.vectors["fused"][:, 0].tolist() == [held[i] for i in found.item_ids]
    assert cache.evictions > 0 and len(cache) <= 1024
    every = cache.gather([i for i in names if i in held], lambda missing: {}, ["fused"])
    assert len(every.item_ids) == len(cache)


def test_a_vector_only_the_derived_column_reads_is_not_held(clock: Clock) -> None:
    """A split scorer's cache keeps no photo rows, yet each item's part is computed from its photo."""
    from stream.item_cache import Derived

    def photo_sum(vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([vectors["image"].sum(axis=1), present["image"].astype(np.float32)], axis=1)

    cache = ItemCache({"fused": 4, "image": 1280}, derived=Derived("part", 2, photo_sum), held=["fused"], capacity=4)
    cache.put("a", {"fused": np.ones(4, np.float32), "image": np.full(1280, 0.5, np.float32)}, {})
    store = Store([])
    store.hits["b"] = Hit("b", 0.0, {"id": "b"}, {"fused": np.ones(4, np.float32), "image": np.ones(1280, np.float32)})
    found = cache.gather(["a", "b"], store.fetch, ["fused", "part"])

    assert found.vectors["part"].tolist() == [[640.0, 1.0], [1280.0, 1.0]]  # fetched "b" too
    assert set(found.present) == {"fused"}
    assert "image" not in cache._columns  # no 1,280-d matrix at all
    with pytest.raises(ValueError, match="not among the stored"):
        ItemCache({"fused": 4}, held=["image"])
