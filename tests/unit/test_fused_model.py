"""Item tower, user tower and ranker: shapes, masking, ONNX parity, serving, learning."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.export.fused import (
    NETWORKS,
    Networks,
    format_int8_report,
    parity,
    quantize_int8,
)
from model.nets.towers import ItemTower, Ranker, TowerConfig, UserTower
from model.serving.artefact import read_manifest
from model.serving.contract import ACTION_CODE, CONTEXT_FEATURES, ItemContent
from model.serving.covisit import build_table
from model.serving.trained import TrainedModel
from model.training.data import InteractionData
from model.training.ranker import RankerSettings
from model.training.retrieval import RetrievalSettings
from model.training.train import table_through, train_artefact
from tests.unit.test_user_batches import assert_length_groups_exact

N_ITEMS = 30


def tiny_config(**overrides: float) -> TowerConfig:
    values = dict(n_items=N_ITEMS, n_attributes=8, max_attributes=2, fused_dim=16, max_sequence=8,
                  n_layers=2, n_heads=2, ranker_hidden=8)
    values.update(overrides)
    return TowerConfig(**values)  # type: ignore[arg-type]


def successor_data(users: int = 300, seed: int = 0) -> InteractionData:
    """Every user walks the catalogue in order: item i is always followed by item i + 1."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(users):
        start, length = int(rng.integers(0, N_ITEMS)), int(rng.integers(5, 12))
        sequences.append(np.asarray([(start + step) % N_ITEMS + 1 for step in range(length)], dtype=np.int64))
    attributes = np.zeros((N_ITEMS + 1, 2), dtype=np.int64)
    for item in range(1, N_ITEMS + 1):
        attributes[item] = [item % 5 + 1, item % 3 + 6]
    return InteractionData(
        name="successor",
        user_ids=[str(user) for user in range(users)],
        sequences=sequences,
        item_ids=[f"sku-{item}" for item in range(1, N_ITEMS + 1)],
        attributes=attributes,
        attribute_names=[f"category-{a}" for a in range(1, 9)],
    )


@pytest.fixture(scope="module")
def artefact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("artefacts") / "successor"
    train_artefact(
        successor_data(),
        "s3rec",
        None,
        out,
        tower_overrides={"fused_dim": 16, "max_sequence": 8, "n_layers": 1, "dropout": 0.1, "ranker_hidden": 8},
        retrieval=RetrievalSettings(epochs=25, minutes=2.0, eval_every=5, learning_rate=0.01, patience=3),
        ranker=RankerSettings(candidates=10, negatives=5, epochs=2),
        progress=False,
    )
    return out


def test_item_tower_gives_finite_vectors_without_modalities_and_for_new_items() -> None:
    tower = ItemTower(tiny_config()).eval()
    count = 6
    index = torch.tensor([1, 2, 3, 0, 0, 0])  # the last three are unknown items
    attributes = torch.tensor([[1, 2], [0, 0], [3, 0], [1, 2], [0, 0], [0, 0]])
    text = torch.zeros(count, 384)
    text[4] = torch.nn.functional.normalize(torch.randn(384), dim=0)
    image = torch.zeros(count, 1280)
    has_text = torch.tensor([0.0, 0, 0, 0, 1, 0])
    has_image = torch.zeros(count)
    with torch.no_grad():
        vectors = tower(index, attributes, text, image, has_text, has_image)
    assert vectors.shape == (count, 16)
    assert torch.isfinite(vectors).all()
    # New items: their content alone decides, so different content, different vectors.
    assert not torch.allclose(vectors[3], vectors[4])
    assert not torch.allclose(vectors[3], vectors[5])


def test_catalogue_vectors_match_the_exported_forward() -> None:
    from model.nets.towers import attribute_mixing

    config = tiny_config()
    tower = ItemTower(config).eval()
    attributes = torch.randint(0, 9, (N_ITEMS + 1, 2))
    with torch.no_grad():
        fast = tower.catalogue_vectors(attribute_mixing(attributes, 8))
        exact = tower(torch.arange(N_ITEMS + 1), attributes, torch.zeros(N_ITEMS + 1, 384),
                      torch.zeros(N_ITEMS + 1, 1280), torch.zeros(N_ITEMS + 1), torch.zeros(N_ITEMS + 1))
    assert torch.allclose(fast, exact, atol=1e-6)


