"""One contract for every vector-store backend, run against the real engines.

``edge`` is qdrant-edge in-process on a temporary directory; ``qdrant-local``
is qdrant-client's local mode (the same client code that talks to a server).
The edge store is built with low indexing thresholds so that ``optimize`` on a
few thousand points really builds and searches an HNSW graph.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import QdrantClient

from core.errors import ConfigError, StoreInUseError, StoreUnavailableError
from stream.store import CollectionSpec, Point, SearchFilter, VectorStore, open_store, point_id, point_ids
from stream.store.base import INT8_AUTO_MIN_DIM, check_distinct_points, int8_vectors, point_uuid
from stream.store.edge import EdgeStore
from stream.store.remote import RemoteStore

# The client checks the server's version from a background thread; against
# the unreachable server below that warning lands in whichever test runs next.
pytestmark = pytest.mark.filterwarnings("ignore:Failed to obtain server version")

REPO_ROOT = Path(__file__).resolve().parents[2]
ITEMS = CollectionSpec("items", {"text": 16, "image": 8})
CATEGORIES = ("toys", "sports", "books", "garden")


@dataclass
class Backend:
    """Opens stores of one kind over the same underlying storage."""

    kind: str
    data_dir: Path
    client: QdrantClient | None = None

    def open(self) -> VectorStore:
        if self.kind == "edge":
            return EdgeStore(
                self.data_dir, hnsw_ef=256, indexing_threshold_kb=64, full_scan_threshold_kb=16
            )
        if self.client is None:
            self.client = QdrantClient(location=":memory:")
        return RemoteStore(self.client, hnsw_ef=256)

    def reopen(self, store: VectorStore) -> VectorStore:
        """A fresh store object over what ``store`` wrote (edge must release its lock first)."""
        if self.kind == "edge":
            store.close()
        return self.open()


@pytest.fixture(params=["edge", "qdrant-local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return Backend(request.param, tmp_path / "vectors")


@pytest.fixture
def store(backend: Backend) -> Iterator[VectorStore]:
    opened = backend.open()
    yield opened
    opened.close()


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def random_items(
    rng: np.random.Generator, count: int, dim: int, name: str = "text"
) -> tuple[list[Point], np.ndarray]:
    """Points with one vector each, a category and a price; also their vectors (count, dim)."""
    vectors = rng.standard_normal((count, dim)).astype(np.float32)
    points = [
        Point(
            id=f"item-{i}",
            vectors={name: vectors[i]},
            payload={"category": CATEGORIES[i % len(CATEGORIES)], "price": float(i % 50)},
        )
        for i in range(count)
    ]
    return points, vectors


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int, keep: np.ndarray) -> list[str]:
    """Domain ids of the k best rows by cosine among rows where ``keep`` is true."""
    scores = unit_rows(vectors) @ (query / np.linalg.norm(query))
    scores = np.where(keep, scores, -np.inf)
    order = np.argsort(-scores, kind="stable")[:k]
    return [f"item-{i}" for i in order if keep[i]]


def fill(store: VectorStore, points: list[Point], batch: int = 1000) -> None:
    for start in range(0, len(points), batch):
        store.upsert(ITEMS.name, points[start : start + batch])


# -- collections ---------------------------------------------------------------


def test_ensure_collection_is_idempotent(backend: Backend, store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    store.upsert(ITEMS.name, [Point("a", {"text": np.ones(16)}, {})])
    store.ensure_collection(ITEMS)
    assert store.count(ITEMS.name) == 1

    reopened = backend.reopen(store)
    reopened.ensure_collection(ITEMS)
    assert reopened.count(ITEMS.name) == 1
    reopened.close()


def test_ensure_collection_rejects_other_dimensions(backend: Backend, store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    other_dims = CollectionSpec(ITEMS.name, {"text": 32, "image": 8})
    other_names = CollectionSpec(ITEMS.name, {"text": 16})
    for wrong in (other_dims, other_names):
        with pytest.raises(ConfigError, match="items"):
            store.ensure_collection(wrong)

    # A collection made by an earlier store object is checked too.
    reopened = backend.reopen(store)
    for wrong in (other_dims, other_names):
        with pytest.raises(ConfigError, match="items"):
            reopened.ensure_collection(wrong)
    reopened.close()


def test_collection_must_be_ensured_first(store: VectorStore) -> None:
    with pytest.raises(ConfigError, match="ensure_collection"):
        store.count("items")


def test_dropped_collection_is_gone_and_can_be_created_again(backend: Backend, store: VectorStore) -> None:
    other = CollectionSpec("other", {"text": 16})
    store.ensure_collection(ITEMS)
    store.ensure_collection(other)
    store.upsert(ITEMS.name, [Point("a", {"text": np.ones(16), "image": np.ones(8)})])
    store.upsert(other.name, [Point("b", {"text": np.ones(16)})])
    store.drop_collection(ITEMS.name)
    store.drop_collection("never-created")  # ignored
    with pytest.raises(ConfigError):
        store.count(ITEMS.name)
    assert store.count(other.name) == 1  # only the named collection goes
    store = backend.reopen(store)  # the drop is durable, not only forgotten by this object
    store.ensure_collection(ITEMS)
    store.ensure_collection(other)
    assert store.count(ITEMS.name) == 0
    assert store.count(other.name) == 1
    store.close()


def test_bad_collection_specs_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        CollectionSpec("../escape", {"text": 4})
    with pytest.raises(ConfigError):
        CollectionSpec("items", {})
    with pytest.raises(ConfigError):
        CollectionSpec("items", {"text": 0})


# -- writes and reads ------------------------------------------------------------


def test_upsert_then_retrieve_round_trips_vectors_and_payload(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    rng = np.random.default_rng(1)
    text, image = rng.standard_normal(16), rng.standard_normal(8)
    payload = {"category": "toys", "price": 9.5, "tags": ["red", "soft"], "meta": {"n": 3}}
    store.upsert(ITEMS.name, [Point("item/ä 1", {"text": text, "image": image}, payload)])

    hits = store.retrieve(ITEMS.name, ["item/ä 1", "absent"], with_vectors=True)

    assert set(hits) == {"item/ä 1"}
    hit = hits["item/ä 1"]
    assert hit.id == "item/ä 1" and hit.score == 0.0
    assert hit.payload == payload
    # Cosine collections store unit vectors: what comes back is the direction.
    np.testing.assert_allclose(hit.vectors["text"], text / np.linalg.norm(text), atol=1e-6)
    np.testing.assert_allclose(hit.vectors["image"], image / np.linalg.norm(image), atol=1e-6)
    assert hit.vectors["text"].dtype == np.float32


def test_retrieve_returns_only_the_vectors_asked_for(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    store.upsert(ITEMS.name, [Point("a", {"text": np.ones(16), "image": np.ones(8)}, {})])

    assert store.retrieve(ITEMS.name, ["a"])["a"].vectors == {}
    assert set(store.retrieve(ITEMS.name, ["a"], with_vectors=["image"])["a"].vectors) == {"image"}
    assert store.retrieve(ITEMS.name, []) == {}


def test_points_may_lack_some_named_vectors(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    store.upsert(
        ITEMS.name,
        [
            Point("with-image", {"text": np.ones(16), "image": np.ones(8)}, {}),
            Point("text-only", {"text": np.ones(16)}, {}),
            Point("no-vectors", {}, {"category": "toys"}),
        ],
    )

    assert set(store.retrieve(ITEMS.name, ["text-only"], True)["text-only"].vectors) == {"text"}
    assert store.retrieve(ITEMS.name, ["no-vectors"], True)["no-vectors"].vectors == {}
    image_ids = [hit.id for hit in store.search(ITEMS.name, "image", np.ones(8), 10)]
    text_ids = {hit.id for hit in store.search(ITEMS.name, "text", np.ones(16), 10)}
    assert image_ids == ["with-image"]
    assert text_ids == {"with-image", "text-only"}
    assert store.count(ITEMS.name) == 3


def test_upsert_replaces_the_whole_point(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    old = Point("a", {"text": np.ones(16), "image": np.ones(8)}, {"category": "toys", "x": 1})
    store.upsert(ITEMS.name, [old])
    new_text = np.arange(1, 17, dtype=np.float32)
    store.upsert(ITEMS.name, [Point("a", {"text": new_text}, {"category": "books"})])

    hit = store.retrieve(ITEMS.name, ["a"], with_vectors=True)["a"]
    assert hit.payload == {"category": "books"}
    assert set(hit.vectors) == {"text"}
    np.testing.assert_allclose(hit.vectors["text"], new_text / np.linalg.norm(new_text), atol=1e-6)
    assert store.search(ITEMS.name, "image", np.ones(8), 5) == []
    assert store.count(ITEMS.name) == 1


def test_update_payload_merges_keys(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    store.upsert(ITEMS.name, [Point("a", {"text": np.ones(16)}, {"category": "toys", "price": 3})])

    store.update_payload(ITEMS.name, "a", {"price": 4, "stock": 10})

    hit = store.retrieve(ITEMS.name, ["a"], with_vectors=True)["a"]
    assert hit.payload == {"category": "toys", "price": 4, "stock": 10}
    assert set(hit.vectors) == {"text"}
    with pytest.raises(KeyError):
        store.update_payload(ITEMS.name, "absent", {"price": 1})
    with pytest.raises(ValueError, match="reserved"):
        store.update_payload(ITEMS.name, "a", {"id": "b"})


def test_update_vectors_keeps_other_vectors_and_payload(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    store.upsert(ITEMS.name, [Point("a", {"text": np.ones(16)}, {"category": "toys"})])

    store.update_vectors(ITEMS.name, "a", {"image": np.ones(8)})

    hit = store.retrieve(ITEMS.name, ["a"], with_vectors=True)["a"]
    assert set(hit.vectors) == {"text", "image"} and hit.payload == {"category": "toys"}
    assert [h.id for h in store.search(ITEMS.name, "image", np.ones(8), 5)] == ["a"]
    with pytest.raises(KeyError):
        store.update_vectors(ITEMS.name, "absent", {"image": np.ones(8)})


def test_delete_removes_points_and_ignores_unknown_ids(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    store.upsert(ITEMS.name, [Point(i, {"text": np.ones(16)}, {}) for i in ("a", "b", "c")])

    store.delete(ITEMS.name, ["a", "c", "never-stored"])

    assert store.count(ITEMS.name) == 1
    assert set(store.retrieve(ITEMS.name, ["a", "b", "c"])) == {"b"}
    assert [hit.id for hit in store.search(ITEMS.name, "text", np.ones(16), 10)] == ["b"]


def test_bad_vectors_and_payloads_are_refused(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    bad_points = [
        Point("a", {"text": np.ones(15)}, {}),  # wrong dimension
        Point("a", {"colour": np.ones(16)}, {}),  # unknown vector name
        Point("a", {"text": np.zeros(16)}, {}),  # cosine undefined
        Point("a", {"text": np.full(16, np.nan)}, {}),
        Point("a", {"text": np.ones(16)}, {"id": "other"}),  # reserved key
    ]
    for point in bad_points:
        with pytest.raises(ValueError):
            store.upsert(ITEMS.name, [point])
    with pytest.raises(ValueError):
        store.search(ITEMS.name, "text", np.ones(8), 5)
    with pytest.raises(ValueError):
        store.search(ITEMS.name, "text", np.ones(16), 0)
    with pytest.raises(ValueError):
        Point("", {}, {})
    assert store.count(ITEMS.name) == 0


# -- search ----------------------------------------------------------------------


def test_exact_search_matches_brute_force(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    rng = np.random.default_rng(2)
    points, vectors = random_items(rng, 2000, 16)
    fill(store, points)
    everything = np.ones(len(points), dtype=bool)

    for query in rng.standard_normal((20, 16)).astype(np.float32):
        hits = store.search(ITEMS.name, "text", query, 10, exact=True)
        assert [hit.id for hit in hits] == brute_force(vectors, query, 10, everything)
        expected = unit_rows(vectors) @ (query / np.linalg.norm(query))
        for hit in hits:
            assert hit.score == pytest.approx(expected[int(hit.id.split("-")[1])], abs=1e-5)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_ann_search_after_optimize_has_high_recall(store: VectorStore) -> None:
    spec = CollectionSpec(ITEMS.name, {"text": 64})
    store.ensure_collection(spec)
    rng = np.random.default_rng(3)
    points, vectors = random_items(rng, 5000, 64)
    fill(store, points)
    store.optimize(spec.name)
    if isinstance(store, EdgeStore):
        assert store.indexed_vector_count(spec.name) == 5000  # the graph is really used

    queries = rng.standard_normal((30, 64)).astype(np.float32)
    everything = np.ones(len(points), dtype=bool)
    toys = np.array([p.payload["category"] == "toys" for p in points])
    recall, toys_recall = [], []
    for query in queries:
        found = [hit.id for hit in store.search(spec.name, "text", query, 10)]
        recall.append(len(set(found) & set(brute_force(vectors, query, 10, everything))) / 10)
        toy_hits = store.search(spec.name, "text", query, 10, SearchFilter(categories=("toys",)))
        found = [hit.id for hit in toy_hits]
        toys_recall.append(len(set(found) & set(brute_force(vectors, query, 10, toys))) / 10)
    assert np.mean(recall) >= 0.9
    assert np.mean(toys_recall) >= 0.9


def test_upserted_point_is_searchable_without_optimize(store: VectorStore) -> None:
    spec = CollectionSpec(ITEMS.name, {"text": 64})
    store.ensure_collection(spec)
    rng = np.random.default_rng(4)
    points, _ = random_items(rng, 3000, 64)
    fill(store, points)
    store.optimize(spec.name)
    fresh_vector = rng.standard_normal(64).astype(np.float32)

    store.upsert(spec.name, [Point("fresh", {"text": fresh_vector}, {"category": "toys"})])

    assert store.search(spec.name, "text", fresh_vector, 1)[0].id == "fresh"
    only_toys = SearchFilter(categories=("toys",))
    assert store.search(spec.name, "text", fresh_vector, 1, only_toys)[0].id == "fresh"


def test_filters_restrict_results_like_brute_force(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    rng = np.random.default_rng(5)
    points, vectors = random_items(rng, 1000, 16)
    fill(store, points)
    query = rng.standard_normal(16).astype(np.float32)
    unfiltered = [hit.id for hit in store.search(ITEMS.name, "text", query, 5, exact=True)]
    categories = np.array([p.payload["category"] for p in points])
    prices = np.array([p.payload["price"] for p in points])
    ids = np.array([p.id for p in points])

    cases = [
        (SearchFilter(categories=("toys", "books")), np.isin(categories, ["toys", "books"])),
        (SearchFilter(exclude_ids=tuple(unfiltered)), ~np.isin(ids, unfiltered)),
        (SearchFilter(min_price=10, max_price=20), (prices >= 10) & (prices <= 20)),
        (
            SearchFilter(categories=("sports",), exclude_ids=tuple(unfiltered), max_price=30),
            (categories == "sports") & ~np.isin(ids, unfiltered) & (prices <= 30),
        ),
    ]
    for flt, keep in cases:
        found = [hit.id for hit in store.search(ITEMS.name, "text", query, 20, flt, exact=True)]
        assert found == brute_force(vectors, query, 20, keep)
    no_match = SearchFilter(categories=("no-such-category",))
    assert store.search(ITEMS.name, "text", query, 5, no_match) == []


def test_search_points_returns_the_search_as_arrays(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    rng = np.random.default_rng(15)
    points, vectors = random_items(rng, 1500, 16)
    fill(store, points)
    store.optimize(ITEMS.name)
    query = rng.standard_normal(16).astype(np.float32)
    seen = [p.id for p in points[:400:7]]
    ids_of = {point_id(p.id): p.id for p in points}

    for exact in (True, False):
        hits = store.search(ITEMS.name, "text", query, 30, SearchFilter(exclude_ids=tuple(seen)), exact=exact)
        by_ints = SearchFilter(exclude_points=tuple(point_ids(seen).tolist()))
        ids, scores = store.search_points(ITEMS.name, "text", query, 30, by_ints, exact=exact)
        assert ids.dtype == np.int64 and scores.dtype == np.float32
        assert [ids_of[i] for i in ids.tolist()] == [h.id for h in hits]
        assert scores.tolist() == pytest.approx([h.score for h in hits], abs=1e-6)
        assert not set(ids.tolist()) & set(point_ids(seen).tolist())
    exact_ids, _ = store.search_points(ITEMS.name, "text", query, 20, exact=True)
    assert [ids_of[i] for i in exact_ids.tolist()] == brute_force(vectors, query, 20, np.ones(1500, bool))
    empty_ids, empty_scores = store.search_points(ITEMS.name, "text", query, 5,
                                                  SearchFilter(categories=("no-such-category",)))
    assert empty_ids.shape == (0,) and empty_scores.shape == (0,)


def test_retrieve_points_finds_points_by_integer_id(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    store.upsert(ITEMS.name, [Point("a", {"text": np.ones(16)}, {"k": 1}), Point("b", {"image": np.ones(8)}, {})])

    found = store.retrieve_points(ITEMS.name, point_ids(["b", "a", "zzz"]), with_vectors=["text"])

    assert set(found) == {point_id("a"), point_id("b")}
    assert found[point_id("a")].id == "a" and found[point_id("a")].payload == {"k": 1}
    assert set(found[point_id("a")].vectors) == {"text"} and found[point_id("b")].vectors == {}
    assert store.retrieve_points(ITEMS.name, []) == {}


def test_point_ids_are_stable_non_negative_int64() -> None:
    assert point_id("item-1") == point_id("item-1") != point_id("item-2")
    ids = point_ids([f"u{n}" for n in range(10_000)])
    assert ids.dtype == np.int64 and (ids >= 0).all() and len(set(ids.tolist())) == 10_000
    # Fixed for the life of the data: a changed function would orphan every stored point.
    assert point_id("item-1") == 0x74a8b5ad5a9debe4


def test_two_domain_ids_on_one_point_id_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import stream.store.base as base

    monkeypatch.setattr(base, "point_id", lambda domain_id: 7)
    with pytest.raises(ValueError, match="same point id"):
        check_distinct_points([Point("a", {}, {}), Point("b", {}, {})])
    assert check_distinct_points([Point("a", {}, {}), Point("a", {}, {})]) == [7, 7]


def test_edge_converts_a_shard_written_with_uuid_point_ids(tmp_path: Path) -> None:
    import qdrant_edge as qe

    store = EdgeStore(tmp_path)
    store.ensure_collection(ITEMS)
    store.close()
    # Format 1: the same shard, its points under uuid5 ids, no format marker.
    (tmp_path / ITEMS.name / "streamrec_point_ids").unlink()
    config = EdgeStore(tmp_path)._edge_config(ITEMS, half=frozenset(), quantized=frozenset())
    shard = qe.EdgeShard.load(str(tmp_path / ITEMS.name), config)
    old = [qe.Point(point_uuid(f"old-{n}"), {"text": [float(n + 1)] + [1.0] * 15},
                    {"id": f"old-{n}", "category": "toys"}) for n in range(3)]
    shard.update(qe.UpdateOperation.upsert_points(old))
    shard.close()

    reopened = EdgeStore(tmp_path)
    reopened.ensure_collection(ITEMS)
    assert reopened.count(ITEMS.name) == 3
    assert sorted(reopened.retrieve(ITEMS.name, ["old-0", "old-1", "old-2"])) == ["old-0", "old-1", "old-2"]
    ids, _ = reopened.search_points(ITEMS.name, "text", np.ones(16), 3, SearchFilter(exclude_ids=("old-1",)))
    assert sorted(ids.tolist()) == sorted(point_ids(["old-0", "old-2"]).tolist())
    reopened.close()


def test_remote_refuses_a_collection_with_uuid_point_ids() -> None:
    from qdrant_client import models

    client = QdrantClient(location=":memory:")
    client.create_collection(ITEMS.name, vectors_config={
        name: models.VectorParams(size=dim, distance=models.Distance.COSINE) for name, dim in ITEMS.vectors.items()})
    client.upsert(ITEMS.name, [models.PointStruct(id=str(point_uuid("a")), vector={"text": [1.0] * 16},
                                                  payload={"id": "a"})])
    store = RemoteStore(client)
    with pytest.raises(ConfigError, match="UUID ids"):
        store.ensure_collection(ITEMS)
    store.close()


def test_search_returns_vectors_only_when_asked(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    store.upsert(ITEMS.name, [Point("a", {"text": np.ones(16), "image": np.ones(8)}, {"k": 1})])

    plain = store.search(ITEMS.name, "text", np.ones(16), 1)[0]
    with_text = store.search(ITEMS.name, "text", np.ones(16), 1, with_vectors=["text"])[0]

    assert plain.vectors == {} and plain.payload == {"k": 1}
    assert plain.score == pytest.approx(1.0, abs=1e-5)
    assert set(with_text.vectors) == {"text"}


def test_search_batch_equals_individual_searches(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    rng = np.random.default_rng(6)
    points, _ = random_items(rng, 1500, 16)
    fill(store, points)
    store.optimize(ITEMS.name)
    queries = rng.standard_normal((7, 16)).astype(np.float32)  # (Q, dim)
    flt = SearchFilter(categories=("toys", "garden"), exclude_ids=("item-0", "item-3"))

    batched = store.search_batch(ITEMS.name, "text", queries, 15, flt)

    assert len(batched) == len(queries)
    for query, hits in zip(queries, batched):
        single = store.search(ITEMS.name, "text", query, 15, flt)
        assert [h.id for h in hits] == [h.id for h in single]
        assert [h.score for h in hits] == pytest.approx([h.score for h in single], abs=1e-6)
    assert store.search_batch(ITEMS.name, "text", np.zeros((0, 16)), 5) == []


def test_count_and_scroll_ids_cover_every_point(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    points, _ = random_items(np.random.default_rng(7), 2500, 16)  # more than one page
    fill(store, points, batch=700)
    store.delete(ITEMS.name, ["item-5"])

    ids = list(store.scroll_ids(ITEMS.name))

    assert store.count(ITEMS.name) == 2499
    assert len(ids) == 2499
    assert set(ids) == {p.id for p in points} - {"item-5"}


def test_concurrent_searches_during_writes(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    rng = np.random.default_rng(8)
    points, _ = random_items(rng, 1000, 16)
    fill(store, points)
    queries = rng.standard_normal((30, 16)).astype(np.float32)
    failures: list[BaseException] = []

    def search_many() -> None:
        try:
            for query in queries:
                hits = store.search(ITEMS.name, "text", query, 10, SearchFilter(("toys",)))
                assert len(hits) == 10 and all(h.payload["category"] == "toys" for h in hits)
        except BaseException as exc:  # surfaced on the main thread below
            failures.append(exc)

    searchers = [threading.Thread(target=search_many) for _ in range(3)]
    for thread in searchers:
        thread.start()
    extra, _ = random_items(rng, 100, 16)
    for point in extra:
        store.upsert(ITEMS.name, [Point(f"new-{point.id}", point.vectors, point.payload)])
    for thread in searchers:
        thread.join()

    assert failures == []
    assert store.count(ITEMS.name) == 1100


# -- lifecycle and failures --------------------------------------------------------


def test_closed_store_is_unavailable(store: VectorStore) -> None:
    store.ensure_collection(ITEMS)
    store.close()
    with pytest.raises(StoreUnavailableError):
        store.count(ITEMS.name)
    store.close()  # closing twice is harmless


def test_edge_store_persists_across_close_and_reopen(tmp_path: Path) -> None:
    data_dir = tmp_path / "vectors"
    with EdgeStore(data_dir) as first:
        first.ensure_collection(ITEMS)
        first.upsert(ITEMS.name, [Point("a", {"text": np.ones(16)}, {"category": "toys"})])
        first.optimize(ITEMS.name)

    with EdgeStore(data_dir) as second:
        second.ensure_collection(ITEMS)
        assert second.retrieve(ITEMS.name, ["a"])["a"].payload == {"category": "toys"}
        assert [hit.id for hit in second.search(ITEMS.name, "text", np.ones(16), 3)] == ["a"]


def test_edge_store_keeps_acknowledged_writes_after_a_crash(tmp_path: Path) -> None:
    data_dir = tmp_path / "vectors"
    # The child writes and dies without flush or close; the write-ahead log
    # must bring the points back.
    child = textwrap.dedent(
        f"""
        import os, numpy as np
        from stream.store import CollectionSpec, Point
        from stream.store.edge import EdgeStore
        store = EdgeStore({str(data_dir)!r})
        store.ensure_collection(CollectionSpec("items", {{"text": 16, "image": 8}}))
        points = [Point(f"p{{i}}", {{"text": np.ones(16) + i}}, {{}}) for i in range(50)]
        store.upsert("items", points)
        store.update_payload("items", "p7", {{"seen": True}})
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", child], cwd=REPO_ROOT, check=True, timeout=120)

    with EdgeStore(data_dir) as reopened:
        reopened.ensure_collection(ITEMS)
        assert reopened.count(ITEMS.name) == 50
        assert reopened.retrieve(ITEMS.name, ["p7"])["p7"].payload == {"seen": True}


