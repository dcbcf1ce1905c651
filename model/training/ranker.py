"""Training of the ranker on the retrieval towers' own candidates.

The towers were fitted on items[:-2]; their scores on those positions are
over-confident, so the ranker learns from the *validation* step instead
(history items[:-2], target items[-2]): the same situation the served model is
in. Per user the candidates are the retrieval top-K (history removed); where
the target is among them it is the positive and other candidates are the
(hard) negatives. Users are split 90/10: the ranker fits on the first part;
the second picks the epoch and the blend of its correction, so that ranking
does not lose to plain retrieval there; a correction that gains less than
``min_gain`` there is left out (blend 0).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.nets.towers import Ranker, TowerConfig
from model.serving.contract import ItemContext
from model.training.data import left_pad
from model.training.metrics import exclude_history, ndcg, top_k
from model.training.retrieval import Catalogue, RetrievalModel

BLENDS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class RankerSettings:
    candidates: int = 50
    negatives: int = 24
    epochs: int = 8
    batch_size: int = 1024
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    holdout_share: float = 0.1
    seed: int = 7
    # The learned correction is served only when it raises the held-out users' NDCG@10 by at
    # least this share over retrieval's order; else blend 0, and serving skips it (its cost).
    min_gain: float = 0.01


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
        best_scores = np.take_along_axis(all_scores, best, axis=1)
        # A catalogue smaller than history + K pulls removed (-inf) items in:
        # give them a finite score below every real candidate.
        floor = np.where(np.isfinite(best_scores), best_scores, np.inf).min(axis=1, keepdims=True) - 1.0
        users.append(user.numpy())
        candidates.append(best)
        scores.append(np.where(np.isfinite(best_scores), best_scores, floor))
    candidate_items = np.concatenate(candidates)
    candidate_scores = np.concatenate(scores).astype(np.float32)
    return CandidateLists(
        users=np.concatenate(users),
        candidates=candidate_items,
        scores=candidate_scores,
        context=item_context.features(candidate_items, candidate_scores, request_times),
        targets=targets,
    )


@dataclass(frozen=True)
class RankerInputs:
    """Static per-item inputs of the ranker: vectors (N+1, d), text (N+1, T) or None,
    image (N+1, I) or None (zero rows for items without a photo, as a worker passes them)."""

    vectors: np.ndarray
    text: np.ndarray | None
    config: TowerConfig
    image: np.ndarray | None = None

    def batch(
        self, users: np.ndarray, items: np.ndarray, context: np.ndarray
    ) -> tuple[torch.Tensor, ...]:
        """Rows (R, d) users, (R,) items, (R, C) context -> the ranker's six inputs."""
        rows = len(items)
        text = (
            self.text[items]
            if self.text is not None
            else np.zeros((rows, self.config.text_dim), np.float32)
        )
        return (
            torch.from_numpy(users),
            torch.from_numpy(self.vectors[items]),
            torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32)),
            (torch.from_numpy(np.ascontiguousarray(self.image[items], dtype=np.float32))
             if self.image is not None else torch.zeros(rows, self.config.image_dim)),
            torch.zeros(rows, self.config.text_dim),
            torch.from_numpy(context),
        )


