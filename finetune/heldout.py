"""One evaluation for any served model on the newest held-out interactions.

The fine-tuner compares a candidate with whatever serves: a trained version or
the content rule model. Both are asked through the ``ServingModel`` contract
only, the way a worker asks them: item vectors from each item's content (the
text of the fields the model reads, its id), user vectors from the user's
items and actions, retrieval by dot product over the same items with the
user's history removed, then the model's scorer re-orders the best
``POOL`` (context from the model itself, or, for a model that learnt none,
from the window's own counts as a worker's live counts would give it).

Returns HR and NDCG at 10 and 20 of the final order, and the same of
retrieval alone (``retrieval_*``): the ranker is kept only where it beats it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.serving.contract import ItemContent, ItemContext
from model.training.data import LeaveOneOut, item_counts, left_pad
from model.training.metrics import exclude_history, ranking_metrics, target_ranks, top_k

POOL = 50


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


def evaluate(model, content: dict[tuple[str, ...], ItemContent], window: Window) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """``content[fields]``: the N items (index 1..N) with text embedded from ``fields``."""
    items = content[tuple(model.text_fields)]
    vectors = np.zeros((window.n_items + 1, model.fused_dim), np.float32)
    vectors[1:] = model.item_vectors(items)
    text = np.zeros((window.n_items + 1, model.text_dim), np.float32)
    text[1:] = items.text
    ids = np.asarray([""] + list(items.item_ids), dtype=object)
    # A model without learnt context is served with the live counts: the window's inputs stand in.
    live = ItemContext(item_counts(window.histories, window.n_items).astype(np.float64), None)
    length = model.max_sequence
    retrieval, final = [], []
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
            ranked = candidates[np.lexsort((-pool_scores, -np.asarray(probability)))]
            hit = np.flatnonzero(ranked == targets[row])
            final.append(int(hit[0]) if len(hit) else max(int(ranks[row]), len(ranked)))
    metrics = ranking_metrics(np.asarray(final, dtype=np.int64))
    alone = ranking_metrics(np.concatenate(retrieval))
    return {key: round(float(value), 6) for key, value in
            {**metrics, **{f"retrieval_{name}": value for name, value in alone.items()}}.items()}
