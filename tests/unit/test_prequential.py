"""Prequential evaluation logic: replay order, warm-up, waves, metrics and the two baselines."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench.prequential_eval import (
    Catalogue,
    PopularityBaseline,
    RankingScore,
    RiverMF,
    replay_order,
    select_users,
    warmup_length,
    waves,
)
from core.errors import ConfigError


def test_warmup_length_keeps_at_least_one_event_and_rejects_bad_fractions() -> None:
    assert warmup_length(10, 0.5) == 5
    assert warmup_length(3, 0.5) == 1
    assert warmup_length(1, 0.5) == 1  # a one-event user is never scored
    assert warmup_length(4, 0.0) == 1
    with pytest.raises(ConfigError):
        warmup_length(10, 1.0)


def test_without_timestamps_users_take_turns_in_their_own_order() -> None:
    order = replay_order({"a": ["1", "2", "3"], "b": ["4"], "c": ["5", "6"]}, None, 0.5)
    assert [(i.user_id, i.item_id) for i in order] == [
        ("a", "1"), ("b", "4"), ("c", "5"), ("a", "2"), ("c", "6"), ("a", "3"),
    ]
    assert [i.scored for i in order] == [False, False, False, True, True, True]


def test_with_timestamps_the_replay_is_in_time_order_and_stable_for_ties() -> None:
    order = replay_order({"a": ["1", "2"], "b": ["3", "4"]}, {"a": [5.0, 9.0], "b": [5.0, 6.0]}, 0.5)
    assert [(i.user_id, i.item_id, i.time) for i in order] == [
        ("a", "1", 5.0), ("b", "3", 5.0), ("b", "4", 6.0), ("a", "2", 9.0),
    ]
    with pytest.raises(ConfigError):
        replay_order({"a": ["1", "2"]}, {"a": [1.0]}, 0.5)


def test_select_users_is_seeded_and_keeps_the_original_order() -> None:
    users = [str(n) for n in range(100)]
    chosen = select_users(users, 10, seed=3)
    assert chosen == select_users(users, 10, seed=3)
    assert len(chosen) == 10 and chosen == sorted(chosen, key=int)
    assert select_users(users, None, seed=3) == users


def test_waves_never_ask_for_a_user_with_an_unapplied_event_in_the_same_wave() -> None:
    order = replay_order({"a": list("123456"), "b": list("789"), "c": list("xyz")},
                         {"a": [1, 2, 3, 4, 5, 6], "b": [1.5, 2.5, 7], "c": [1, 1, 1]}, 0.3)
    produced = list(waves(order, max_scored=2))
    assert [i for wave in produced for i in wave] == order  # nothing dropped or reordered
    for wave in produced:
        assert sum(i.scored for i in wave) <= 2
        for n, interaction in enumerate(wave):
            if interaction.scored:
                assert interaction.user_id not in {earlier.user_id for earlier in wave[:n]}


def test_ranking_score_counts_hits_and_discounts_by_rank() -> None:
    score = RankingScore(k=3)
    assert score.update(["a", "b", "c"], "a")
    assert score.update(["a", "b", "c"], "c")
    assert not score.update(["a", "b", "c", "d"], "d")  # beyond k
    assert score.hit_rate == pytest.approx(2 / 3)
    assert score.ndcg == pytest.approx((1.0 + 1.0 / math.log2(4)) / 3)
    assert score.cumulative_hr == pytest.approx([1.0, 1.0, 2 / 3])
    assert RankingScore().hit_rate == 0.0


def test_popularity_learns_online_breaks_ties_by_catalogue_order_and_excludes_seen() -> None:
    catalogue = Catalogue(["i1", "i2", "i3", "i4"])
    popularity = PopularityBaseline(catalogue)
    assert popularity.rank("u", set(), 2) == ["i1", "i2"]  # all zero: catalogue order
    for item in ["i3", "i3", "i4", "unknown"]:
        popularity.learn_one("u", item)
    assert popularity.rank("u", set(), 3) == ["i3", "i4", "i1"]
    assert popularity.rank("u", {"i3"}, 2) == ["i4", "i1"]
    assert popularity.rank("u", {"i1", "i2", "i3", "i4"}, 2) == []


def test_river_factors_mirror_matches_predict_one() -> None:
    catalogue = Catalogue([f"i{n}" for n in range(30)])
    river = RiverMF(catalogue, n_factors=4, negatives=2, seed=1)
    for step in range(600):
        river.learn_one(f"u{step % 5}", f"i{(step * 7) % 12}")
    scores = river.scores("u1")
    # The user's own bias and the global mean shift every item equally, so the
    # numpy ranking must agree with river's own predictions up to that constant.
    predicted = np.array([river.model.predict_one("u1", item) for item in catalogue.item_ids[:12]])
    assert np.allclose(predicted - scores[:12], (predicted - scores[:12])[0], atol=1e-9)
    ranked = river.rank("u1", {"i0"}, 10)
    assert len(ranked) == 10 and "i0" not in ranked


def test_river_learns_that_co_clicked_items_belong_together() -> None:
    catalogue = Catalogue([f"i{n}" for n in range(50)])
    river = RiverMF(catalogue, n_factors=8, negatives=3, seed=2)
    group_a, group_b = [f"i{n}" for n in range(5)], [f"i{n}" for n in range(5, 10)]
    for epoch in range(40):
        for user in range(20):
            for item in (group_a if user % 2 == 0 else group_b):
                river.learn_one(f"u{user}", item)
    top = river.rank("u0", set(), 5)
    assert len(set(top) & set(group_a)) >= 4


def test_offline_requests_mirror_what_each_worker_holds() -> None:
    from bench.prequential import CATALOGUE_TIME, offline_requests

    # Two users taking turns, no times (S3-Rec): u1 a b c d, u2 x y z; warm-up half.
    interactions = replay_order({"u1": ["a", "b", "c", "d"], "u2": ["x", "y", "z"]}, None, 0.5)
    index = {"a": 1, "b": 2, "c": 3, "d": 4, "x": 5, "y": 6}  # "z" unknown to the model
    requests = offline_requests(interactions, index)
    asked = [(r.worker, r.target, r.history, r.seen, r.time - CATALOGUE_TIME) for r in requests]
    assert asked == [
        # u2's second event is scored: online and frozen hold the same warm-up.
        ("online", "y", [5], [5], 0.0), ("frozen", "y", [5], [5], 0.0),
        ("online", "c", [1, 2], [1, 2], 1.0), ("frozen", "c", [1, 2], [1, 2], 1.0),
        ("online", "z", [5, 6], [5, 6], 1.0), ("frozen", "z", [5], [5, 6], 0.0),
        # The frozen worker never got "c": its state stops at the warm-up, but
        # the request still excludes everything the user did.
        ("online", "d", [1, 2, 3], [1, 2, 3], 2.0), ("frozen", "d", [1, 2], [1, 2, 3], 1.0),
    ]
    assert all(r.covisit == [] for r in requests)  # no co-visit ranking asked for

    # Co-visits: each worker's transitions as its clicks taught them, at the
    # start of the request's wave (waves: [a x b] [y c] [z d]); the online
    # worker learnt the scored events too, the frozen one only the warm-up.
    def suggest(learnt, recent, seen):  # type: ignore[no-untyped-def]
        scores = learnt.scores(recent)
        return sorted(scores, key=lambda item: (-scores[item], item))

    requests = offline_requests(interactions, index, suggest)
    by_ask = {(r.worker, r.target): r.covisit for r in requests}
    assert by_ask[("online", "y")] == by_ask[("frozen", "y")] == []  # x alone taught nothing
    assert by_ask[("online", "c")] == by_ask[("frozen", "c")] == ["a", "b"]  # a -> b both ways
    # y and c were scored in the wave before: only the online worker learnt x -> y and b -> c.
    assert by_ask[("online", "z")] == ["x", "y"] and by_ask[("frozen", "z")] == []
    assert by_ask[("online", "d")] == ["b", "c", "a"] and by_ask[("frozen", "d")] == ["a", "b"]