def test_edge_directory_is_open_in_one_store_at_a_time(tmp_path: Path) -> None:
    with EdgeStore(tmp_path) as holder:
        holder.ensure_collection(ITEMS)
        with EdgeStore(tmp_path) as second, pytest.raises(StoreInUseError, match="open in another process"):
            second.ensure_collection(ITEMS)


def test_unreachable_server_is_unavailable() -> None:
    # Port 1 on loopback refuses connections: a real client, a real failure.
    with pytest.raises(StoreUnavailableError, match="connect"):
        open_store("qdrant", url="http://127.0.0.1:1")


def test_open_store_checks_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        open_store("faiss", data_dir=tmp_path)
    with pytest.raises(ConfigError):
        open_store("edge")
    with pytest.raises(ConfigError):
        open_store("qdrant")
    with open_store("edge", data_dir=tmp_path) as edge:
        edge.ensure_collection(ITEMS)
        assert edge.count(ITEMS.name) == 0
    with open_store("qdrant", location=":memory:") as local:
        local.ensure_collection(ITEMS)
        assert local.count(ITEMS.name) == 0


def test_dot_vectors_keep_their_length_and_rank_by_dot_product(store: VectorStore) -> None:
    spec = CollectionSpec("dotspace", {"v": 3}, dot=frozenset({"v"}))
    store.ensure_collection(spec)
    long_far = np.array([3.0, 3.0, 0.0], np.float32)  # cosine 0.71 to the query, dot 3.0
    short_near = np.array([0.5, 0.0, 0.0], np.float32)  # cosine 1.0, dot 0.5
    store.upsert("dotspace", [Point("long", {"v": long_far}), Point("short", {"v": short_near})])
    hits = store.search("dotspace", "v", np.array([1.0, 0.0, 0.0], np.float32), 2, exact=True)
    assert [h.id for h in hits] == ["long", "short"]
    assert hits[0].score == pytest.approx(3.0, rel=1e-5)
    stored = store.retrieve("dotspace", ["long"], with_vectors=True)["long"].vectors["v"]
    np.testing.assert_allclose(stored, long_far, rtol=1e-6)
    with pytest.raises(ConfigError):
        store.ensure_collection(CollectionSpec("dotspace", {"v": 3}))  # same dims, other distance


