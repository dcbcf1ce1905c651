"""The trained ranker split into an item-only part, computed once per item, and the rest.

The ranker's first layer reads, per candidate, ``user * fused``, ``user``,
``fused``, the text and photo projections, the context and the query match
(``model.nets.towers.Ranker``). Its pre-activation is a sum over those blocks,
so the blocks that depend on the item alone add up to one (hidden,) vector per
item::

    item_part = W_fused @ fused + W_text @ (P_text @ text + p_text)
                + W_image @ (P_image @ image + p_image)            # (hidden,)

kept in the item cache beside the item's vectors. A request then costs one
(N, d) x (d, hidden) product for the ``user * fused`` block (the user's
weights folded into that matrix), a (hidden,) user vector, the context, and
the small output layer, instead of reading every candidate's 384-d text and
1280-d photo vectors and projecting them again. The weights come from
``ranker_parts.npz``, written beside ``ranker.onnx`` by the export from the
same weights; ``tests/unit/test_ranker_parts.py`` holds the two to the same
scores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from model.serving.contract import CONTEXT_FEATURES, sigmoid

FILE_NAME = "ranker_parts.npz"
RETRIEVAL_SCORE = CONTEXT_FEATURES.index("retrieval_score")
_SQRT_HALF = np.float32(np.sqrt(0.5))


def erf(x: np.ndarray) -> np.ndarray:
    """Error function, |error| < 1.5e-7 (Abramowitz and Stegun 7.1.26); numpy has none."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def gelu(x: np.ndarray) -> np.ndarray:
    """torch's exact GELU: x * Phi(x)."""
    return 0.5 * x * (1.0 + erf(x * _SQRT_HALF))


class RankerParts:
    """``score`` equals the exported ranker's output; ``item_part`` is its per-item share."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        first = weights["mlp_0_weight"].astype(np.float32)  # (hidden, 3d + 2h + C + 1)
        d = int(weights["fused_dim"])
        hidden = int(weights["text_projection_weight"].shape[0])
        n_context = len(CONTEXT_FEATURES)
        blocks = np.cumsum([0, d, d, d, hidden, hidden, n_context, 1])
        w = [first[:, blocks[n]:blocks[n + 1]] for n in range(len(blocks) - 1)]
        self.fused_dim, self.hidden = d, hidden
        self._w_interaction, self._w_user, w_fused = w[0], w[1], w[2]  # (h, d) each
        # Item-only blocks folded into one map per input: (d|T|I, h) and a constant (h,).
        self._item_fused = w_fused.T.copy()
        self._item_text = (w[3] @ weights["text_projection_weight"]).T.astype(np.float32).copy()  # (T, h)
        self._item_image = (w[4] @ weights["image_projection_weight"]).T.astype(np.float32).copy()  # (I, h)
        self._item_bias = (w[3] @ weights["text_projection_bias"] + w[4] @ weights["image_projection_bias"]
                           ).astype(np.float32)
        self._w_context = w[5].T.copy()  # (C, h)
        self._w_query = w[6][:, 0].copy()  # (h,)
        self._bias = weights["mlp_0_bias"].astype(np.float32)
        self._context_mean = weights["context_mean"].astype(np.float32)
        self._context_scale = weights["context_scale"].astype(np.float32)
        self._out_weight = weights["mlp_2_weight"].astype(np.float32).reshape(hidden)
        self._out_bias = float(weights["mlp_2_bias"].reshape(()))
        self._blend = float(weights["blend"])
        self._score_weight = float(weights["score_weight"])
        self._score_bias = float(weights["bias"])
        self._query_weight = float(weights["query_weight"])

    @classmethod
    def load(cls, path: Path) -> "RankerParts":
        with np.load(path) as stored:
            return cls({key: stored[key] for key in stored.files})

    def item_part(self, fused: np.ndarray, text: np.ndarray, image: np.ndarray) -> np.ndarray:
        """(N, d), (N, T), (N, I) -> (N, hidden) float32: the item-only share of the first layer."""
        part = fused @ self._item_fused + text @ self._item_text + image @ self._item_image
        return (part + self._item_bias).astype(np.float32)

    def score(self, user_vector: np.ndarray, query_vector: np.ndarray | None, candidate_fused: np.ndarray,
              item_part: np.ndarray, candidate_text: np.ndarray | None, context: np.ndarray) -> np.ndarray:
        """(d,), (T,) or None, (N, d), (N, hidden), (N, T) or None, (N, C) -> (N,) click probabilities.

        ``candidate_text`` is read only with a query (the query match); without
        one the match is 0, as the full ranker computes it from a zero query.
        """
        user = np.asarray(user_vector, np.float32)
        query_match = (np.zeros(len(candidate_fused), np.float32) if query_vector is None or candidate_text is None
                       else candidate_text @ np.asarray(query_vector, np.float32))
        logit = (self._score_weight * context[:, RETRIEVAL_SCORE] + self._score_bias
                 + self._query_weight * query_match)
        # Blend 0: training found the learned correction no help on held-out users; it is left out.
        if self._blend != 0.0:
            interaction = (self._w_interaction * user[None, :]).T  # (d, h): W_i @ (u * f) = f @ (W_i * u).T
            scaled = (np.asarray(context, np.float32) - self._context_mean) / self._context_scale  # (N, C)
            pre = (candidate_fused @ interaction + item_part + scaled @ self._w_context
                   + query_match[:, None] * self._w_query[None, :]
                   + (self._w_user @ user + self._bias)[None, :])  # (N, h)
            correction = gelu(pre) @ self._out_weight + self._out_bias  # (N,)
            logit = logit + self._blend * correction
        return sigmoid(logit)
