"""Decayed popularity counts: half-life, ranking, exclusions, the request-path cache."""
from __future__ import annotations

import math

import pytest

from stream.trending import Trending

T0 = 1_700_000_000.0
HOUR = 3600.0


def test_empty_counter() -> None:
    trending = Trending(HOUR)
    assert trending.top(5, T0) == []
    assert trending.top_cached(5, T0) == []
    assert trending.score("a", T0) == 0.0
    assert len(trending) == 0


def test_counts_halve_after_one_half_life() -> None:
    trending = Trending(HOUR)
    trending.add("a", 4.0, T0)
    assert trending.score("a", T0) == pytest.approx(4.0)
    assert trending.score("a", T0 + HOUR) == pytest.approx(2.0)
    assert trending.score("a", T0 + 3 * HOUR) == pytest.approx(0.5)


def test_weights_add_up_with_their_own_age() -> None:
    trending = Trending(HOUR)
    trending.add("a", 1.0, T0)
    trending.add("a", 1.0, T0 + HOUR)
    # The first count has halved by the time the second arrives.
    assert trending.score("a", T0 + HOUR) == pytest.approx(1.5)
    assert trending.score("a", T0 + 2 * HOUR) == pytest.approx(0.75)


def test_recent_activity_beats_older_heavier_activity() -> None:
    trending = Trending(HOUR)
    trending.add("old", 3.0, T0)
    trending.add("new", 1.0, T0 + 2 * HOUR)
    assert trending.score("old", T0 + 2 * HOUR) == pytest.approx(0.75)
    assert [item for item, _ in trending.top(2, T0 + 2 * HOUR)] == ["new", "old"]


def test_top_is_ordered_best_first_and_limited() -> None:
    trending = Trending(HOUR)
    for item, weight in [("a", 1.0), ("b", 5.0), ("c", 3.0), ("d", 2.0)]:
        trending.add(item, weight, T0)
    top = trending.top(3, T0 + HOUR)
    assert [item for item, _ in top] == ["b", "c", "d"]
    assert [score for _, score in top] == pytest.approx([2.5, 1.5, 1.0])


def test_top_skips_exclusions_and_still_fills_n() -> None:
    trending = Trending(HOUR)
    for rank, item in enumerate("abcdefgh"):
        trending.add(item, 10.0 - rank, T0)
    top = trending.top(3, T0, exclude={"a", "b", "d"})
    assert [item for item, _ in top] == ["c", "e", "f"]
    assert trending.top(3, T0, exclude={"zz"}) == trending.top(3, T0)


def test_top_cached_keeps_its_ranking_until_max_age() -> None:
    trending = Trending(HOUR)
    trending.add("a", 1.0, T0)
    assert [item for item, _ in trending.top_cached(5, T0, max_age_s=10.0)] == ["a"]
    trending.add("b", 5.0, T0 + 1)
    # Within max_age the cached ranking is served, without "b".
    assert [item for item, _ in trending.top_cached(5, T0 + 5, max_age_s=10.0)] == ["a"]
    # Past max_age it is recomputed.
    assert [item for item, _ in trending.top_cached(5, T0 + 11, max_age_s=10.0)] == ["b", "a"]


def test_top_cached_recomputes_for_a_bigger_n() -> None:
    trending = Trending(HOUR)
    for rank in range(300):
        trending.add(f"item-{rank:03d}", 300.0 - rank, T0)
    assert len(trending.top_cached(10, T0, max_age_s=60.0)) == 10
    bigger = trending.top_cached(100, T0 + 1, max_age_s=60.0)
    assert [item for item, _ in bigger] == [f"item-{rank:03d}" for rank in range(100)]


def test_top_cached_applies_exclusions_to_the_cached_ranking() -> None:
    trending = Trending(HOUR)
    for rank, item in enumerate("abcdef"):
        trending.add(item, 10.0 - rank, T0)
    trending.top_cached(3, T0, max_age_s=60.0)
    top = trending.top_cached(3, T0 + 1, exclude={"a", "c"}, max_age_s=60.0)
    assert [item for item, _ in top] == ["b", "d", "e"]


