"""The scorers split into a per-item part and the rest give the full scorers' scores."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ModelLoadError
from model.export.fused import Networks, export_network, export_ranker_parts, session
from model.export.rule_scorer import build_rule_scorer
from model.nets.towers import TowerConfig
from model.serving.ranker_parts import FILE_NAME, RankerParts, erf
from model.serving.rule_model import RuleModel


@pytest.fixture(scope="module")
def ranker_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Networks, Path]:
    torch.manual_seed(0)
    config = TowerConfig(n_items=20, n_attributes=4, max_attributes=2, fused_dim=16, ranker_hidden=8)
    networks = Networks.build(config)
    with torch.no_grad():
        networks.ranker.blend.fill_(0.7)  # the correction counts: a split that drops a block shows
        networks.ranker.context_mean.copy_(torch.tensor([1.0, 5.0, 0.1]))
        networks.ranker.context_scale.copy_(torch.tensor([2.0, 10.0, 0.5]))
    directory = tmp_path_factory.mktemp("ranker")
    export_network(networks, "ranker", directory / "ranker.onnx")
    return networks, directory


def candidates(rng: np.random.Generator, count: int, config: TowerConfig) -> dict[str, np.ndarray]:
    text = rng.standard_normal((count, config.text_dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    image = np.abs(rng.standard_normal((count, config.image_dim))).astype(np.float32)
    image[::2] = 0.0
    context = np.stack([rng.uniform(0, 8, count), rng.uniform(0, 30, count), rng.normal(0, 2, count)], axis=1)
    return {"fused": rng.standard_normal((count, config.fused_dim)).astype(np.float32), "text": text,
            "image": image, "context": context.astype(np.float32)}


def test_the_split_ranker_matches_the_onnx_ranker(ranker_dir: tuple[Networks, Path]) -> None:
    networks, directory = ranker_dir
    assert export_ranker_parts(networks, directory) <= 1e-5
    parts = RankerParts.load(directory / FILE_NAME)
    onnx_ranker = session(directory / "ranker.onnx")
    config = networks.config
    rng = np.random.default_rng(1)
    for count in (1, 57):
        c = candidates(rng, count, config)
        user = rng.standard_normal(config.fused_dim).astype(np.float32)
        query = c["text"][0]
        item_part = parts.item_part(c["fused"], c["text"], c["image"])
        for query_vector in (None, query):
            q = np.zeros(config.text_dim, np.float32) if query_vector is None else query_vector
            feeds = {"user_vector": np.repeat(user[None], count, 0), "candidate_fused": c["fused"],
                     "candidate_text": c["text"], "candidate_image": c["image"],
                     "query_vector": np.repeat(q[None], count, 0), "context": c["context"]}
            expected = onnx_ranker.run(None, feeds)[0]
            split = parts.score(user, query_vector, c["fused"], item_part,
                                c["text"] if query_vector is not None else None, c["context"])
            assert split.shape == (count,) and split.dtype == np.float32
            np.testing.assert_allclose(split, expected, atol=2e-6)


def test_the_export_refuses_parts_that_differ_from_the_onnx_ranker(ranker_dir: tuple[Networks, Path],
                                                                   tmp_path: Path) -> None:
    networks, directory = ranker_dir
    (tmp_path / "ranker.onnx").write_bytes((directory / "ranker.onnx").read_bytes())
    other = Networks.build(networks.config)  # different weights than the ONNX file holds
    with pytest.raises(ModelLoadError, match=FILE_NAME):
        export_ranker_parts(other, tmp_path)


def test_erf_is_close_to_the_exact_function() -> None:
    x = np.linspace(-6, 6, 2001)
    exact = torch.erf(torch.from_numpy(x)).numpy()
    assert np.abs(erf(x) - exact).max() < 2e-7


def test_the_rule_scorer_split_matches_its_onnx_scorer(tmp_path: Path) -> None:
    build_rule_scorer(tmp_path)
    model = RuleModel(tmp_path)
    config = TowerConfig(n_items=1, n_attributes=1, max_attributes=1, fused_dim=384)
    rng = np.random.default_rng(2)
    c = candidates(rng, 33, config)
    c["fused"] /= np.linalg.norm(c["fused"], axis=1, keepdims=True)
    vectors = {name: c[name] for name in ("fused", "text", "image")}
    present = {name: np.abs(m).sum(axis=1) > 0 for name, m in vectors.items()}
    item_part = model.item_part(vectors, present)
    assert item_part.shape == (33, 1) and item_part[::2].sum() == 0 and item_part[1::2].all()
    user = c["fused"][3]
    for query in (None, c["text"][4]):
        full = model.score(user, query, c["fused"], c["text"], c["image"], c["context"])
        split = model.score_split(user, query, c["fused"], item_part, c["text"] if query is not None else None,
                                  c["context"])
        np.testing.assert_allclose(split, full, atol=1e-6)


def test_a_ranker_whose_correction_was_left_out_scores_as_its_onnx_file(tmp_path: Path) -> None:
    torch.manual_seed(2)
    config = TowerConfig(n_items=20, n_attributes=4, max_attributes=2, fused_dim=16, ranker_hidden=8)
    networks = Networks.build(config)
    with torch.no_grad():
        networks.ranker.blend.fill_(0.0)  # what training chooses when the correction does not help
        networks.ranker.score_weight.fill_(1.7)
    export_network(networks, "ranker", tmp_path / "ranker.onnx")
    assert export_ranker_parts(networks, tmp_path) <= 1e-5
    parts = RankerParts.load(tmp_path / FILE_NAME)
    rng = np.random.default_rng(3)
    c = candidates(rng, 31, config)
    user = rng.standard_normal(config.fused_dim).astype(np.float32)
    feeds = {"user_vector": np.repeat(user[None], 31, 0), "candidate_fused": c["fused"],
             "candidate_text": c["text"], "candidate_image": c["image"],
             "query_vector": np.repeat(c["text"][:1], 31, 0), "context": c["context"]}
    expected = session(tmp_path / "ranker.onnx").run(None, feeds)[0]
    split = parts.score(user, c["text"][0], c["fused"], parts.item_part(c["fused"], c["text"], c["image"]),
                        c["text"], c["context"])
    np.testing.assert_allclose(split, expected, atol=2e-6)


def test_the_rankers_correction_is_kept_only_when_it_earns_its_place() -> None:
    from model.training.ranker import choose_blend

    # Toys with the 128-d towers: the correction's best blend gained 0.1% on held-out users.
    toys = {0.0: 0.071868, 0.25: 0.071845, 0.5: 0.071934, 1.0: 0.071966}
    assert choose_blend(toys, min_gain=0.0) == 1.0
    assert choose_blend(toys, min_gain=0.01) == 0.0
    assert choose_blend({0.0: 0.050, 0.25: 0.052, 0.5: 0.055, 1.0: 0.055}, min_gain=0.01) == 0.5  # ties: smaller
    assert choose_blend({0.0: 0.050, 0.25: 0.049, 0.5: 0.048, 1.0: 0.047}, min_gain=0.0) == 0.0


def test_the_sigmoid_is_exact_and_quiet_far_from_zero() -> None:
    """Scores of strongly negative logits stay ordered, without an overflow warning."""
    import warnings

    from model.serving.contract import sigmoid

    logits = np.array([-200, -95, -87, -20, -1, 0, 1, 20, 200], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = sigmoid(logits)
    reference = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-30)
    assert scores.dtype == np.float32 and np.all(np.diff(scores) >= 0) and scores[1] < scores[2]
