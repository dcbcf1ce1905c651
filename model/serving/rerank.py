"""Maximal marginal relevance: trade relevance for diversity in a ranked list."""
from __future__ import annotations

import numpy as np


def mmr(relevance: np.ndarray, item_vectors: np.ndarray, k: int, trade_off: float) -> np.ndarray:
    """Pick ``k`` of N candidates greedily by ``trade_off * rel - (1 - trade_off) * max_sim``.

    relevance:    (N,) higher is better (any scale; rescaled to [0, 1] so the
                  trade-off means the same whatever produced the scores)
    item_vectors: (N, d) candidate vectors; similarity is their cosine
    trade_off:    1.0 = pure relevance order, 0.0 = pure novelty
    returns       (min(k, N),) int64 candidate positions, best first
    """
    relevance = np.asarray(relevance, dtype=np.float64)
    n = relevance.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if trade_off >= 1.0:
        # Stable sort: equal scores keep their input order, as the greedy loop would.
        return np.argsort(-relevance, kind="stable")[:k].astype(np.int64)
    spread = relevance.max() - relevance.min()
    scaled = (relevance - relevance.min()) / spread if spread > 0 else np.zeros(n)
    norms = np.linalg.norm(item_vectors, axis=1, keepdims=True)
    unit = item_vectors / np.maximum(norms, 1e-12)

    # Similarities are computed one chosen row at a time: k matrix-vector
    # products (k*N*d) instead of the full N x N matrix (N*N*d).
    chosen: list[int] = []
    max_similarity = np.zeros(n)
    available = np.ones(n, dtype=bool)
    for step in range(k):
        gain = trade_off * scaled - (1.0 - trade_off) * max_similarity if step else trade_off * scaled
        gain = np.where(available, gain, -np.inf)
        best = int(np.argmax(gain))
        chosen.append(best)
        available[best] = False
        max_similarity = np.maximum(max_similarity, unit @ unit[best]) if step else unit @ unit[best]
    return np.asarray(chosen, dtype=np.int64)
