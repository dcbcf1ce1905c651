"""Leave-one-out evaluation of popularity baselines and trained artefacts.

Protocols (see ``model.training.metrics`` for the shared tie and exclusion rules):
- ``full``: the target is ranked against every item, the user's input history removed;
- ``sampled``: the target is ranked against 99 uniformly drawn items the user never
  touched (fixed seed), as in the published sampled tables.

A trained artefact is evaluated exactly as the stream serves it: item and user
vectors from the ONNX towers, retrieval by dot product, then the ONNX ranker
re-orders the top ``candidates`` (ties in probability fall back to retrieval order).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.errors import ConfigError
from model.serving.contract import ItemContext
from model.serving.covisit import build_table, fused_relevance, history_scores, ranked
from model.serving.rerank import mmr
from model.serving.trained import TrainedModel
from model.training.data import (
    InteractionData,
    LeaveOneOut,
    item_counts,
    left_pad,
    unsplit_sequences,
)
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

MODELS: tuple[str, ...] = ("pop", "pop-all", "trained")
PROTOCOLS: tuple[str, ...] = ("full", "sampled")
LIST_LENGTH = 10
SWEEP_TRADE_OFFS: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.5, 0.3)
SWEEP_POOL = 50
CHUNK = 512


@dataclass
class Evaluation:
    """Metrics of one model on one split, plus what diversity analyses need.

    ranks (U,) final 0-based target ranks; top (U, pool) final lists best first;
    relevance (U, pool) the final scores of those lists; item_vectors (N+1, F)
    the space MMR measures similarity in.
    """

    metrics: dict[str, float]
    ranks: np.ndarray
    top: np.ndarray
    relevance: np.ndarray
    item_vectors: np.ndarray
    extra: dict[str, float] = field(default_factory=dict)


def attribute_space(data: InteractionData) -> np.ndarray:
    """(N+1, n_attributes+1) multi-hot attributes: a model-free space for diversity."""
    space = np.zeros((data.n_items + 1, data.n_attributes + 1), dtype=np.float32)
    rows = np.repeat(np.arange(data.n_items + 1), data.attributes.shape[1])
    space[rows, data.attributes.reshape(-1)] = 1.0
    space[:, 0] = 0.0
    return space


def request_times(data: InteractionData, split: LeaveOneOut, split_name: str) -> np.ndarray | None:
    """(U,) time of each user's last input interaction, when the data has times."""
    if data.timestamps is None:
        return None
    offset = 3 if split_name == "valid" else 2
    return np.asarray([data.timestamps[u][-offset] for u in split.users], dtype=np.float64)


def _sampled_candidates(data: InteractionData, split: LeaveOneOut, split_name: str, seed: int) -> np.ndarray:
    """(U, 100): target in column 0, then 99 negatives."""
    negatives = sample_negatives(split.full, data.n_items, 99, seed)
    return np.concatenate([split.targets(split_name)[:, None], negatives], axis=1)


def evaluate_popularity(
    data: InteractionData, split: LeaveOneOut, split_name: str, protocol: str, kind: str, seed: int = 0
) -> Evaluation:
    """``pop``: counts over training items; ``pop-all``: over every interaction (leaks the test item)."""
    counts = item_counts(split.full if kind == "pop-all" else split.train, data.n_items).astype(np.float64)
    inputs, targets = split.inputs(split_name), split.targets(split_name)
    space = attribute_space(data)
    if protocol == "sampled":
        candidates = _sampled_candidates(data, split, split_name, seed)
        scores = counts[candidates]
        ranks = sampled_ranks(scores, candidates)
        order = np.lexsort((candidates, -scores), axis=1)[:, :SWEEP_POOL]
        top = np.take_along_axis(candidates, order, axis=1)
        return Evaluation(ranking_metrics(ranks), ranks, top, np.take_along_axis(scores, order, axis=1), space)
    # One global order serves every user: rank = global position minus the
    # history items ahead of the target (no (U, N) score matrix needed).
    order = np.lexsort((np.arange(len(counts)), -counts))
    order = order[order != 0]
    position = np.empty(len(counts), dtype=np.int64)
    position[order] = np.arange(len(order))
    ranks = np.zeros(len(targets), dtype=np.int64)
    width = min(SWEEP_POOL, data.n_items)
    top = np.zeros((len(targets), width), dtype=np.int64)  # 0 pads lists of tiny catalogues
    for row, (history, target) in enumerate(zip(inputs, targets)):
        seen = set(history.tolist())
        if target in seen:
            ranks[row] = MISSED
        else:
            ranks[row] = position[target] - sum(1 for item in seen if position[item] < position[target])
        kept = [item for item in order[: width + len(seen)].tolist() if item not in seen][:width]
        top[row, : len(kept)] = kept
    relevance = counts[top]
    return Evaluation(ranking_metrics(ranks), ranks, top, relevance, space)


