"""Users grouped by sequence length give the vectors of one full-length call.

``assert_length_groups_exact`` is the contract check; it runs here against the
rule model and in ``test_fused_model`` against a trained artefact's ONNX tower.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.export.rule_scorer import build_rule_scorer
from model.serving.contract import ACTION_CODE, ServingModel
from model.serving.rule_model import RuleModel
from model.serving.user_batches import user_vectors_by_length


def mixed_length_users(dim: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E, d) table, (B, L) left-padded rows and actions of users of every length.

    Lengths run from 0 (no history) to ``length`` in a shuffled order, and some
    sequences have a hole (an item not in the catalogue: row 0, action 0).
    """
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((41, dim)).astype(np.float32)  # (E, d)
    table[0] = 0.0
    lengths = rng.permutation(np.concatenate([np.arange(length + 1), rng.integers(0, length + 1, 23)]))
    rows = np.zeros((len(lengths), length), np.int64)  # (B, L)
    actions = np.zeros((len(lengths), length), np.int64)
    codes = np.array([c for c in ACTION_CODE.values() if c > 0])
    for user, used in enumerate(lengths):
        if used:
            rows[user, -used:] = rng.integers(1, len(table), used)
            actions[user, -used:] = rng.choice(codes, used)
        if used > 2 and user % 3 == 0:
            hole = length - int(rng.integers(2, used))  # neither the oldest nor the newest
            rows[user, hole] = actions[user, hole] = 0
    return table, rows, actions


def assert_length_groups_exact(model: ServingModel, length: int) -> None:
    table, rows, actions = mixed_length_users(model.fused_dim, length)
    full = model.user_vectors(table[rows], actions)  # (B, d), every user at length L
    for users_per_call in (1, 5, len(rows)):
        grouped = user_vectors_by_length(model, table, rows, actions, users_per_call)
        assert grouped.shape == full.shape and grouped.dtype == np.float32
        np.testing.assert_allclose(grouped, full, atol=1e-5, rtol=0, err_msg=f"{users_per_call} per call")
    assert user_vectors_by_length(model, table, rows[:0], actions[:0], 5).shape == (0, model.fused_dim)


@pytest.fixture(scope="module")
def rule_model(tmp_path_factory: pytest.TempPathFactory) -> RuleModel:
    folder: Path = tmp_path_factory.mktemp("rule")
    build_rule_scorer(folder)
    return RuleModel(folder)


def test_rule_model_users_grouped_by_length_match_full_length(rule_model: RuleModel) -> None:
    assert_length_groups_exact(rule_model, length=rule_model.max_sequence)


def test_each_call_runs_at_its_longest_sequence(rule_model: RuleModel) -> None:
    table, rows, actions = mixed_length_users(rule_model.fused_dim, 12)
    widths: list[int] = []

    class Recording:
        fused_dim = rule_model.fused_dim

        def user_vectors(self, sequences: np.ndarray, codes: np.ndarray) -> np.ndarray:
            widths.append(codes.shape[1])
            used = np.where((codes > 0).any(axis=1), codes.shape[1] - (codes > 0).argmax(axis=1), 0)
            assert used.max() == codes.shape[1] or codes.shape[1] == 1  # trimmed to the group's longest
            return rule_model.user_vectors(sequences, codes)

    user_vectors_by_length(Recording(), table, rows, actions, 8)  # type: ignore[arg-type]
    assert widths == sorted(widths) and widths[0] < widths[-1] == 12
