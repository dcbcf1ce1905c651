"""How the crash bench decides two stored points, and two runs' signals, are the same."""
from __future__ import annotations

import numpy as np

from bench.common import (
    covisit_differences,
    mismatched,
    same_vector,
    trending_differences,
)
from model.serving.covisit import NEIGHBOURS
from stream.covisit import StreamTransitions
from stream.store import Hit
from stream.trending import Trending


def test_a_half_precision_vector_may_differ_by_one_float16_step_and_no_more() -> None:
    stored = np.array([0.07, -0.3, 0.0009], np.float32)
    step = np.spacing(np.abs(stored).astype(np.float16)).astype(np.float32)
    one_step = stored + step * np.array([1, -1, 1], np.float32)
    assert step[0] == np.float32(2.0 ** -14)  # 6.1e-5: the difference the bench once flagged
    assert same_vector(stored, one_step, atol=1e-5, half=True)
    assert not same_vector(stored, stored + 2.5 * step, atol=1e-5, half=True)
    # Stored as float32, the same difference is a real one.
    assert not same_vector(stored, one_step, atol=1e-5, half=False)
    assert same_vector(stored, stored + 5e-6, atol=1e-5, half=False)
    assert not same_vector(stored, stored[:2], atol=1e-5, half=True)


def test_mismatched_compares_each_named_vector_at_its_stored_precision() -> None:
    text = np.full(4, 0.07, np.float32)
    fused = np.full(4, 0.5, np.float32)
    step = float(np.spacing(np.float16(0.07)))
    reference = {"m1": Hit("m1", 0.0, {"title": "a"}, {"text": text, "fused": fused}),
                 "m2": Hit("m2", 0.0, {"title": "b"}, {"text": text, "fused": fused})}
    other = {"m1": Hit("m1", 0.0, {"title": "a"}, {"text": text + step, "fused": fused}),
             "m2": Hit("m2", 0.0, {"title": "b"}, {"text": text, "fused": fused + step})}
    assert mismatched(reference, other, half=frozenset({"text"})) == ["m2"]
    assert mismatched(reference, other) == ["m1", "m2"]
    assert mismatched(reference, {"m1": other["m1"]}, half=frozenset({"text"})) == ["m2"]


def _transitions(clicks: list[tuple[list[str], str]]) -> StreamTransitions:
    covisit = StreamTransitions(1024)
    for previous, item in clicks:
        covisit.learn(previous, item)
    return covisit


def test_trending_is_compared_by_undecayed_weight_whatever_the_wall_time() -> None:
    reference, later, doubled = Trending(3600.0), Trending(3600.0), Trending(3600.0)
    for item, weight in [("a", 1.0), ("b", 3.0), ("a", 0.25)]:
        reference.add(item, weight, 1_700_000_000.0)
        later.add(item, weight, 1_700_090_000.0)  # a day later: other scores, same weights
        doubled.add(item, weight, 1_700_000_000.0)
    doubled.add("b", 3.0, 1_700_000_000.0)
    assert trending_differences(reference, later) == []
    assert trending_differences(reference, doubled) == ["b"]


def test_co_visit_rows_are_compared_where_the_order_of_partitions_cannot_change_them() -> None:
    # Row "hub" gets more successors than it keeps: pruned, its entries depend on
    # the order (s150 seen twice before the pruning is kept; once before and once
    # after is pruned away and comes back alone).
    crowd = [(["hub"], f"s{n:03d}") for n in range(2 * NEIGHBOURS + 1)]
    one_order = _transitions([(["x"], "y"), *crowd, (["hub"], "s150")])
    other_order = _transitions([(["hub"], "s150"), *crowd, (["x"], "y")])
    assert one_order.row("hub") != other_order.row("hub")
    assert covisit_differences(one_order, other_order, every_row=False) == []
    assert covisit_differences(one_order, other_order, every_row=True) == ["hub"]
    # A transition learnt twice, or lost, shows in what the rows were taught.
    twice = _transitions([(["x"], "y"), (["x"], "y"), *crowd, (["hub"], "s150")])
    assert covisit_differences(one_order, twice, every_row=False) == ["x", "y"]
    assert covisit_differences(one_order, _transitions([*crowd, (["hub"], "s150")]), every_row=False) == ["x", "y"]
