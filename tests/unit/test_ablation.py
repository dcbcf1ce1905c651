"""The modality ablation's split and metrics (pure logic, tiny data)."""
from __future__ import annotations

import numpy as np
import pytest

from model.training.ablation import (
    categories_only,
    cold_items,
    cold_split,
    newest_first_metrics,
    random_metrics,
    rank_metrics,
    share_a_category,
    with_new_items,
)
from model.training.data import InteractionData, leave_one_out


def tiny() -> InteractionData:
    """Items 1-4 first seen at times 1-4 (item 4 newest, item 3 next); three users."""
    sequences = [np.array([1, 2, 4, 3]), np.array([2, 1, 3]), np.array([1, 2])]
    timestamps = [np.array([1.0, 2.0, 4.0, 5.0]), np.array([2.5, 3.0, 3.5]), np.array([6.0, 7.0])]
    return InteractionData("tiny", ["a", "b", "c"], sequences, ["1", "2", "3", "4"],
                           np.zeros((5, 1), np.int64), [], timestamps=timestamps)


def test_the_newest_items_by_first_interaction_are_held_out() -> None:
    data = tiny()
    assert np.flatnonzero(cold_items(data, 0.25)).tolist() == [4]
    assert np.flatnonzero(cold_items(data, 0.5)).tolist() == [3, 4]
    split = cold_split(data, 0.5)
    # Training never sees items 3 and 4; each user's first cold interaction is a test case.
    assert [s.tolist() for s in split.warm.sequences] == [[1, 2], [2, 1], [1, 2]]
    assert [h.tolist() for h in split.histories] == [[1, 2], [2, 1]]
    assert split.targets.tolist() == [4, 3] and split.times.tolist() == [4.0, 3.5]
    # At time 3.5 item 4 (first seen at 4.0) is not listed yet.
    listed = split.listed(np.array([False, True, True, True, True]))
    assert listed.tolist() == [[False, True, True, True, True], [False, True, True, True, False]]


def test_rank_metrics_exclude_history_and_unlisted_items() -> None:
    items = np.eye(5, dtype=np.float32)
    users = np.array([[0, 5, 4, 3, 2]], dtype=np.float32)  # prefers 1 > 2 > 3 > 4
    history = [np.array([1])]
    every = np.array([False, True, True, True, True])
    assert rank_metrics(users, items, history, np.array([3]), every)["ndcg@10"] == pytest.approx(1 / np.log2(3))
    only_3_4 = np.array([False, False, False, True, True])
    assert rank_metrics(users, items, history, np.array([3]), only_3_4)["ndcg@10"] == pytest.approx(1.0)


def test_random_metrics_count_the_candidates_outside_the_history() -> None:
    candidates = np.zeros(31, dtype=bool)
    candidates[1:] = True  # 30 items, 10 of them in the history: 20 left
    result = random_metrics([np.arange(1, 11)], candidates)
    assert result["hr@10"] == pytest.approx(10 / 20)
    assert result["ndcg@10"] == pytest.approx(sum(1 / np.log2(r + 2) for r in range(10)) / 20)


def test_items_share_a_category_only_through_a_real_one() -> None:
    attributes = np.array([[1, 2], [2, 0], [3, 0], [0, 0]])
    shared = share_a_category(attributes, 3)
    assert shared.tolist() == [[False, True, False, False], [True, False, False, False],
                               [False, False, False, False], [False, False, False, False]]


def test_a_shared_year_is_not_a_shared_category() -> None:
    names = ["Drama", "year=1995", "Comedy"]  # attribute ids 1, 2, 3
    attributes = np.array([[1, 2], [3, 2], [1, 0]])
    kept = categories_only(attributes, names)
    assert kept.tolist() == [[1, 0], [3, 0], [1, 0]]
    shared = share_a_category(kept, len(names))
    assert shared.tolist() == [[False, False, True], [False, False, False], [True, False, False]]


def test_all_users_with_new_items_list_what_was_listed_and_not_yet_seen() -> None:
    # Items 1, 2, 4 first seen at 1.0-1.5; item 3 at 5.0, the newest: held out.
    sequences = [np.array([1, 2, 3, 4]), np.array([2, 1, 4]), np.array([4, 1, 2, 3])]
    timestamps = [np.array([1.0, 2.0, 5.0, 6.0]), np.array([1.5, 2.5, 3.0]), np.array([1.2, 6.5, 7.0, 8.0])]
    data = InteractionData("seen", ["a", "b", "c"], sequences, ["1", "2", "3", "4"], np.zeros((5, 1), np.int64), [],
                           timestamps=timestamps)
    split = cold_split(data, 0.25)
    assert np.flatnonzero(split.cold).tolist() == [3]
    warm = leave_one_out(split.warm)
    times = np.asarray([split.warm.timestamps[user][-1] for user in warm.users])
    assert warm.test.tolist() == [4, 4, 2] and times.tolist() == [6.0, 3.0, 7.0]
    listed_warm = ~split.cold
    listed_warm[0] = False
    candidates = with_new_items(data, split, warm.users, times, listed_warm)
    assert candidates.tolist() == [
        [False, True, True, False, True],  # a rated item 3 at 5.0, before its test: history
        [False, True, True, False, True],  # b's test at 3.0: item 3 not listed yet
        [False, True, True, True, True],  # c rates item 3 only after its test: a candidate
    ]


def test_newest_listed_first_ranks_by_listing_time() -> None:
    split = cold_split(tiny(), 0.5)  # cases: a at 4.0 (target 4), b at 3.5 (target 3)
    every = np.array([False, True, True, True, True])
    result = newest_first_metrics(split, split.listed(every))
    # a: history [1, 2] excluded, 4 (listed 4.0) before 3 (3.5): rank 1. b: 4 unlisted, 3 newest: rank 1.
    assert result["hr@10"] == pytest.approx(1.0) and result["ndcg@10"] == pytest.approx(1.0)
    later = cold_split(tiny(), 0.25)  # item 4 alone held out; a's case: 4 against 3 and 4
    assert newest_first_metrics(later, later.listed(every))["ndcg@10"] == pytest.approx(1.0)
