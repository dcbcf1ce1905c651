"""Maximal marginal relevance: trade relevance for diversity in a ranked list."""
from __future__ import annotations

import numpy as np

BLOCK_LIMIT = 512  # the most candidates whose full similarity block is computed up front


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
    unit = (item_vectors / np.maximum(norms, 1e-12)).astype(np.float64)
    # A request re-ranks a pool of ~50: one (N, N) similarity block, then the
    # greedy loop reads rows of it. Over large N, one chosen row at a time
    # (k*N*d) instead of the whole block (N*N*d).
    block = unit @ unit.T if n <= BLOCK_LIMIT else None  # (N, N)

    chosen: list[int] = []
    max_similarity = np.zeros(n)
    available = np.ones(n, dtype=bool)
    relevance_gain = trade_off * scaled
    for step in range(k):
        gain = relevance_gain - (1.0 - trade_off) * max_similarity if step else relevance_gain.copy()
        gain[~available] = -np.inf
        best = int(np.argmax(gain))
        chosen.append(best)
        available[best] = False
        similarity = block[best] if block is not None else unit @ unit[best]
        max_similarity = np.maximum(max_similarity, similarity) if step else similarity
    return np.asarray(chosen, dtype=np.int64)
