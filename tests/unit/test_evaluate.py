"""Leave-one-out metrics, popularity baselines, MMR and the quality bench CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.quality import main as bench_main
from model.serving.rerank import mmr
from model.training.data import leave_one_out, load_s3rec
from model.training.evaluate import evaluate_popularity
from model.training.metrics import (
    MISSED,
    coverage,
    exclude_history,
    intra_list_diversity,
    ranking_metrics,
    sample_negatives,
    sampled_ranks,
    target_ranks,
    top_k,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def write_s3rec(folder: Path, lines: list[str], attributes: dict[str, list[int]] | None = None) -> Path:
    path = folder / "Tiny.txt"
    path.write_text("\n".join(lines) + "\n")
    if attributes is not None:
        (folder / "Tiny_item2attributes.json").write_text(json.dumps(attributes))
    return path


def test_hand_made_ranks_give_known_hr_and_ndcg() -> None:
    # 4 users; scores over items 0..5 (0 is never ranked).
    scores = np.array(
        [
            [9.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # target 1 -> rank 0
            [9.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # target 3 -> rank 2
            [9.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # target 3, history {1, 2} removed -> rank 0
            [9.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # target 2 is in the history -> missed
        ]
    )
    histories = [np.array([], dtype=np.int64), np.array([], dtype=np.int64), np.array([1, 2]), np.array([2])]
    targets = np.array([1, 3, 3, 2])
    ranks = target_ranks(exclude_history(scores.copy(), histories), targets)
    assert ranks[:3].tolist() == [0, 2, 0]
    assert ranks[3] == MISSED
    metrics = ranking_metrics(ranks, ks=(1, 3))
    assert metrics["hr@1"] == pytest.approx(2 / 4)
    assert metrics["hr@3"] == pytest.approx(3 / 4)
    assert metrics["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4) + 1) / 4)


def test_equal_scores_rank_the_lower_index_first() -> None:
    scores = np.array([[0.0, 5.0, 5.0, 5.0, 1.0]])
    assert target_ranks(scores, np.array([3]))[0] == 2
    assert target_ranks(scores, np.array([1]))[0] == 0
    assert top_k(scores, 3)[0].tolist() == [1, 2, 3]


def test_top_k_keeps_lower_index_ties_at_the_boundary() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 40)).astype(np.float64)
    expected = np.stack([np.lexsort((np.arange(40), -row))[:7] for row in scores])
    assert (top_k(scores, 7) == expected).all()


def test_pop_all_breaks_ties_by_lower_item_id(tmp_path: Path) -> None:
    # Counts over all interactions: item 5 x3, items 2 and 7 x2 (tie), others x1.
    path = write_s3rec(tmp_path, ["1 5 2 7 1", "2 5 7 2 3", "3 4 5 6 8"])
    data = load_s3rec(path)
    split = leave_one_out(data)
    evaluation = evaluate_popularity(data, split, "test", "full", "pop-all")
    # User 3 (history 4 5 6): ranking 5x, 2, 7, then 1 3 8 (count 1, by id); target 8.
    assert evaluation.top[2, :3].tolist() == [data.item_index()["2"], data.item_index()["7"], data.item_index()["1"]]
    assert evaluation.ranks[2] == 4  # 2, 7, 1, 3 are ahead of 8
    # User 1 (history 5 2 7): target 1 is first among the rest (1 < 3 < 4 ...).
    assert evaluation.ranks[0] == 0


def test_sampled_protocol_negatives_are_unseen_and_reproducible() -> None:
    sequences = [np.array([1, 2, 3]), np.array([4, 5, 6, 7])]
    first = sample_negatives(sequences, n_items=30, n_negatives=20, seed=3)
    assert (first == sample_negatives(sequences, n_items=30, n_negatives=20, seed=3)).all()
    for row, sequence in zip(first, sequences):
        assert not set(row.tolist()) & set(sequence.tolist())
        assert row.min() >= 1 and row.max() <= 30
    scores = np.array([[0.5, 0.9, 0.5, 0.1]])
    candidates = np.array([[10, 11, 4, 12]])  # target 10 ties with item 4 (lower id wins)
    assert sampled_ranks(scores, candidates)[0] == 2


def test_mmr_with_trade_off_one_is_relevance_order() -> None:
    rng = np.random.default_rng(1)
    relevance = rng.normal(size=30)
    vectors = rng.normal(size=(30, 8))
    assert mmr(relevance, vectors, 10, 1.0).tolist() == np.argsort(-relevance, kind="stable")[:10].tolist()


def test_mmr_trades_relevance_for_diversity() -> None:
    # Two near-duplicates on top and one different item just below them.
    relevance = np.array([1.0, 0.99, 0.9])
    vectors = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])
    assert mmr(relevance, vectors, 2, 1.0).tolist() == [0, 1]
    assert mmr(relevance, vectors, 2, 0.5).tolist() == [0, 2]
    picked = mmr(relevance, vectors, 5, 0.3)
    assert sorted(picked.tolist()) == [0, 1, 2]


def test_diversity_and_coverage() -> None:
    vectors = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    same = np.array([[1, 2]])
    different = np.array([[1, 3]])
    assert intra_list_diversity(same, vectors) == pytest.approx(0.0, abs=1e-6)
    assert intra_list_diversity(different, vectors) == pytest.approx(1.0)
    assert coverage(np.array([[1, 3], [3, 1]]), n_items=3) == pytest.approx(2 / 3)


def test_bench_prints_json_last_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [f"{u} " + " ".join(str(1 + (u + j) % 12) for j in range(6)) for u in range(1, 40)]
    path = write_s3rec(tmp_path, lines, {str(i): [1 + i % 3] for i in range(1, 13)})
    plot = tmp_path / "quality.png"
    assert bench_main(["--data", str(path), "--model", "pop", "--diversity-sweep", "--plot", str(plot)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("dataset", "protocol", "model", "hr@10", "ndcg@10", "hr@20", "ndcg@20", "n_users",
                "train_seconds", "intra_list_diversity", "coverage"):
        assert key in result
    assert result["n_users"] == 39 and 0.0 <= result["hr@10"] <= 1.0
    assert plot.is_file() and plot.stat().st_size > 0
    assert [row["trade_off"] for row in result["diversity_sweep"]] == [1.0, 0.9, 0.8, 0.7, 0.5, 0.3]
    sweep_plot = tmp_path / "quality-diversity.png"
    assert sweep_plot.is_file() and sweep_plot.stat().st_size > 0
    assert bench_main(["--data", str(path), "--model", "pop", "--protocol", "sampled"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["protocol"] == "sampled"


@pytest.mark.skipif(not (SHARED_DATA / "amazon").is_dir(), reason="../shared/data/amazon is not present")
@pytest.mark.parametrize(
    ("name", "hr", "ndcg"), [("Toys_and_Games", 0.0113, 0.0061), ("Sports_and_Outdoors", 0.0094, 0.0053)]
)
def test_pop_all_reproduces_the_published_poprec_row(name: str, hr: float, ndcg: float) -> None:
    data = load_s3rec(SHARED_DATA / "amazon" / f"{name}.txt")
    metrics = evaluate_popularity(data, leave_one_out(data), "test", "full", "pop-all").metrics
    assert metrics["hr@10"] == pytest.approx(hr, rel=0.03)
    assert metrics["ndcg@10"] == pytest.approx(ndcg, rel=0.03)


def test_training_and_the_catalogue_embed_the_same_film_titles(tmp_path: Path) -> None:
    """A trained ML-100k model must meet its films under the titles it learned them by."""
    from bench.movielens import catalog_events
    from model.training.data import load_ml100k

    (tmp_path / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tUntitled\t\tDrama\n"
    )
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t10\n1\t2\t3\t20\n"
    )
    data = load_ml100k(tmp_path)
    assert data.titles is not None
    trained = {item_id: data.titles[n] for n, item_id in enumerate(data.item_ids, start=1)}
    published = {item.item_id.removeprefix("m"): item.title for item in catalog_events(tmp_path)}
    assert trained == published == {"1": "Toy Story (1995)", "2": "Untitled"}


def test_the_served_rerank_chooses_among_the_best_fifty_only() -> None:
    from stream.recommend import MMR_POOL, rerank

    rng = np.random.default_rng(0)
    scores = rng.random(500).astype(np.float32)
    vectors = rng.standard_normal((500, 8)).astype(np.float32)
    best = set(np.argsort(-scores)[:MMR_POOL].tolist())
    # Even a strong diversity weight picks nothing from below the pool.
    chosen = rerank(scores, vectors, 10, 0.3)
    assert len(chosen) == 10 and set(chosen.tolist()) <= best
    assert chosen[0] == int(np.argmax(scores))
    np.testing.assert_array_equal(rerank(scores, vectors, 10, 1.0), np.argsort(-scores)[:10])
    # Asking for more than the pool widens it to k.
    assert len(set(rerank(scores, vectors, 80, 0.8).tolist())) == 80
    # Within the pool it is the MMR choice.
    top = np.argsort(-scores, kind="stable")[:MMR_POOL]
    np.testing.assert_array_equal(rerank(scores, vectors, 10, 0.5), top[mmr(scores[top], vectors[top], 10, 0.5)])


def test_a_trained_ranker_orders_only_the_retrieval_pool_it_was_trained_on() -> None:
    from stream.recommend import rerank

    rng = np.random.default_rng(1)
    retrieval = rng.standard_normal(500).astype(np.float32)
    vectors = rng.standard_normal((500, 8)).astype(np.float32)
    by_retrieval = np.argsort(-retrieval, kind="stable")
    pool = by_retrieval[:50]
    scores = rng.random(500).astype(np.float32)
    scores[by_retrieval[400]] = 2.0  # the ranker's correction lifts a far-down candidate
    chosen = rerank(scores, vectors, 10, 1.0, retrieval=retrieval, rank_pool=50)
    # Inside the pool the ranker's order stands; nothing from below the pool is lifted.
    np.testing.assert_array_equal(chosen, pool[np.argsort(-scores[pool], kind="stable")[:10]])
    # Without a pool (the rule scorer) the lifted candidate comes first.
    assert rerank(scores, vectors, 10, 1.0)[0] == by_retrieval[400]
    # Asking for more than the pool: the pool in ranker order, then the rest in retrieval order.
    longer = rerank(scores, vectors, 80, 1.0, retrieval=retrieval, rank_pool=50)
    assert set(longer[:50].tolist()) == set(pool.tolist())
    np.testing.assert_array_equal(longer[50:], by_retrieval[50:80])
    # Fewer candidates than the pool: plain ordering by score.
    np.testing.assert_array_equal(rerank(scores[:30], vectors[:30], 5, 1.0, retrieval=retrieval[:30], rank_pool=50),
                                  np.argsort(-scores[:30], kind="stable")[:5])


def test_co_visits_are_fused_with_the_models_order_by_reciprocal_rank() -> None:
    from stream.recommend import rerank

    scores = np.linspace(1.0, 0.0, 60).astype(np.float32)  # the model's order is 0, 1, 2, ...
    vectors = np.eye(60, dtype=np.float32)
    # Candidate 59, last for the model, is the best co-visit; 1 is second for both:
    # 1/61 + 2/61 for 1, 1/119 + 2/60 for 59, 1/60 for 0.
    chosen = rerank(scores, vectors, 3, 1.0, covisit=[59, 1], covisit_weight=2.0)
    assert chosen.tolist() == [1, 59, 0]
    # Weight 0 or no co-visits: the model's order alone.
    assert rerank(scores, vectors, 3, 1.0, covisit=[59, 1], covisit_weight=0.0).tolist() == [0, 1, 2]
    assert rerank(scores, vectors, 3, 1.0, covisit=[], covisit_weight=2.0).tolist() == [0, 1, 2]


def test_the_offline_co_visit_table_learns_from_the_requests_inputs_alone() -> None:
    from model.training.data import InteractionData
    from model.training.evaluate import covisit_sequences

    sequences = [np.asarray(s) for s in ([1, 2, 3, 4], [2, 3, 5], [4, 1], [5, 1, 2, 6])]
    data = InteractionData("tiny", ["a", "b", "c", "d"], sequences, [str(i) for i in range(1, 7)],
                           np.zeros((7, 1), dtype=np.int64), [])
    split = leave_one_out(data)
    learnt = [s.tolist() for s in covisit_sequences(data, split, "test")]
    assert learnt == [[1, 2, 3], [2, 3], [5, 1, 2], [4, 1]]  # inputs of a, b, d, then c (too short) whole
    assert [s.tolist() for s in covisit_sequences(data, split, "valid")][:3] == [[1, 2], [2], [5, 1]]


def test_co_visits_lift_the_next_item_the_requests_inputs_teach() -> None:
    from model.training.data import InteractionData
    from model.training.evaluate import _fuse_covisits

    # Everybody who bought 1 bought 2 next; the test user's last item is 1, its target 2.
    sequences = [np.asarray([7, 1, 2, 8]) for _ in range(5)] + [np.asarray([9, 8, 1, 2])]
    data = InteractionData("tiny", [str(u) for u in range(6)], sequences, [str(i) for i in range(1, 61)],
                           np.zeros((61, 1), dtype=np.int64), [])
    split = leave_one_out(data)
    inputs, targets = split.inputs("test"), split.test
    # The model put each target 40th of 50 candidates; one target (row 0) is in its history.
    orders = np.tile(np.arange(11, 61), (len(targets), 1))
    orders[:, 39] = targets
    ranks = np.full(len(targets), 39)
    ranks[0] = MISSED
    fused, top, relevance = _fuse_covisits(2.0, data, split, "test", inputs, targets, orders, ranks)
    assert fused[-1] == 0 and top[-1, 0] == 2  # the co-visit of 1 -> 2 comes first for the last user
    assert fused[0] == MISSED  # a target in the history stays a miss
    assert np.all(np.diff(relevance, axis=1) <= 0)  # lists best first
    unchanged, _, _ = _fuse_covisits(0.0, data, split, "test", inputs, targets, orders, ranks)
    assert unchanged[-1] == 39