def _final_order(probabilities: np.ndarray, retrieval_scores: np.ndarray) -> np.ndarray:
    """(U, K) column order: by click probability, ties (sigmoid saturation) by retrieval score."""
    return np.lexsort((-retrieval_scores, -probabilities), axis=1)


def evaluate_trained(
    model: TrainedModel,
    data: InteractionData,
    split: LeaveOneOut,
    split_name: str,
    protocol: str,
    seed: int = 0,
    candidates: int | None = None,
    covisits: bool = False,
) -> Evaluation:
    """Retrieval + ranker through the artefact's ONNX networks.

    With ``covisits`` (full protocol, an artefact whose co-visit weight is above 0) the
    ranker's order is then fused with co-visits as a worker fuses them
    (``model.serving.covisit``), from a table of what the requests' inputs hold: the
    evaluated users' input sequences and the sequences too short for the split, so no
    evaluated target is in it. ``extra`` then also holds the networks' own figures
    (``networks_*``) beside the retrieval stage's (``retrieval_*``).
    """
    k = candidates or int(model.config.get("ranker", {}).get("candidates", SWEEP_POOL))
    k = max(k, SWEEP_POOL) if protocol == "full" else k
    inputs, targets = split.inputs(split_name), split.targets(split_name)
    times = request_times(data, split, split_name)
    item_context = ItemContext(model.popularity, model.last_seen)
    vectors = model.catalogue_vectors()  # (N+1, d)
    stored = model.catalogue_content(np.arange(model.n_items + 1))
    text, image = stored.text, stored.image  # what a worker holds for each item (zero rows: none)
    sampled = _sampled_candidates(data, split, split_name, seed) if protocol == "sampled" else None

    retrieval_ranks, final_ranks, tops, relevance, pools = [], [], [], [], []
    for start in range(0, len(inputs), CHUNK):
        histories = inputs[start : start + CHUNK]
        batch_targets = targets[start : start + CHUNK]
        items = left_pad(histories, model.max_sequence)
        users = model.user_vectors(vectors[items], np.where(items > 0, model.train_action, 0))  # (b, d)
        if sampled is None:
            scores = exclude_history(users @ vectors.T, histories)  # (b, N+1)
            retrieval_ranks.append(target_ranks(scores, batch_targets))
            pool = top_k(scores, k)  # (b, K)
            pool_scores = np.take_along_axis(scores, pool, axis=1)
        else:
            pool = sampled[start : start + CHUNK]  # (b, 100), target first
            pool_scores = np.einsum("bd,bkd->bk", users, vectors[pool])
            retrieval_ranks.append(sampled_ranks(pool_scores, pool))
        batch_times = None if times is None else times[start : start + CHUNK]
        # Tiny catalogues can pull removed (-inf) items into the pool: keep them last.
        removed = ~np.isfinite(pool_scores)
        pool_scores = np.where(removed, np.finfo(np.float32).min, pool_scores)
        context = item_context.features(pool, np.where(removed, 0.0, pool_scores).astype(np.float32), batch_times)
        b, width = pool.shape
        rows = np.repeat(np.arange(b), width)
        probabilities = model.score_rows(
            users[rows],
            np.zeros((b * width, model.text_dim), np.float32),
            vectors[pool.reshape(-1)],
            text[pool.reshape(-1)],
            image[pool.reshape(-1)],
            context.reshape(b * width, -1),
        ).reshape(b, width)
        probabilities = np.where(removed, -1.0, probabilities)
        order = _final_order(probabilities, pool_scores)
        reordered = np.take_along_axis(pool, order, axis=1)
        hits = reordered == batch_targets[:, None]
        found = hits.any(axis=1)
        if sampled is None:
            # Targets the re-ranked pool does not hold keep their retrieval rank (>= K).
            final = np.where(found, hits.argmax(axis=1), np.maximum(retrieval_ranks[-1], k))
            final = np.where(retrieval_ranks[-1] == MISSED, MISSED, final)
        else:
            final = hits.argmax(axis=1)
        final_ranks.append(final.astype(np.int64))
        tops.append(reordered[:, :SWEEP_POOL])
        pools.append(reordered)
        relevance.append(np.take_along_axis(probabilities, order, axis=1)[:, :SWEEP_POOL])

    ranks = np.concatenate(final_ranks)
    retrieval = ranking_metrics(np.concatenate(retrieval_ranks))
    extra = {f"retrieval_{name}": value for name, value in retrieval.items()}
    top, relevance_top = np.concatenate(tops), np.concatenate(relevance)
    if covisits and sampled is None and model.covisit_weight > 0:
        extra.update({f"networks_{name}": value for name, value in ranking_metrics(ranks).items()})
        extra["covisit_weight"] = model.covisit_weight
        ranks, top, relevance_top = _fuse_covisits(model.covisit_weight, data, split, split_name, inputs, targets,
                                                   np.concatenate(pools), ranks)
    return Evaluation(ranking_metrics(ranks), ranks, top, relevance_top, vectors, extra)