HALF = CollectionSpec("halves", {"text": 16, "fused": 8}, dot=frozenset({"fused"}), half=frozenset({"text"}))


def test_half_precision_vectors_read_back_rounded_and_rank_as_float32(store: VectorStore) -> None:
    store.ensure_collection(HALF)
    rng = np.random.default_rng(5)
    text = unit_rows(rng.standard_normal((300, 16)).astype(np.float32))
    fused = rng.standard_normal((300, 8)).astype(np.float32)
    store.upsert(HALF.name, [Point(f"item-{i}", {"text": text[i], "fused": fused[i]}, {}) for i in range(300)])
    back = store.retrieve(HALF.name, ["item-7"], with_vectors=True)["item-7"].vectors
    np.testing.assert_allclose(back["text"], text[7], atol=1e-3)  # three significant digits
    np.testing.assert_array_equal(back["fused"], fused[7])  # float32 vectors are untouched
    query = rng.standard_normal(16).astype(np.float32)
    found = [h.id for h in store.search(HALF.name, "text", query, 10, exact=True)]
    assert found == brute_force(text, query, 10, np.ones(300, bool))


def test_a_float32_edge_collection_opens_under_a_half_spec(tmp_path: Path) -> None:
    """A store written before its spec asked for float16 keeps float32 and stays usable."""
    full = CollectionSpec(HALF.name, HALF.vectors, dot=HALF.dot)
    store = EdgeStore(tmp_path)
    store.ensure_collection(full)
    vector = unit_rows(np.arange(1, 17, dtype=np.float32)[None, :])[0]
    store.upsert(HALF.name, [Point("a", {"text": vector, "fused": np.ones(8, np.float32)}, {})])
    store.close()
    reopened = EdgeStore(tmp_path)
    reopened.ensure_collection(HALF)
    np.testing.assert_array_equal(reopened.retrieve(HALF.name, ["a"], with_vectors=True)["a"].vectors["text"], vector)
    reopened.upsert(HALF.name, [Point("b", {"text": vector, "fused": np.ones(8, np.float32)}, {})])
    assert reopened.count(HALF.name) == 2
    reopened.close()


