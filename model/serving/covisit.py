"""Item-to-item transitions ("bought next"): a table learnt from interaction
sequences, and how its suggestions join the model's ranking.

An item followed by another within ``WINDOW`` steps of the same user adds
``1 / distance`` to that pair, and half of it to the reverse pair (items bought
together are close both ways, the order of purchase still counts more). Each
item keeps its ``NEIGHBOURS`` heaviest successors. A user's co-visit score of
an item is the sum over the user's last ``WINDOW`` items of their table
weights, the latest counting most (``1 / recency``).

The trainer builds the table from the training sequences and stores it in the
artefact (``transitions.npz``); serving workers add what the stream teaches
them since (``stream.covisit``). The final order fuses the model's ranking and
the co-visit ranking by reciprocal rank: ``1 / (RRF_OFFSET + model rank) +
weight / (RRF_OFFSET + co-visit rank)``, with ``weight`` chosen by the trainer
on held-out users (0 when co-visits do not help).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WINDOW = 3
BACKWARD_SHARE = 0.5
NEIGHBOURS = 100
RRF_OFFSET = 60.0
# Fusion weights the trainer tries; up to 4 because on Amazon Toys the
# held-out NDCG@10 was still rising at 2 (docs/model.md).
WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
FILE_NAME = "transitions.npz"


@dataclass(frozen=True)
class CoVisitTable:
    """Successors of each item index in CSR form: row ``i`` is
    ``indices[indptr[i]:indptr[i+1]]`` with ``weights`` alike, heaviest first."""

    indptr: np.ndarray  # (n_rows + 1,) int64
    indices: np.ndarray  # (nnz,) int64
    weights: np.ndarray  # (nnz,) float32

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def row(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= item < self.n_rows:
            return self.indices[:0], self.weights[:0]
        start, end = self.indptr[item], self.indptr[item + 1]
        return self.indices[start:end], self.weights[start:end]

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source, target, weight) of every stored entry."""
        sources = np.repeat(np.arange(self.n_rows, dtype=np.int64), np.diff(self.indptr))
        return sources, self.indices, self.weights

    def save(self, path: Path) -> None:
        np.savez_compressed(path, indptr=self.indptr, indices=self.indices, weights=self.weights)

    @classmethod
    def load(cls, path: Path) -> CoVisitTable:
        with np.load(path) as stored:
            table = cls(stored["indptr"].astype(np.int64), stored["indices"].astype(np.int64),
                        stored["weights"].astype(np.float32))
        if len(table.indices) != len(table.weights) or table.indptr[-1] != len(table.indices):
            raise ValueError(f"{path}: inconsistent transition table")
        return table


def sequence_pairs(sequences: Sequence[np.ndarray], window: int = WINDOW,
                   fresh: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, ...]:
    """(source, target, weight) of every transition in ``sequences`` (item indices > 0).

    ``fresh``: per sequence, which positions are new; only transitions into a
    new position count (the older ones are already in a table being extended).
    """
    sources, targets, weights = [], [], []
    for distance in range(1, window + 1):
        for n, sequence in enumerate(sequences):
            sequence = np.asarray(sequence, dtype=np.int64)
            if len(sequence) <= distance:
                continue
            before, after = sequence[:-distance], sequence[distance:]
            keep = (before > 0) & (after > 0) & (before != after)
            if fresh is not None:
                keep &= np.asarray(fresh[n], dtype=bool)[distance:]
            before, after = before[keep], after[keep]
            forward = np.full(len(before), 1.0 / distance, np.float32)
            sources += [before, after]
            targets += [after, before]
            weights += [forward, forward * BACKWARD_SHARE]
    if not sources:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    return np.concatenate(sources), np.concatenate(targets), np.concatenate(weights)


def table_from_pairs(sources: np.ndarray, targets: np.ndarray, weights: np.ndarray, n_rows: int,
                     neighbours: int = NEIGHBOURS) -> CoVisitTable:
    """Sum the weights of equal pairs and keep each row's ``neighbours`` heaviest."""
    if len(sources) == 0:
        return CoVisitTable(np.zeros(n_rows + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    keys = sources.astype(np.int64) * n_rows + targets.astype(np.int64)
    unique, inverse = np.unique(keys, return_inverse=True)
    summed = np.bincount(inverse, weights=weights.astype(np.float64)).astype(np.float32)
    rows, columns = unique // n_rows, unique % n_rows
    # Heaviest first within a row, ties by item index; then keep the first ``neighbours``.
    order = np.lexsort((columns, -summed, rows))
    rows, columns, summed = rows[order], columns[order], summed[order]
    starts = np.searchsorted(rows, np.arange(n_rows))
    rank = np.arange(len(rows)) - starts[rows]
    keep = rank < neighbours
    rows, columns, summed = rows[keep], columns[keep], summed[keep]
    indptr = np.zeros(n_rows + 1, np.int64)
    indptr[1:] = np.cumsum(np.bincount(rows, minlength=n_rows))
    return CoVisitTable(indptr, columns.astype(np.int64), summed)


def build_table(sequences: Sequence[np.ndarray], n_items: int, window: int = WINDOW,
                neighbours: int = NEIGHBOURS, base: CoVisitTable | None = None,
                fresh: Sequence[np.ndarray] | None = None) -> CoVisitTable:
    """The transition table of ``sequences`` over item indices 1..n_items, plus ``base``'s entries."""
    sources, targets, weights = sequence_pairs(sequences, window, fresh)
    if base is not None:
        base_sources, base_targets, base_weights = base.pairs()
        sources = np.concatenate([base_sources, sources])
        targets = np.concatenate([base_targets, targets])
        weights = np.concatenate([base_weights, weights])
    return table_from_pairs(sources, targets, weights, n_items + 1, neighbours)


def history_scores(table: CoVisitTable, history: Sequence[int], window: int = WINDOW) -> dict[int, float]:
    """Co-visit score of every successor of the user's last ``window`` items."""
    scores: dict[int, float] = {}
    for recency, item in enumerate(reversed(list(history)[-window:]), start=1):
        indices, weights = table.row(int(item))
        for index, weight in zip(indices.tolist(), weights.tolist()):
            scores[index] = scores.get(index, 0.0) + weight / recency
    return scores


def ranked(scores: dict, exclude: set | frozenset = frozenset(), limit: int = 50) -> list:
    """The ``limit`` best keys of ``scores`` not in ``exclude``, best first (ties by key)."""
    best = sorted((key for key in scores if key not in exclude), key=lambda key: (-scores[key], key))
    return best[:limit]


def fused_relevance(model_order: Sequence, covisit_order: Sequence, weight: float) -> dict:
    """Reciprocal-rank fusion of the model's order and the co-visit order -> relevance per key."""
    relevance = {key: 1.0 / (RRF_OFFSET + rank) for rank, key in enumerate(model_order)}
    if weight > 0.0:
        for rank, key in enumerate(covisit_order):
            relevance[key] = relevance.get(key, 0.0) + weight / (RRF_OFFSET + rank)
    return relevance


def fused_rank(model_order: Sequence[int], covisit_order: Sequence[int], weight: float, target: int) -> int:
    """0-based rank of ``target`` in the fused order; ``len(union)`` when neither list holds it."""
    relevance = fused_relevance(model_order, covisit_order, weight)
    order = ranked(relevance, limit=len(relevance))
    return order.index(target) if target in relevance else len(order)
