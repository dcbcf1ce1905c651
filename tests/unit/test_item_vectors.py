"""The one builder of item vectors: which named vectors a point carries, and where it is written.

Run with the real rule model (small dimensions), the embedded store and the item cache.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from model.export.rule_scorer import build_rule_scorer
from model.serving.contract import ItemContent
from model.serving.rule_model import RuleModel
from stream.item_cache import ItemCache
from stream.item_vectors import item_points, stored_vectors, write_items
from stream.store import Hit, VectorStore, open_store
from stream.versions import Collections, ServingState, collection_specs

TEXT_DIM, IMAGE_DIM = 8, 6


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> RuleModel:
    folder = tmp_path_factory.mktemp("rule")
    build_rule_scorer(folder, text_dim=TEXT_DIM, image_dim=IMAGE_DIM)
    return RuleModel(folder)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[VectorStore]:
    opened = open_store("edge", data_dir=tmp_path / "vectors")
    yield opened
    opened.close()


def state(store: VectorStore, model: RuleModel, suffix: str) -> ServingState:
    collections = Collections(f"items_{suffix}", f"users_{suffix}", f"queries_{suffix}")
    for spec in collection_specs(collections, model):
        store.ensure_collection(spec)
    cache = ItemCache({"text": model.text_dim, "image": model.image_dim, "fused": model.fused_dim})
    return ServingState(model, collections, cache)


def four_items() -> ItemContent:
    """Text and photo, text only, photo only, neither."""
    rng = np.random.default_rng(0)
    has_text = np.array([True, True, False, False])
    has_image = np.array([True, False, True, False])
    text = rng.standard_normal((4, TEXT_DIM)).astype(np.float32) * has_text[:, None]
    image = rng.standard_normal((4, IMAGE_DIM)).astype(np.float32) * has_image[:, None]
    return ItemContent(["both", "text", "photo", "none"], text, image, has_text, has_image, ["a", "b", "", ""])


def test_a_point_carries_fused_always_and_only_the_content_vectors_it_has(model: RuleModel) -> None:
    content = four_items()
    payloads = [{"title": item_id} for item_id in content.item_ids]
    points = item_points(model, content, payloads)

    assert [p.id for p in points] == content.item_ids
    assert [sorted(p.vectors) for p in points] == [
        ["fused", "image", "text"], ["fused", "text"], ["fused", "image"], ["fused"],
    ]
    assert [p.payload for p in points] == payloads
    fused = model.item_vectors(content)  # (4, fused_dim)
    for row, point in enumerate(points):
        np.testing.assert_array_equal(point.vectors["fused"], fused[row])
        if "text" in point.vectors:
            np.testing.assert_array_equal(point.vectors["text"], content.text[row])
        if "image" in point.vectors:
            np.testing.assert_array_equal(point.vectors["image"], content.image[row])


def test_payloads_must_match_the_items_one_for_one(model: RuleModel) -> None:
    with pytest.raises(ValueError):
        item_points(model, four_items(), [{}, {}, {}])


def test_stored_vectors_are_zero_and_absent_where_a_hit_lacks_the_vector() -> None:
    hits = [
        Hit("a", 0.0, {}, {"image": np.arange(IMAGE_DIM, dtype=np.float64)}),
        Hit("b", 0.0, {}, {"text": np.ones(TEXT_DIM, np.float32)}),
        None,  # not stored
    ]
    vectors, present = stored_vectors(hits, "image", IMAGE_DIM)

    assert vectors.dtype == np.float32 and vectors.shape == (3, IMAGE_DIM)
    assert present.tolist() == [True, False, False]
    np.testing.assert_array_equal(vectors[0], np.arange(IMAGE_DIM))
    assert not vectors[1:].any()


def test_points_reach_the_given_states_collection_and_cache_only(model: RuleModel, store: VectorStore) -> None:
    serving, building = state(store, model, "old"), state(store, model, "new")
    content = four_items()
    write_items(store, building, item_points(model, content, [{"title": i} for i in content.item_ids]))

    assert store.count(serving.collections.items) == 0
    assert not serving.item_cache.gather(content.item_ids, lambda missing: {}).item_ids
    stored = store.retrieve(building.collections.items, content.item_ids, with_vectors=True)
    assert {i: sorted(hit.vectors) for i, hit in stored.items()} == {
        "both": ["fused", "image", "text"], "text": ["fused", "text"], "photo": ["fused", "image"], "none": ["fused"],
    }
    assert stored["text"].payload["title"] == "text"
    cached = building.item_cache.gather(content.item_ids, lambda missing: pytest.fail(f"fetched {missing}"))
    assert cached.item_ids == content.item_ids
    assert cached.present["text"].tolist() == content.has_text.tolist()
    assert cached.present["image"].tolist() == content.has_image.tolist()
    assert [p["title"] for p in cached.payloads] == content.item_ids