COLD = CollectionSpec("content", {"image": 24, "text": 16, "fused": 8}, dot=frozenset({"fused"}),
                      half=frozenset({"image", "text"}), quantized=frozenset({"fused"}),
                      cold=frozenset({"image", "text"}))


def test_cold_vectors_are_kept_and_searched_as_any_other(store: VectorStore) -> None:
    """Left on disk, content vectors still read back, rank and survive an index build."""
    store.ensure_collection(COLD)
    rng = np.random.default_rng(9)
    image = unit_rows(rng.standard_normal((400, 24)).astype(np.float32))
    fused = rng.standard_normal((400, 8)).astype(np.float32)
    store.upsert(COLD.name, [Point(f"item-{i}", {"fused": fused[i], **({"image": image[i]} if i % 2 else {})}, {})
                             for i in range(400)])
    store.optimize(COLD.name)
    back = store.retrieve(COLD.name, ["item-7", "item-8"], with_vectors=True)
    np.testing.assert_allclose(back["item-7"].vectors["image"], image[7], atol=1e-3)
    assert "image" not in back["item-8"].vectors and "text" not in back["item-7"].vectors
    query = rng.standard_normal(24).astype(np.float32)
    found = [h.id for h in store.search(COLD.name, "image", query, 10, exact=True)]
    assert found == brute_force(image, query, 10, np.arange(400) % 2 == 1)