def test_user_tower_is_causal() -> None:
    tower = UserTower(tiny_config(dropout=0.0, attention_dropout=0.0)).eval()
    vectors = torch.randn(2, 6, 16)
    actions = torch.full((2, 6), ACTION_CODE["click"])
    changed = vectors.clone()
    changed[:, 4] = torch.randn(2, 16)
    with torch.no_grad():
        before, after = tower.encode(vectors, actions), tower.encode(changed, actions)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6)
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_left_padding_gives_no_nan_in_eval_and_matches_train_mode_without_dropout() -> None:
    tower = UserTower(tiny_config(dropout=0.0, attention_dropout=0.0))
    actions = torch.full((4, 8), ACTION_CODE["view"])
    actions[0, :5] = 0  # three real items
    actions[1, :7] = 0  # one real item
    actions[2, :] = 0  # a user with no history at all
    vectors = torch.randn(4, 8, 16) * (actions > 0).unsqueeze(-1)
    tower.train()
    with torch.no_grad():
        train_mode = tower(vectors, actions)
    tower.eval()
    with torch.no_grad():
        eval_mode = tower(vectors, actions)
        # The same users with less padding: padding must not change the result.
        shorter = tower(vectors[:2, 4:], actions[:2, 4:])
    assert torch.isfinite(eval_mode).all()
    assert torch.allclose(train_mode, eval_mode, atol=1e-6)
    assert torch.allclose(shorter, eval_mode[:2], atol=1e-5)


def test_ranker_without_correction_orders_by_retrieval_score() -> None:
    ranker = Ranker(tiny_config()).eval()
    ranker.blend.fill_(0.0)
    count = 12
    context = torch.zeros(count, len(CONTEXT_FEATURES))
    context[:, CONTEXT_FEATURES.index("retrieval_score")] = torch.linspace(-2, 3, count)
    with torch.no_grad():
        probability = ranker(torch.randn(count, 16), torch.randn(count, 16), torch.zeros(count, 384),
                             torch.zeros(count, 1280), torch.zeros(count, 384), context)
    assert probability.shape == (count,)
    assert (probability.diff() > 0).all()


def test_onnx_matches_torch_for_all_three_networks(artefact: Path) -> None:
    networks = Networks.load(artefact)
    for name in NETWORKS:
        assert parity(networks, name, artefact / f"{name}.onnx", size=23) <= 1e-4, name
        assert parity(networks, name, artefact / f"{name}.onnx", size=2, length=1) <= 1e-4, name
    recorded = read_manifest(artefact)["metrics"]["onnx_parity_max_abs_diff"]
    assert set(recorded) == set(NETWORKS) and max(recorded.values()) <= 1e-4


def test_trained_user_tower_grouped_by_length_matches_full_length(artefact: Path) -> None:
    # The exported tower's length axis is dynamic: shorter groups run as they are.
    model = TrainedModel(artefact)
    assert_length_groups_exact(model, length=model.max_sequence)