def training_rows(
    lists: CandidateLists, negatives: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The target + ``negatives`` other candidates of each list that holds its target.

    Only lists where retrieval found the target teach the ranker anything it
    will use: it only ever re-orders retrieved candidates.
    Returns (R,) user row, (R,) item, (R, C) context, (R,) label.
    """
    user_rows, items, contexts, labels = [], [], [], []
    for row, target in enumerate(lists.targets):
        slots = np.flatnonzero(lists.candidates[row] == target)
        if not len(slots):
            continue
        pool = np.flatnonzero(lists.candidates[row] != target)
        picked = np.concatenate([slots[:1], rng.choice(pool, size=min(negatives, len(pool)), replace=False)])
        user_rows.append(np.full(len(picked), row))
        items.append(lists.candidates[row, picked])
        contexts.append(lists.context[row, picked])
        labels.append(np.concatenate([[1.0], np.zeros(len(picked) - 1)]))
    if not items:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, lists.context.shape[-1]), np.float32), np.zeros(0, np.float32)
    return (
        np.concatenate(user_rows),
        np.concatenate(items),
        np.concatenate(contexts),
        np.concatenate(labels).astype(np.float32),
    )


@torch.no_grad()
def reranked(ranker: Ranker, lists: CandidateLists, inputs: RankerInputs, blend: float) -> np.ndarray:
    """(U, K) each list's candidates in the ranker's order at ``blend``."""
    ranker.blend.fill_(blend)
    users, k = lists.candidates.shape
    rows = np.repeat(np.arange(users), k)
    logits = ranker.logits(
        *inputs.batch(lists.users[rows], lists.candidates.reshape(-1), lists.context.reshape(users * k, -1))
    ).numpy().reshape(users, k)
    order = np.argsort(-logits, axis=1, kind="stable")
    return np.take_along_axis(lists.candidates, order, axis=1)


def rerank_ranks(ranker: Ranker, lists: CandidateLists, inputs: RankerInputs, blend: float) -> np.ndarray:
    """0-based rank of each target after re-ranking its top K (K or more when absent)."""
    hits = reranked(ranker, lists, inputs, blend) == lists.targets[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), lists.candidates.shape[1]).astype(np.int64)


def holdout_split(count: int, settings: RankerSettings) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows) of ``count`` users, both sorted; the same for the same settings."""
    order = np.random.default_rng(settings.seed).permutation(count)
    n_holdout = max(1, int(settings.holdout_share * count))
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


def train_ranker(
    config: TowerConfig,
    settings: RankerSettings,
    lists: CandidateLists,
    inputs: RankerInputs,
    progress: bool = True,
) -> tuple[Ranker, dict[str, float]]:
    """Fit the ranker on most users' validation step; keep the epoch and pick the
    blend that re-rank best on the held-out rest."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    fit_rows, holdout_rows = holdout_split(len(lists.targets), settings)
    fit, holdout = subset(lists, fit_rows), subset(lists, holdout_rows)

    ranker = Ranker(config)
    all_context = fit.context.reshape(-1, fit.context.shape[-1])
    ranker.context_mean.copy_(torch.from_numpy(all_context.mean(axis=0)))
    ranker.context_scale.copy_(torch.from_numpy(all_context.std(axis=0) + 1e-3))
    optimizer = torch.optim.AdamW(ranker.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    loss_function = nn.BCEWithLogitsLoss()
    best_ndcg, best_state = ndcg(rerank_ranks(ranker, holdout, inputs, 0.0), 10), copy.deepcopy(ranker.state_dict())
    for _ in tqdm(range(settings.epochs), desc="ranker", disable=not progress, unit="epoch"):
        ranker.train()
        user_rows, items, contexts, labels = training_rows(fit, settings.negatives, rng)
        shuffled = rng.permutation(len(items))
        for start in range(0, len(shuffled), settings.batch_size):
            rows = shuffled[start : start + settings.batch_size]
            logits = ranker.logits(*inputs.batch(fit.users[user_rows[rows]], items[rows], contexts[rows]))
            loss = loss_function(logits, torch.from_numpy(labels[rows]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        ranker.eval()
        epoch_ndcg = ndcg(rerank_ranks(ranker, holdout, inputs, 1.0), 10)
        if epoch_ndcg > best_ndcg:
            best_ndcg, best_state = epoch_ndcg, copy.deepcopy(ranker.state_dict())
    ranker.load_state_dict(best_state)
    ranker.eval()
    holdout_ndcg = {blend: ndcg(rerank_ranks(ranker, holdout, inputs, blend), 10) for blend in BLENDS}
    best_blend = choose_blend(holdout_ndcg, settings.min_gain)
    reset = float(ranker.score_weight.detach()) <= 0.0
    if reset:
        best_blend = 0.0  # a non-positive score weight would invert retrieval; never serve that
        ranker.score_weight.data.fill_(1.0)
    ranker.blend.fill_(best_blend)
    report = {f"holdout_ndcg@10_blend_{blend}": value for blend, value in holdout_ndcg.items()}
    report.update(blend=best_blend, holdout_users=float(len(holdout.targets)), score_weight_reset=float(reset))
    return ranker, report


def choose_blend(holdout_ndcg: dict[float, float], min_gain: float) -> float:
    """The blend with the best held-out NDCG@10 (ties: the smaller), or 0 when that gains less than
    ``min_gain`` (a share) over blend 0: no correction unless it earns its place."""
    best = max(holdout_ndcg, key=lambda blend: (round(holdout_ndcg[blend], 6), -blend))
    return best if holdout_ndcg[best] >= holdout_ndcg[0.0] * (1.0 + min_gain) else 0.0


def rechoose_blend(ranker: Ranker, lists: CandidateLists, inputs: RankerInputs, min_gain: float) -> dict[str, float]:
    """Choose the blend again on ``lists``: the same held-out users' validation step, retrieved by
    towers that changed since the ranker was fitted (fine-tuning on the newest step moves the
    scores and vectors it reads). Sets it on ``ranker``; returns the held-out NDCG@10 per blend."""
    holdout_ndcg = {blend: ndcg(rerank_ranks(ranker, lists, inputs, blend), 10) for blend in BLENDS}
    blend = choose_blend(holdout_ndcg, min_gain)
    ranker.blend.fill_(blend)
    report = {f"holdout_ndcg@10_blend_{b}": value for b, value in holdout_ndcg.items()}
    return {**report, "blend": blend}


def subset(lists: CandidateLists, rows: np.ndarray) -> CandidateLists:
    return CandidateLists(
        users=lists.users[rows],
        candidates=lists.candidates[rows],
        scores=lists.scores[rows],
        context=lists.context[rows],
        targets=lists.targets[rows],
    )