def test_top_cached_fills_n_even_with_many_exclusions() -> None:
    trending = Trending(HOUR)
    for rank in range(400):
        trending.add(f"item-{rank:03d}", 400.0 - rank, T0)
    seen = {f"item-{rank:03d}" for rank in range(200)}
    assert len(trending.top(10, T0, exclude=seen)) == 10
    assert trending.top_cached(10, T0, exclude=seen) == trending.top(10, T0, exclude=seen)


def test_forget_removes_an_item() -> None:
    trending = Trending(HOUR)
    trending.add("a", 1.0, T0)
    trending.add("b", 2.0, T0)
    trending.forget("b")
    trending.forget("never-seen")
    assert trending.score("b", T0) == 0.0
    assert [item for item, _ in trending.top(5, T0)] == ["a"]
    assert len(trending) == 1


def expected_score(events: list[tuple[float, float]], now: float, half_life: float) -> float:
    """The definition: every event's weight halved once per half-life since it happened."""
    return sum(weight * 0.5 ** ((now - at) / half_life) for at, weight in events)


def test_very_long_runs_keep_scores_finite_and_ratios_exact() -> None:
    half_life = 10.0
    trending = Trending(half_life)
    events: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
    # 10,000 s is 1,000 half-lives: without rebasing exp(rate * t) overflows.
    for step in range(10_000):
        at = T0 + step
        for item, weight in (("a", 1.0), ("b", 2.0)):
            trending.add(item, weight, at)
            events[item].append((at, weight))
    now = T0 + 10_000
    score_a, score_b = trending.score("a", now), trending.score("b", now)
    assert math.isfinite(score_a) and math.isfinite(score_b)
    assert score_b / score_a == pytest.approx(2.0, rel=1e-9)
    assert score_a == pytest.approx(expected_score(events["a"][-2000:], now, half_life), rel=1e-6)
    assert [item for item, _ in trending.top(2, now)] == ["b", "a"]


def test_items_that_decayed_to_nothing_are_dropped_on_rebase() -> None:
    half_life = 1.0
    trending = Trending(half_life)
    trending.add("ancient", 1.0, T0)
    trending.add("fresh", 1.0, T0 + 1000)  # 1,000 half-lives later: forces a rebase
    assert len(trending) == 1
    assert trending.score("fresh", T0 + 1000) == pytest.approx(1.0)
    assert trending.score("ancient", T0 + 1000) == 0.0


def test_ranking_while_clicks_are_added_from_another_thread() -> None:
    import threading

    trending = Trending(HOUR)
    failures: list[BaseException] = []
    done = threading.Event()

    def add_clicks() -> None:
        for n in range(200_000):
            trending.add(f"item-{n}", 1.0, T0 + n * 1e-3)
        done.set()

    writer = threading.Thread(target=add_clicks)
    writer.start()
    while not done.is_set():
        try:
            trending.top(10, T0)
        except RuntimeError as error:  # "dictionary changed size during iteration"
            failures.append(error)
            break
    writer.join()
    assert failures == []
    assert len(trending) == 200_000


def test_top_over_a_large_catalogue_is_the_full_sort_ties_included() -> None:
    import heapq
    import random

    rng = random.Random(4)
    trending = Trending(3600.0)
    for _ in range(3000):  # ~800 items, many with equal counts
        trending.add(f"i{rng.randrange(800)}", float(rng.choice([1, 1, 2, 3])), 1000.0)
    for exclude in (set(), {f"i{rng.randrange(800)}" for _ in range(20)}):
        by_full_sort = heapq.nlargest(50 + len(exclude), trending.entries()[1], key=lambda e: (e[1], e[0]))
        expected = [item for item, _, _ in by_full_sort if item not in exclude][:50]
        assert [item for item, _ in trending.top(50, 1000.0, exclude)] == expected
