"""The co-visit fusion weight a trained artefact serves with, chosen on held-out requests."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.serving.covisit import (
    WEIGHTS,
    CoVisitTable,
    fused_rank,
    history_scores,
    ranked,
)
from model.training.metrics import ndcg


def choose_weight(model_orders: Sequence[Sequence[int]], histories: Sequence[Sequence[int]],
                  targets: Sequence[int], table: CoVisitTable, k: int = 10) -> tuple[float, dict[str, float]]:
    """The fusion weight with the best NDCG@k on held-out requests (ties: the smaller weight).

    ``model_orders``: the model's final order of each request's candidates;
    ``histories``: what each user did before (excluded from the co-visit list).
    """
    covisit_orders = [ranked(history_scores(table, history), set(history), len(order) or 50)
                      for order, history in zip(model_orders, histories)]
    report: dict[str, float] = {}
    for weight in WEIGHTS:
        ranks = np.asarray([fused_rank(order, covisit, weight, int(target))
                            for order, covisit, target in zip(model_orders, covisit_orders, targets)])
        report[f"holdout_ndcg@{k}_covisit_{weight:g}"] = ndcg(ranks, k)
    best = max(WEIGHTS, key=lambda weight: (round(report[f"holdout_ndcg@{k}_covisit_{weight:g}"], 6), -weight))
    return best, report
