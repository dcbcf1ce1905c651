"""One evaluation for any served model on the newest held-out interactions.

The fine-tuner compares a candidate with whatever serves: a trained version or
the content rule model. Both are asked through the ``ServingModel`` contract
only, the way a worker asks them: item vectors from each item's content (the
text of the fields the model reads, its id), user vectors from the user's
items and actions, retrieval by dot product over the same items with the
user's history removed, then the model's scorer re-orders the best
``POOL`` (context from the model itself, or, for a model that learnt none,
from the window's own counts as a worker's live counts would give it), and,
with a co-visit weight, that order is fused with the co-visit order of the
user's latest items (reciprocal rank, ``model.serving.covisit``) as a worker
fuses them. The co-visit table is given by the caller: the transitions of the
window's inputs (what a worker learns from the same clicks), on top of the
table a trained model brought, never the held-out interactions.

Returns HR and NDCG at 10 and 20 of the final order, the same of the model's
order before the co-visit fusion (``ranked_*``) and of retrieval alone
(``retrieval_*``, no scorer, no co-visits): the ranker is kept only where
``ranked_*`` beats ``retrieval_*``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.serving.contract import ItemContent, ItemContext
from model.serving.covisit import WINDOW, CoVisitTable, fused_relevance, history_scores, ranked
from model.training.data import LeaveOneOut, item_counts, left_pad
from model.training.metrics import exclude_history, ranking_metrics, target_ranks, top_k

POOL = 50
COVISIT_CANDIDATES = 50  # as a worker's request considers them


@dataclass(frozen=True)
class Window:
    """The held-out question: ``histories`` (inputs), ``actions`` aligned with them,
    ``targets`` (U,) and ``times`` (U,) of each user's newest input, over items 1..N."""

    histories: list[np.ndarray]
    actions: list[np.ndarray]
    targets: np.ndarray
    times: np.ndarray
    n_items: int

    @classmethod
    def newest(cls, split: LeaveOneOut, actions: list[np.ndarray], timestamps: list[np.ndarray],
               n_items: int) -> "Window":
        users = split.users.tolist()
        return cls(histories=split.inputs("test"), actions=[actions[u][:-1] for u in users],
                   targets=split.test, times=np.asarray([timestamps[u][-2] for u in users], np.float64),
                   n_items=n_items)


def evaluate(model, content: dict[tuple[str, ...], ItemContent], window: Window,  # type: ignore[no-untyped-def]
             table: CoVisitTable | None = None, covisit_weight: float = 0.0) -> dict[str, float]:
    """``content[fields]``: the N items (index 1..N) with text embedded from ``fields``;
    ``table``: co-visits over the same indices, fused with ``covisit_weight`` (0: none)."""
    items = content[tuple(model.text_fields)]
    vectors = np.zeros((window.n_items + 1, model.fused_dim), np.float32)
    vectors[1:] = model.item_vectors(items)
    text = np.zeros((window.n_items + 1, model.text_dim), np.float32)
    text[1:] = items.text
    ids = np.asarray([""] + list(items.item_ids), dtype=object)
    # A model without learnt context is served with the live counts: the window's inputs stand in.
    live = ItemContext(item_counts(window.histories, window.n_items).astype(np.float64), None)
    length = model.max_sequence
    retrieval, reranked, final = [], [], []
    for start in range(0, len(window.targets), 512):
        histories = window.histories[start : start + 512]
        targets = window.targets[start : start + 512]
        padded = left_pad(histories, length)
        actions = left_pad(window.actions[start : start + 512], length)
        users = model.user_vectors(vectors[padded], actions)  # (b, d)
        scores = exclude_history(users @ vectors.T, histories)  # (b, N+1)
        ranks = target_ranks(scores, targets)
        retrieval.append(ranks)
        pool = top_k(scores, min(POOL, window.n_items))  # (b, K)
        for row, user in enumerate(users):
            candidates = pool[row]
            pool_scores = scores[row, candidates]
            finite = np.isfinite(pool_scores)
            candidates, pool_scores = candidates[finite], pool_scores[finite].astype(np.float32)
            context = model.context_features(list(ids[candidates]), pool_scores, float(window.times[start + row]))
            if context is None:
                context = live.features(candidates[None, :], pool_scores[None, :], None)[0]
            probability = model.score(user, None, vectors[candidates], text[candidates],
                                      np.zeros((len(candidates), model.image_dim), np.float32), context)
            order = candidates[np.lexsort((-pool_scores, -np.asarray(probability)))]
            hit = np.flatnonzero(order == targets[row])
            ranked_rank = int(hit[0]) if len(hit) else max(int(ranks[row]), len(order))
            reranked.append(ranked_rank)
            if table is not None and covisit_weight > 0.0:
                final.append(_fused_rank(order, scores[row], histories[row], table, covisit_weight,
                                         int(targets[row]), int(ranks[row])))
            else:
                final.append(ranked_rank)
    parts = {"": final, "ranked_": reranked, "retrieval_": np.concatenate(retrieval).tolist()}
    return {f"{prefix}{name}": round(float(value), 6) for prefix, values in parts.items()
            for name, value in ranking_metrics(np.asarray(values, dtype=np.int64)).items()}


def _fused_rank(order: np.ndarray, scores: np.ndarray, history: np.ndarray, table: CoVisitTable,
                weight: float, target: int, retrieval_rank: int) -> int:
    """0-based rank of ``target`` once the model's order (``order``, then the rest by retrieval
    ``scores``) is fused with the co-visit order of ``history``'s latest items."""
    seen = set(history.tolist())
    covisit = ranked(history_scores(table, history.tolist(), WINDOW), seen, COVISIT_CANDIDATES)
    if target in seen or not np.isfinite(scores[target]):
        return retrieval_rank  # MISSED: excluded
    # The model's order over every candidate: its ordered pool, then the rest by retrieval.
    in_pool = set(order.tolist())
    rest = [int(i) for i in np.argsort(-scores, kind="stable") if np.isfinite(scores[i]) and int(i) not in in_pool]
    relevance = fused_relevance(order.tolist() + rest, covisit, weight)
    mine = relevance[target]
    return sum(1 for value in relevance.values() if value > mine)