def covisit_sequences(data: InteractionData, split: LeaveOneOut, split_name: str) -> list[np.ndarray]:
    """What a co-visit table may learn from when ``split_name``'s targets are asked for: every
    evaluated user's input sequence and the whole of the sequences too short for the split."""
    return list(split.inputs(split_name)) + unsplit_sequences(data, split)


def _fuse_covisits(weight: float, data: InteractionData, split: LeaveOneOut, split_name: str,
                   inputs: list[np.ndarray], targets: np.ndarray, orders: np.ndarray,
                   ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ranks, top-50 lists, their relevance) after fusing each order with the user's co-visits."""
    table = build_table(covisit_sequences(data, split, split_name), data.n_items)
    fused_ranks = ranks.copy()
    top = np.zeros((len(targets), SWEEP_POOL), dtype=np.int64)
    relevance = np.zeros((len(targets), SWEEP_POOL), dtype=np.float32)
    for row, (history, target) in enumerate(zip(inputs, targets)):
        order = orders[row].tolist()
        seen = set(history.tolist())
        covisit = ranked(history_scores(table, history.tolist()), seen, len(order))
        scores = fused_relevance(order, covisit, weight)
        fused = ranked(scores, limit=len(scores))
        if ranks[row] != MISSED:
            # A target neither list holds keeps its rank from before (>= the pool's length).
            fused_ranks[row] = fused.index(int(target)) if int(target) in scores else max(ranks[row], len(fused))
        head = fused[:SWEEP_POOL]
        top[row, : len(head)] = head
        relevance[row, : len(head)] = [scores[item] for item in head]
    return fused_ranks, top, relevance


def diversity(evaluation: Evaluation, diversity_space: np.ndarray, n_items: int) -> dict[str, float]:
    """Intra-list diversity (attribute space) and catalogue coverage of the top-10 lists."""
    top = evaluation.top[:, :LIST_LENGTH]
    return {
        "intra_list_diversity": intra_list_diversity(top, diversity_space),
        "coverage": coverage(top, n_items),
    }


def diversity_sweep(
    evaluation: Evaluation,
    targets: np.ndarray,
    diversity_space: np.ndarray,
    n_items: int,
    trade_offs: tuple[float, ...] = SWEEP_TRADE_OFFS,
) -> list[dict[str, float]]:
    """Re-rank each final top-50 with MMR at several trade-offs; accuracy vs diversity."""
    rows = []
    for trade_off in trade_offs:
        lists = np.zeros((len(targets), LIST_LENGTH), dtype=np.int64)
        for user in range(len(targets)):
            pool = evaluation.top[user]
            picked = mmr(evaluation.relevance[user], evaluation.item_vectors[pool], LIST_LENGTH, trade_off)
            lists[user, : len(picked)] = pool[picked]
        hits = lists == targets[:, None]
        ranks = np.where(hits.any(axis=1), hits.argmax(axis=1), MISSED)
        row = {"trade_off": trade_off, "hr@10": ranking_metrics(ranks, (10,))["hr@10"]}
        row["ndcg@10"] = ranking_metrics(ranks, (10,))["ndcg@10"]
        row["intra_list_diversity"] = intra_list_diversity(lists, diversity_space)
        row["coverage"] = coverage(lists, n_items)
        rows.append(row)
    return rows


def check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; expected one of {choices}")
    return value
