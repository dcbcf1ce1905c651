"""Ranking metrics for leave-one-out evaluation (pure numpy, no models).

Conventions shared by every caller:
- item index 0 is never recommended;
- items in the user's input history are removed before ranking (full ranking);
- equal scores are broken in favour of the lower item index;
- a rank is 0-based, and ``MISSED`` means the target cannot appear at all
  (e.g. it is part of the removed history).
"""
from __future__ import annotations

import numpy as np

MISSED = np.iinfo(np.int64).max // 2


def exclude_history(scores: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
    """Set index 0 and each user's history items to -inf, in place; (U, N+1)."""
    scores[:, 0] = -np.inf
    for row, history in enumerate(histories):
        scores[row, history] = -np.inf
    return scores


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each user's target among all items: (U, N+1), (U,) -> (U,).

    Rank = items scoring higher + equal-scoring items with a lower index.
    Targets scored -inf (excluded) get ``MISSED``.
    """
    rows = np.arange(len(targets))
    target_scores = scores[rows, targets][:, None]  # (U, 1)
    higher = (scores > target_scores).sum(axis=1)
    lower_index = np.arange(scores.shape[1])[None, :] < targets[:, None]
    ties = ((scores == target_scores) & lower_index).sum(axis=1)
    ranks = (higher + ties).astype(np.int64)
    ranks[~np.isfinite(target_scores[:, 0])] = MISSED
    return ranks


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(U, N) -> (U, k) column indices, best first, ties by lower index."""
    k = min(k, scores.shape[1])
    # argpartition on -scores, then a stable sort of the k survivors by
    # (score desc, index asc) keeps the tie rule exact.
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part.sort(axis=1)
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    # argpartition may drop a lower-index tie at the boundary; repair those rows.
    kth = np.take_along_axis(scores, top[:, -1:], axis=1)
    boundary_ties = (scores == kth).sum(axis=1) > (np.take_along_axis(scores, top, axis=1) == kth).sum(axis=1)
    for row in np.nonzero(boundary_ties)[0]:
        full = np.lexsort((np.arange(scores.shape[1]), -scores[row]))
        top[row] = full[:k]
    return top


def hit_rate(ranks: np.ndarray, k: int) -> float:
    return float(np.mean(ranks < k)) if len(ranks) else 0.0


def ndcg(ranks: np.ndarray, k: int) -> float:
    """One relevant item per user: 1 / log2(rank + 2) when it is in the top k."""
    if not len(ranks):
        return 0.0
    hits = ranks < k
    gains = np.zeros(len(ranks))
    gains[hits] = 1.0 / np.log2(ranks[hits] + 2.0)
    return float(gains.mean())


def ranking_metrics(ranks: np.ndarray, ks: tuple[int, ...] = (10, 20)) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"hr@{k}"] = hit_rate(ranks, k)
        metrics[f"ndcg@{k}"] = ndcg(ranks, k)
    return metrics


def sample_negatives(
    full_sequences: list[np.ndarray], n_items: int, n_negatives: int = 99, seed: int = 0
) -> np.ndarray:
    """(U, n_negatives) uniform items in 1..n_items outside each user's whole sequence."""
    rng = np.random.default_rng(seed)
    negatives = np.zeros((len(full_sequences), n_negatives), dtype=np.int64)
    for row, sequence in enumerate(full_sequences):
        seen = set(sequence.tolist())
        picked: list[int] = []
        while len(picked) < n_negatives:
            for item in rng.integers(1, n_items + 1, size=2 * n_negatives).tolist():
                if item not in seen and len(picked) < n_negatives:
                    picked.append(item)
        negatives[row] = picked
    return negatives


def sampled_ranks(candidate_scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Rank of column 0 (the target) among its row: (U, C) scores, (U, C) item indices -> (U,)."""
    target_scores = candidate_scores[:, :1]
    higher = (candidate_scores > target_scores).sum(axis=1)
    ties = ((candidate_scores == target_scores) & (candidates < candidates[:, :1])).sum(axis=1)
    return (higher + ties).astype(np.int64)


def intra_list_diversity(top_items: np.ndarray, item_vectors: np.ndarray) -> float:
    """Mean pairwise cosine distance within each list: (U, k) indices, (N+1, F) vectors."""
    users, k = top_items.shape
    if k < 2 or users == 0:
        return 0.0
    norms = np.linalg.norm(item_vectors, axis=1, keepdims=True)
    unit = (item_vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    total = 0.0
    for start in range(0, users, 2048):
        lists = unit[top_items[start : start + 2048]]  # (u, k, F)
        similarity = lists @ lists.transpose(0, 2, 1)  # (u, k, k)
        off_diagonal = similarity.sum(axis=(1, 2)) - np.trace(similarity, axis1=1, axis2=2)
        total += float((1.0 - off_diagonal / (k * (k - 1))).sum())
    return total / users


def coverage(top_items: np.ndarray, n_items: int) -> float:
    """Share of the catalogue (indices 1..n_items) shown in at least one list."""
    shown = np.unique(top_items)
    return float(np.count_nonzero(shown > 0)) / max(n_items, 1)