def test_int8_copies_are_close_and_reported(artefact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "int8"
    copy.mkdir()
    for file in artefact.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    report = quantize_int8(Networks.load(copy), copy)
    print(format_int8_report(report))
    for name in NETWORKS:
        assert (copy / f"{name}.int8.onnx").is_file()
    # Probabilities in [0, 1]: int8 may shift them a little, not a lot.
    assert report["ranker"]["max_abs_diff"] < 0.1
    # Tower vectors: within 5% of the largest fp32 coordinate.
    for name in ("item_tower", "user_tower"):
        assert report[name]["max_abs_output"] > 0, name
        assert report[name]["max_abs_diff"] <= 0.05 * report[name]["max_abs_output"], (name, report[name])

    # A worker serves the copies when STREAMREC_ONNX_INT8 is set, the fp32 files otherwise.
    from core.settings import load_settings
    from stream.services import load_serving_model

    models = tmp_path / "models"
    models.mkdir()
    (models / "current").symlink_to(copy, target_is_directory=True)
    for int8, suffix in ((True, ".int8.onnx"), (False, ".onnx")):
        served = load_serving_model(load_settings(model_dir=models, data_dir=tmp_path / "data", onnx_int8=int8))
        assert {path.name for path in served.served_files.values()} == {f"{n}{suffix}" for n in NETWORKS}


def test_context_features_are_the_ones_the_ranker_was_trained_on(artefact: Path) -> None:
    model = TrainedModel(artefact)
    known = model.item_ids[1]
    scores = np.array([0.5, -0.25], np.float32)
    context = model.context_features([known, "never-seen"], scores, now=1.7e9)
    assert context.shape == (2, 3) and context.dtype == np.float32
    columns = dict(zip(CONTEXT_FEATURES, context.T))
    # Training counts, not live trending counts; the unknown item counts as never seen.
    np.testing.assert_allclose(columns["log_popularity"], np.log1p([model.popularity[1], model.popularity[0]]))
    # The synthetic training data has no times: recency was always 0 in training.
    assert model.last_seen is None and not columns["recency_days"].any()
    np.testing.assert_allclose(columns["retrieval_score"], scores)
    # Serving lets the ranker order only the retrieval top-K it was trained on.
    config = json.loads((artefact / "config.json").read_text())
    assert model.rank_pool == config["ranker"]["candidates"] > 0


def test_trained_model_serves_the_contract_shapes(artefact: Path) -> None:
    model = TrainedModel(artefact)
    d = model.fused_dim
    content = ItemContent(
        item_ids=["sku-1", "sku-2", "never-seen"],
        text=np.zeros((3, model.text_dim), np.float32),
        image=np.zeros((3, model.image_dim), np.float32),
        has_text=np.zeros(3, bool),
        has_image=np.zeros(3, bool),
        categories=["", "", "category-2|category-7"],
    )
    items = model.item_vectors(content)
    assert items.shape == (3, d) and items.dtype == np.float32 and np.isfinite(items).all()
    # Longer than max_sequence and shorter: both accepted, newest last.
    for length in (3, model.max_sequence + 4):
        actions = np.full((2, length), ACTION_CODE["click"], dtype=np.int64)
        actions[0, : length - 2] = 0
        sequences = np.random.default_rng(0).normal(size=(2, length, d)).astype(np.float32)
        users = model.user_vectors(sequences, actions)
        assert users.shape == (2, d) and np.isfinite(users).all()
    context = np.zeros((3, len(CONTEXT_FEATURES)), np.float32)
    context[:, -1] = items @ users[0]
    scores = model.score(users[0], None, items, content.text, content.image, context)
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 1)).all()
    query = np.ones(model.text_dim, np.float32) / np.sqrt(model.text_dim)
    assert model.score(users[0], query, items, content.text, content.image, context).shape == (3,)
    assert model.query_vectors(query[None]).shape == (1, d)
    for attribute in ("version", "fused_dim", "text_dim", "image_dim", "max_sequence"):
        assert getattr(model, attribute)


def test_training_learns_that_each_item_is_followed_by_the_next(artefact: Path) -> None:
    manifest = json.loads((artefact / "manifest.json").read_text())
    assert manifest["metrics"]["test_full"]["hr@10"] >= 0.9
    assert manifest["parent"] is None and manifest["version"].startswith("successor-")
    model = TrainedModel(artefact)
    vectors = model.catalogue_vectors()
    start = model.item_index["sku-7"]
    history = np.arange(start, start + 4)  # sku-7 .. sku-10
    user = model.user_vectors(vectors[history][None], np.full((1, 4), ACTION_CODE["purchase"]))[0]
    scores = vectors @ user
    scores[0] = -np.inf
    scores[history] = -np.inf
    assert model.item_ids[int(np.argmax(scores))] == "sku-11"


def test_artefact_is_complete_and_hashes_are_checked(artefact: Path, tmp_path: Path) -> None:
    manifest = read_manifest(artefact)
    assert set(manifest["files"]) >= {"item_tower.onnx", "user_tower.onnx", "ranker.onnx", "weights.pt",
                                      "config.json", "id_maps.json", "item_features.npz"}
    weights = torch.load(artefact / "weights.pt", weights_only=True)
    assert set(weights) == set(NETWORKS)
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in artefact.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "config.json").write_text((artefact / "config.json").read_text() + " ")
    from core.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        TrainedModel(broken)


def test_the_artefact_carries_the_item_transitions_of_its_training_data(artefact: Path) -> None:
    from model.serving.covisit import WEIGHTS

    model = TrainedModel(artefact)
    assert model.transitions is not None
    # Every user walks the catalogue in order: an item's heaviest successor is the next one.
    indices, weights = model.transitions.row(model.item_index["sku-7"])
    assert model.item_ids[int(indices[0])] == "sku-8" and weights[0] == weights.max()
    # The table holds every training interaction, each user's newest step included.
    expected = build_table(successor_data().sequences, N_ITEMS)
    for stored, built in zip(model.transitions.pairs(), expected.pairs()):
        np.testing.assert_array_equal(stored, built)
    config = json.loads((artefact / "config.json").read_text())
    assert config["covisit"]["weight"] == model.covisit_weight and model.covisit_weight in WEIGHTS
    report = json.loads((artefact / "manifest.json").read_text())["metrics"]["covisit"]
    assert {f"holdout_ndcg@10_covisit_{w:g}" for w in WEIGHTS} <= set(report)
    # The table is part of what the manifest's hashes protect.
    assert "transitions.npz" in read_manifest(artefact)["files"]


