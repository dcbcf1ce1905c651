"""The content rule model: item and user vectors, and its exported ONNX scorer.

Shapes follow ``model.serving.contract.ServingModel``: items (N, fused_dim), users
(B, fused_dim) from (B, L, fused_dim) sequences, scores (N,).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.export.rule_scorer import build_rule_scorer
from model.serving.contract import ACTION_CODE, CONTEXT_FEATURES, ItemContent
from model.serving.rule_model import RULE_VERSION, RuleModel

TEXT_DIM, IMAGE_DIM = 384, 1280
VIEW, CLICK, PURCHASE = ACTION_CODE["view"], ACTION_CODE["click"], ACTION_CODE["purchase"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> RuleModel:
    folder = tmp_path_factory.mktemp("rule")
    path = build_rule_scorer(folder)
    assert path == folder / "ranker.onnx" and path.exists()
    return RuleModel(folder)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def content(
    item_ids: list[str],
    *,
    has_text: list[bool],
    has_image: list[bool],
    seed: int = 0,
) -> ItemContent:
    rng = np.random.default_rng(seed)
    n = len(item_ids)
    text = unit(rng.standard_normal((n, TEXT_DIM)))
    image = unit(rng.standard_normal((n, IMAGE_DIM)))
    text[~np.array(has_text)] = 0.0
    image[~np.array(has_image)] = 0.0
    return ItemContent(
        item_ids=item_ids, text=text, image=image,
        has_text=np.array(has_text), has_image=np.array(has_image), categories=[""] * n,
    )


def sequence(vectors: list[np.ndarray], actions: list[int], length: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """One user, oldest first, left-padded to ``length``: (1, L, d) and (1, L)."""
    sequences = np.zeros((1, length, TEXT_DIM), np.float32)
    codes = np.zeros((1, length), np.int64)
    offset = length - len(vectors)
    for pos, (vector, action) in enumerate(zip(vectors, actions)):
        sequences[0, offset + pos] = vector
        codes[0, offset + pos] = action
    return sequences, codes


def basis(index: int) -> np.ndarray:
    vector = np.zeros(TEXT_DIM, np.float32)
    vector[index] = 1.0
    return vector


def test_dimensions_come_from_the_artefact(model: RuleModel) -> None:
    assert (model.text_dim, model.image_dim, model.fused_dim) == (TEXT_DIM, IMAGE_DIM, TEXT_DIM)
    assert model.version == RULE_VERSION


def test_small_dimensions_travel_with_the_weights(tmp_path: Path) -> None:
    build_rule_scorer(tmp_path, text_dim=8, image_dim=16)
    small = RuleModel(tmp_path)
    assert (small.text_dim, small.image_dim, small.fused_dim) == (8, 16, 8)
    scores = small.score(unit(np.ones(8)), None, unit(np.ones((3, 8))), np.zeros((3, 8)),
                         np.zeros((3, 16)), np.zeros((3, 3)))
    assert scores.shape == (3,)


def test_item_vectors_are_unit_norm(model: RuleModel) -> None:
    items = content(
        ["text-only", "image-only", "both", "both-2"],
        has_text=[True, False, True, True],
        has_image=[False, True, True, True],
    )
    vectors = model.item_vectors(items)
    assert vectors.shape == (4, TEXT_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_text_only_item_vector_is_its_text(model: RuleModel) -> None:
    items = content(["a"], has_text=[True], has_image=[False])
    np.testing.assert_allclose(model.item_vectors(items)[0], items.text[0], atol=1e-6)


def test_a_photo_moves_the_item_vector(model: RuleModel) -> None:
    with_photo = content(["a"], has_text=[True], has_image=[True])
    without = ItemContent(["a"], with_photo.text, np.zeros_like(with_photo.image),
                          np.array([True]), np.array([False]), [""])
    a, b = model.item_vectors(with_photo)[0], model.item_vectors(without)[0]
    assert 0.5 < float(a @ b) < 0.999


def test_items_without_content_get_finite_deterministic_unit_vectors(model: RuleModel) -> None:
    items = content(["sku:1", "other", "sku:1"], has_text=[False] * 3, has_image=[False] * 3)
    vectors = model.item_vectors(items)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_array_equal(vectors, model.item_vectors(items))
    assert float(vectors[0] @ vectors[1]) < 0.5


def test_items_without_content_get_distinct_vectors_per_id(model: RuleModel) -> None:
    items = content(["product-0001", "product-0002"], has_text=[False] * 2, has_image=[False] * 2)
    vectors = model.item_vectors(items)
    assert float(vectors[0] @ vectors[1]) < 0.5


def test_item_vectors_are_deterministic(model: RuleModel, tmp_path: Path) -> None:
    items = content(["a", "b"], has_text=[True, False], has_image=[True, True], seed=3)
    build_rule_scorer(tmp_path)
    np.testing.assert_array_equal(model.item_vectors(items), RuleModel(tmp_path).item_vectors(items))


def test_query_vectors_are_normalised_text(model: RuleModel) -> None:
    text = np.random.default_rng(1).standard_normal((3, TEXT_DIM)).astype(np.float32) * 5
    queries = model.query_vectors(text)
    assert queries.shape == (3, TEXT_DIM)
    np.testing.assert_allclose(queries, unit(text), atol=1e-6)


def test_user_vector_shape_and_norm(model: RuleModel) -> None:
    rng = np.random.default_rng(2)
    sequences = unit(rng.standard_normal((4, 10, TEXT_DIM)))
    actions = rng.integers(1, len(ACTION_CODE), size=(4, 10))
    users = model.user_vectors(sequences, actions)
    assert users.shape == (4, TEXT_DIM) and users.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(users, axis=1), 1.0, atol=1e-5)


def test_a_later_purchase_outweighs_an_earlier_view(model: RuleModel) -> None:
    a, b = basis(0), basis(1)
    user = model.user_vectors(*sequence([b, a], [VIEW, PURCHASE]))[0]
    assert user @ a > user @ b


def test_stronger_actions_weigh_more_at_the_same_age(model: RuleModel) -> None:
    a, b = basis(0), basis(1)
    # b is the more recent, but a view says less than the older purchase of a.
    user = model.user_vectors(*sequence([a, b], [PURCHASE, VIEW]))[0]
    assert user @ a > user @ b


def test_more_recent_interactions_weigh_more(model: RuleModel) -> None:
    a, b = basis(0), basis(1)
    user = model.user_vectors(*sequence([a, b], [CLICK, CLICK]))[0]
    assert user @ b > user @ a
    reverse = model.user_vectors(*sequence([b, a], [CLICK, CLICK]))[0]
    assert reverse @ a > reverse @ b


def test_padding_is_ignored(model: RuleModel) -> None:
    a, b = basis(0), basis(1)
    clean = model.user_vectors(*sequence([a, b], [VIEW, CLICK], length=4))[0]
    longer = model.user_vectors(*sequence([a, b], [VIEW, CLICK], length=20))[0]
    np.testing.assert_allclose(clean, longer, atol=1e-6)
    # Whatever sits at a padded position (action 0) does not count.
    sequences, actions = sequence([a, b], [VIEW, CLICK], length=4)
    sequences[0, :2] = basis(7) * 3.0
    np.testing.assert_allclose(model.user_vectors(sequences, actions)[0], clean, atol=1e-6)


def test_users_in_one_batch_do_not_mix(model: RuleModel) -> None:
    first = sequence([basis(0)], [CLICK])
    second = sequence([basis(1), basis(2)], [VIEW, PURCHASE])
    batch = model.user_vectors(np.concatenate([first[0], second[0]]), np.concatenate([first[1], second[1]]))
    np.testing.assert_allclose(batch[0], model.user_vectors(*first)[0], atol=1e-6)
    np.testing.assert_allclose(batch[1], model.user_vectors(*second)[0], atol=1e-6)


def test_a_user_with_only_padding_gets_a_finite_vector(model: RuleModel) -> None:
    users = model.user_vectors(np.zeros((1, 5, TEXT_DIM), np.float32), np.zeros((1, 5), np.int64))
    assert np.isfinite(users).all()


def candidates(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fused = unit(rng.standard_normal((n, TEXT_DIM)))
    text = unit(rng.standard_normal((n, TEXT_DIM)))
    image = unit(rng.standard_normal((n, IMAGE_DIM)))
    context = np.zeros((n, len(CONTEXT_FEATURES)), np.float32)
    return fused, text, image, context


@pytest.mark.parametrize("n", [1, 7, 500])
def test_scores_are_probabilities_one_per_candidate(model: RuleModel, n: int) -> None:
    fused, text, image, context = candidates(n)
    context[:, 0] = np.log1p(np.arange(n))
    context[:, 1] = np.linspace(0, 365, n)
    context[:, 2] = np.linspace(-1, 1, n)
    user = unit(np.random.default_rng(9).standard_normal(TEXT_DIM))
    query = unit(np.random.default_rng(10).standard_normal(TEXT_DIM))
    for query_vector in (None, query):
        scores = model.score(user, query_vector, fused, text, image, context)
        assert scores.shape == (n,)
        assert np.isfinite(scores).all()
        assert ((scores > 0.0) & (scores < 1.0)).all()


def test_scores_rise_with_affinity(model: RuleModel) -> None:
    user = basis(0)
    similarity = np.linspace(-1.0, 1.0, 21)
    # Unit candidates at a growing cosine to the user; everything else equal.
    fused = np.zeros((21, TEXT_DIM), np.float32)
    fused[:, 0] = similarity
    fused[:, 1] = np.sqrt(1.0 - similarity**2)
    _, text, image, context = candidates(21)
    text[:] = text[0]
    image[:] = image[0]
    scores = model.score(user, None, fused, text, image, context)
    assert np.all(np.diff(scores) > 0)


def test_scores_rise_with_query_match(model: RuleModel) -> None:
    fused, _, image, context = candidates(11)
    fused[:] = fused[0]
    image[:] = image[0]
    query = basis(3)
    text = np.zeros((11, TEXT_DIM), np.float32)
    text[:, 3] = np.linspace(0.0, 1.0, 11)
    text[:, 4] = np.sqrt(1.0 - text[:, 3] ** 2)
    scores = model.score(basis(0), query, fused, text, image, context)
    assert np.all(np.diff(scores) > 0)


def test_popularity_breaks_ties(model: RuleModel) -> None:
    fused, text, image, context = candidates(1)
    fused, text, image = (np.repeat(x, 2, axis=0) for x in (fused, text, image))
    context = np.zeros((2, len(CONTEXT_FEATURES)), np.float32)
    context[1, 0] = np.log1p(50.0)
    scores = model.score(basis(0), None, fused, text, image, context)
    assert scores[1] > scores[0]
