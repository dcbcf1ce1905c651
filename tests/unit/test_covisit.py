"""Item-to-item transitions: the trained table, the stream's increments, the fusion."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.serving.covisit import (
    BACKWARD_SHARE,
    RRF_OFFSET,
    CoVisitTable,
    build_table,
    fused_rank,
    fused_relevance,
    history_scores,
    ranked,
)
from model.training.covisit_weight import choose_weight
from stream.covisit import StreamTransitions


def row(table: CoVisitTable, item: int) -> dict[int, float]:
    indices, weights = table.row(item)
    return dict(zip(indices.tolist(), weights.tolist()))


def test_transitions_weigh_distance_and_direction() -> None:
    table = build_table([np.array([1, 2, 3]), np.array([1, 2])], n_items=4, window=2)
    # 1 -> 2 twice at distance 1, 1 -> 3 once at distance 2; backwards at half weight.
    assert row(table, 1) == pytest.approx({2: 2.0, 3: 0.5})
    assert row(table, 2) == pytest.approx({3: 1.0, 1: 2 * BACKWARD_SHARE})
    assert row(table, 3) == pytest.approx({2: BACKWARD_SHARE, 1: 0.5 * BACKWARD_SHARE})
    assert row(table, 4) == {} and row(table, 0) == {} and row(table, 99) == {}
    # Heaviest first within a row.
    assert table.row(1)[0].tolist() == [2, 3]


def test_rows_keep_their_heaviest_neighbours_and_padding_never_counts() -> None:
    sequences = [np.array([1, target]) for target in (2, 3, 3, 4, 4, 4)] + [np.array([0, 1, 1, 0])]
    table = build_table(sequences, n_items=4, window=1, neighbours=2)
    assert list(row(table, 1)) == [4, 3]


def test_a_table_extended_with_new_interactions_counts_old_ones_once() -> None:
    base = build_table([np.array([1, 2])], n_items=3, window=1)
    sequence = np.array([1, 2, 3])
    # Position 1 (item 2) is already in the base; only 2 -> 3 is new.
    extended = build_table([sequence], n_items=3, window=1, base=base, fresh=[np.array([False, False, True])])
    assert row(extended, 1) == pytest.approx({2: 1.0})
    assert row(extended, 2) == pytest.approx({3: 1.0, 1: BACKWARD_SHARE})


def test_table_files_round_trip_and_broken_ones_are_refused(tmp_path: Path) -> None:
    table = build_table([np.array([1, 2, 3, 1])], n_items=3)
    table.save(tmp_path / "t.npz")
    loaded = CoVisitTable.load(tmp_path / "t.npz")
    for item in range(4):
        assert row(loaded, item) == pytest.approx(row(table, item))
    np.savez(tmp_path / "bad.npz", indptr=np.array([0, 5]), indices=np.array([1]), weights=np.array([1.0]))
    with pytest.raises(ValueError, match="inconsistent"):
        CoVisitTable.load(tmp_path / "bad.npz")


def test_the_latest_item_counts_most_in_a_users_scores() -> None:
    table = build_table([np.array([1, 5]), np.array([2, 6])], n_items=6, window=1)
    scores = history_scores(table, [1, 2], window=2)
    assert scores[6] == pytest.approx(1.0) and scores[5] == pytest.approx(0.5)
    assert ranked(scores, exclude={1, 2}) == [6, 5]


def test_reciprocal_rank_fusion() -> None:
    relevance = fused_relevance(["a", "b"], ["c", "a"], weight=1.0)
    assert relevance["a"] == pytest.approx(1 / RRF_OFFSET + 1 / (RRF_OFFSET + 1))
    assert relevance["c"] == pytest.approx(1 / RRF_OFFSET)
    assert fused_relevance(["a", "b"], ["c"], weight=0.0) == pytest.approx({"a": 1 / 60, "b": 1 / 61})
    assert fused_rank(["a", "b"], ["c", "a"], 1.0, "a") == 0
    assert fused_rank(["a", "b"], ["c", "a"], 1.0, "z") == 3  # neither list holds it


def test_the_fusion_weight_is_chosen_on_what_predicts_the_held_out_targets() -> None:
    # Users who bought item 1 buy item 2 next; the model ranks item 2 far down.
    table = build_table([np.array([1, 2])] * 5, n_items=30, window=1)
    model_orders = [list(range(3, 30)) + [2]] * 4
    histories = [[1]] * 4
    weight, report = choose_weight(model_orders, histories, [2] * 4, table)
    assert weight > 0.0 and report["holdout_ndcg@10_covisit_0"] == 0.0
    # Targets the model ranks first and co-visits do not: no fusion.
    weight, _ = choose_weight([[3] + list(range(4, 30)) + [2]] * 4, histories, [3] * 4, table)
    assert weight == 0.0


def test_the_stream_learns_transitions_and_adds_the_models() -> None:
    learnt = StreamTransitions(max_items=1024, window=2)
    learnt.learn([], "a")  # a first click teaches nothing
    learnt.learn(["a"], "b")
    learnt.learn(["a", "b"], "c")
    assert learnt.row("a") == pytest.approx({"b": 1.0, "c": 0.5})
    assert learnt.row("c") == pytest.approx({"b": BACKWARD_SHARE, "a": 0.5 * BACKWARD_SHARE})
    learnt.learn(["c"], "c")  # a repeat is not a transition
    assert "c" not in learnt.row("c")
    # The model's table speaks item indices; scores are by id and add up.
    table = build_table([np.array([1, 2])], n_items=2, window=1)
    scores = learnt.scores(["a"], table, {"a": 1, "x": 2}, ["", "a", "x"])
    assert scores == pytest.approx({"b": 1.0, "c": 0.5, "x": 1.0})
    assert learnt.scores(["unknown"]) == {}
    learnt.clear()
    assert len(learnt) == 0 and learnt.row("a") == {}


def test_stream_transitions_stay_bounded() -> None:
    learnt = StreamTransitions(max_items=1024, window=1, neighbours=3)
    for n in range(10):
        learnt.learn(["hub"], f"item-{n}")
    learnt.learn(["hub"], "item-0")
    assert len(learnt.row("hub")) <= 6 and "item-0" in learnt.row("hub")
    for n in range(2000):
        learnt.learn([f"u{n}"], f"v{n}")
    assert len(learnt) <= 1024 and learnt.evictions > 0
    # The most recently updated rows are kept.
    assert learnt.row("u1999") == {"v1999": 1.0}
    with pytest.raises(ValueError):
        StreamTransitions(max_items=0)