def test_the_co_visit_choice_sees_the_sequences_too_short_for_the_split() -> None:
    from model.training.data import leave_one_out, unsplit_sequences

    data = successor_data(users=4)
    data = InteractionData(
        name="short", user_ids=["a", "b", "c", "d"],
        sequences=[np.array([1, 2]), np.array([1, 2, 3, 4]), np.array([5]), np.array([2, 3, 4])],
        item_ids=data.item_ids, attributes=data.attributes, attribute_names=data.attribute_names,
        timestamps=[np.array([1.0, 2.0]), np.array([3.0, 9.0, 4.0, 5.0]), np.array([6.0]), np.array([7.0, 7.5, 8.0])],
    )
    short = unsplit_sequences(data, leave_one_out(data))
    assert [sequence.tolist() for sequence in short] == [[1, 2], [5]]
    assert table_through(data) == {"through": 9.0}
    assert table_through(InteractionData(
        name="untimed", user_ids=["a"], sequences=[np.array([1, 2, 3])], item_ids=data.item_ids,
        attributes=data.attributes, attribute_names=data.attribute_names)) == {}


def test_a_fine_tuned_version_adds_the_windows_transitions_once(artefact: Path, tmp_path: Path) -> None:
    from finetune.job import write_candidate

    parent = TrainedModel(artefact)
    first, second = parent.item_index["sku-3"], parent.item_index["sku-17"]  # never adjacent in training
    assert second not in parent.transitions.row(first)[0].tolist()
    window = InteractionData(
        name="window", user_ids=["a", "b"], sequences=[np.array([first, second]), np.array([first, second])],
        item_ids=parent.item_ids[1:], attributes=parent.stored_attributes, attribute_names=[],
        timestamps=[np.array([10.0, 11.0]), np.array([12.0, 13.0])],
    )
    manifest = {"version": "child", "parent": parent.version}
    for name in ("child", "grandchild"):
        (tmp_path / name).mkdir()
    write_candidate(Networks.load(artefact), parent, tmp_path / "child", manifest, window)
    child = TrainedModel(tmp_path / "child")
    indices, weights = child.transitions.row(first)
    assert dict(zip(indices.tolist(), weights.tolist()))[second] == pytest.approx(2.0)
    assert child.config["covisit"]["through"] == 13.0
    assert child.covisit_weight == parent.covisit_weight
    # The same window again (the fine-tuner keeps a rolling log): nothing is counted twice.
    write_candidate(Networks.load(artefact), child, tmp_path / "grandchild", manifest, window)
    grandchild = TrainedModel(tmp_path / "grandchild")
    np.testing.assert_array_equal(grandchild.transitions.weights, child.transitions.weights)


def test_a_trained_model_scores_the_same_split_into_item_parts(artefact: Path) -> None:
    model = TrainedModel(artefact)
    assert model.item_part_dim == 8  # the ranker's hidden width: the export wrote ranker_parts.npz
    rng = np.random.default_rng(3)
    count = 40
    fused = rng.standard_normal((count, model.fused_dim)).astype(np.float32)
    text = rng.standard_normal((count, model.text_dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    text[::4] = 0.0  # items without text or photo read zero rows, as the item cache gives them
    image = np.abs(rng.standard_normal((count, model.image_dim))).astype(np.float32)
    image[::3] = 0.0
    context = np.stack([rng.uniform(0, 8, count), rng.uniform(0, 30, count), rng.normal(0, 2, count)],
                       axis=1).astype(np.float32)
    user = rng.standard_normal(model.fused_dim).astype(np.float32)
    vectors = {"fused": fused, "text": text, "image": image}
    present = {name: np.abs(m).sum(axis=1) > 0 for name, m in vectors.items()}
    parts = model.item_part(vectors, present)
    assert parts.shape == (count, 8)
    query = text[1]
    for query_vector in (None, query):
        full = model.score(user, query_vector, fused, text, image, context)
        split = model.score_split(user, query_vector, fused, parts, text if query_vector is not None else None,
                                  context)
        np.testing.assert_allclose(split, full, atol=2e-6)
    # One item part per row: computing them one at a time (as the cache does) changes nothing.
    one = model.item_part({name: m[5:6] for name, m in vectors.items()}, {n: p[5:6] for n, p in present.items()})
    np.testing.assert_allclose(one[0], parts[5], atol=1e-6)
