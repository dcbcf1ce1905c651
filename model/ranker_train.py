"""Training of the ranker on the retrieval towers' own candidates.

The towers were fitted on items[:-2]; their scores on those positions are
over-confident, so the ranker learns from the *validation* step instead
(history items[:-2], target items[-2]): the same situation the served model is
in. Per user the candidates are the retrieval top-K (history removed); the
target is the positive, negatives are drawn from those hard candidates. Users
are split 90/10: the ranker fits on the first part, and the blend of its
correction is chosen on the second so that ranking does not lose to retrieval.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.data import LeaveOneOut, left_pad
from model.metrics import exclude_history, ndcg, top_k
from model.retrieval_train import Catalogue, RetrievalModel
from model.serving import CONTEXT_FEATURES
from model.towers import Ranker, TowerConfig

BLENDS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class RankerSettings:
    candidates: int = 50
    negatives: int = 15
    epochs: int = 6
    batch_size: int = 1024
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    holdout_share: float = 0.1
    seed: int = 7


@dataclass(frozen=True)
class ItemContext:
    """What the context features are computed from.

    popularity: (N+1,) training interactions per item
    last_seen:  (N+1,) seconds of the item's latest training interaction, or None without times
    """

    popularity: np.ndarray
    last_seen: np.ndarray | None = None

    def features(
        self, candidates: np.ndarray, retrieval_scores: np.ndarray, request_times: np.ndarray | None
    ) -> np.ndarray:
        """(U, K) item indices, (U, K) scores, (U,) seconds or None -> (U, K, len(CONTEXT_FEATURES))."""
        log_popularity = np.log1p(self.popularity[candidates].astype(np.float32))
        recency = np.zeros_like(log_popularity)
        if self.last_seen is not None and request_times is not None:
            age = request_times[:, None] - self.last_seen[candidates]
            recency = (np.clip(age, 0.0, None) / SECONDS_PER_DAY).astype(np.float32)
        columns = {"log_popularity": log_popularity, "recency_days": recency, "retrieval_score": retrieval_scores}
        return np.stack([columns[name].astype(np.float32) for name in CONTEXT_FEATURES], axis=-1)


@dataclass
class CandidateLists:
    """Retrieval output for a set of users: everything the ranker needs.

    users (U, d), candidates (U, K) item indices best first, scores (U, K),
    context (U, K, C), targets (U,)
    """

    users: np.ndarray
    candidates: np.ndarray
    scores: np.ndarray
    context: np.ndarray
    targets: np.ndarray


@torch.no_grad()
def retrieve(
    model: RetrievalModel,
    catalogue: Catalogue,
    histories: list[np.ndarray],
    targets: np.ndarray,
    item_context: ItemContext,
    request_times: np.ndarray | None,
    config: TowerConfig,
    train_action: int,
    k: int,
    chunk: int = 1024,
) -> CandidateLists:
    model.eval()
    vectors = model.catalogue_vectors(catalogue)  # (N+1, d)
    users, candidates, scores = [], [], []
    for start in range(0, len(histories), chunk):
        batch = histories[start : start + chunk]
        items = torch.from_numpy(left_pad(batch, config.max_sequence))
        user = model.user_tower(vectors[items], torch.where(items > 0, train_action, 0))  # (b, d)
        all_scores = exclude_history((user @ vectors.T).numpy(), batch)  # (b, N+1)
        best = top_k(all_scores, k)
        users.append(user.numpy())
        candidates.append(best)
        scores.append(np.take_along_axis(all_scores, best, axis=1))
    candidate_items = np.concatenate(candidates)
    candidate_scores = np.concatenate(scores).astype(np.float32)
    return CandidateLists(
        users=np.concatenate(users),
        candidates=candidate_items,
        scores=candidate_scores,
        context=item_context.features(candidate_items, candidate_scores, request_times),
        targets=targets,
    )


def _ranker_rows(
    lists: CandidateLists, vectors: np.ndarray, negatives: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positive + sampled hard negatives per user -> (user rows, items, context, labels, user index)."""
    user_rows, items, contexts, labels = [], [], [], []
    for row in range(len(lists.targets)):
        target = lists.targets[row]
        hard = lists.candidates[row]
        pool = np.flatnonzero(hard != target)
        picked = rng.choice(pool, size=min(negatives, len(pool)), replace=False)
        target_slot = np.flatnonzero(hard == target)
        if len(target_slot):
            target_context = lists.context[row, target_slot[0]]
        else:
            # Target outside the top K: its context with its own retrieval score.
            score = float(lists.users[row] @ vectors[target])
            target_context = lists.context[row, 0].copy()
            target_context[list(CONTEXT_FEATURES).index("retrieval_score")] = score
            target_context[0] = lists.context[row, 0, 0] * 0 + np.log1p(0.0)  # replaced below
        items.append(np.concatenate([[target], hard[picked]]))
        contexts.append(np.concatenate([target_context[None], lists.context[row, picked]]))
        labels.append(np.concatenate([[1.0], np.zeros(len(picked))]))
        user_rows.append(np.full(len(picked) + 1, row))
    return (
        np.concatenate(user_rows),
        np.concatenate(items),
        np.concatenate(contexts).astype(np.float32),
        np.concatenate(labels).astype(np.float32),
        np.concatenate(user_rows),
    )