def test_an_edge_collection_keeps_its_cold_vectors_on_disk(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    store.ensure_collection(COLD)
    store.close()
    vectors = json.loads((tmp_path / COLD.name / "edge_config.json").read_text())["vectors"]
    assert {name: vectors[name].get("memory") for name in COLD.vectors} == {
        "image": "cold", "text": "cold", "fused": None}


@pytest.mark.parametrize("cold", [{"fused"}, {"photo"}])
def test_a_searched_or_unknown_vector_cannot_be_cold(cold: set[str]) -> None:
    with pytest.raises(ConfigError, match="cold names unknown or searched vectors"):
        CollectionSpec("content", COLD.vectors, quantized=frozenset({"fused"}), cold=frozenset(cold))


QUANTIZED = CollectionSpec("ranked", {"fused": 32, "text": 8}, dot=frozenset({"fused"}), quantized=frozenset({"fused"}))


def _clustered(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    centres = rng.standard_normal((20, dim))
    rows = centres[rng.integers(0, 20, count)] + 0.3 * rng.standard_normal((count, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _indexed_store(path: Path, quantization: str, vectors: np.ndarray) -> EdgeStore:
    store = EdgeStore(path, quantization=quantization, indexing_threshold_kb=64, full_scan_threshold_kb=16)
    store.ensure_collection(QUANTIZED)
    store.upsert(QUANTIZED.name, [Point(f"q{n}", {"fused": row, "text": np.ones(8, np.float32)}, {})
                                  for n, row in enumerate(vectors)])
    store.optimize(QUANTIZED.name)
    return store


def _stored_quantization(path: Path) -> object:
    return json.loads((path / QUANTIZED.name / "edge_config.json").read_text())["vectors"]["fused"].get(
        "quantization_config")


def test_edge_searches_an_int8_copy_and_returns_exact_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    vectors = _clustered(rng, 3000, 32)
    store = _indexed_store(tmp_path, "int8", vectors)
    assert _stored_quantization(tmp_path) is not None
    assert "quantization_config" not in json.loads(
        (tmp_path / QUANTIZED.name / "edge_config.json").read_text())["vectors"]["text"]
    by_point = dict(zip(point_ids([f"q{n}" for n in range(len(vectors))]).tolist(), vectors))
    found = total = 0
    for query in _clustered(rng, 30, 32):
        ids, scores = store.search_points(QUANTIZED.name, "fused", query, 50)
        exact_ids, _ = store.search_points(QUANTIZED.name, "fused", query, 50, exact=True)
        # Rescored with the stored floats: each score is the exact dot product.
        assert np.allclose(scores, [by_point[i] @ query for i in ids.tolist()], atol=1e-5)
        # The same graph walked over the stored floats (what a store without the copy does).
        float_ids, float_scores = store.search_points(QUANTIZED.name, "fused", query, 50, use_int8=False)
        assert np.allclose(float_scores, [by_point[i] @ query for i in float_ids.tolist()], atol=1e-5)
        found += len(set(ids.tolist()) & set(exact_ids.tolist()))
        total += len(exact_ids)
    assert found / total >= 0.9
    store.close()

    none = _indexed_store(tmp_path / "none", "none", vectors)
    assert _stored_quantization(tmp_path / "none") is None
    none.close()


def test_an_existing_collection_keeps_how_it_was_built(tmp_path: Path) -> None:
    vectors = _clustered(np.random.default_rng(6), 500, 32)
    _indexed_store(tmp_path, "none", vectors).close()
    reopened = EdgeStore(tmp_path, quantization="int8")
    reopened.ensure_collection(QUANTIZED)
    # The engine would take the new setting and leave the built segments without the copy.
    assert _stored_quantization(tmp_path) is None
    assert reopened.count(QUANTIZED.name) == 500
    reopened.close()


def test_auto_copies_only_a_wide_searched_space_to_int8(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wide = CollectionSpec("wide", {"fused": INT8_AUTO_MIN_DIM, "text": 384}, quantized=frozenset({"fused"}))
    narrow = CollectionSpec("narrow", {"fused": INT8_AUTO_MIN_DIM - 1, "text": 384}, quantized=frozenset({"fused"}))
    assert int8_vectors(wide, "auto") == {"fused"}  # an unsearched vector never gets a copy, however wide
    assert int8_vectors(narrow, "auto") == frozenset()
    assert int8_vectors(narrow, "int8") == {"fused"}
    assert int8_vectors(wide, "none") == frozenset()
    # What the engine is asked to build follows it.
    store = EdgeStore(tmp_path)  # the default is auto
    for spec in (wide, narrow):
        store.ensure_collection(spec)
        store.upsert(spec.name, [Point("a", {name: np.ones(dim, np.float32) for name, dim in spec.vectors.items()}, {})])
    store.close()
    built = {spec.name: json.loads((tmp_path / spec.name / "edge_config.json").read_text())["vectors"]["fused"]
             for spec in (wide, narrow)}
    assert built["wide"].get("quantization_config") is not None
    assert built["narrow"].get("quantization_config") is None
    # Reopened under auto, each is as auto wants it: no note that a rebuild would change it.
    reopened = EdgeStore(tmp_path)
    with caplog.at_level(logging.INFO, logger="stream.store.edge"):
        for spec in (wide, narrow):
            reopened.ensure_collection(spec)
            assert reopened.count(spec.name) == 1
    reopened.close()
    assert not [r for r in caplog.records if "keeps its" in r.getMessage()]


def test_an_unknown_quantization_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown quantization 'int4'"):
        open_store("edge", data_dir=Path("/nonexistent"), quantization="int4")
    with pytest.raises(ConfigError, match="quantized names unknown vectors"):
        CollectionSpec("x", {"a": 2}, quantized=frozenset({"b"}))
