"""The content rule model: serves before any model has been trained.

Item vectors live in the text space: ``normalise(text + image_weight * P image)``
where ``P`` is a fixed, seeded Gaussian projection of the 1280-d image features
to the text dimension (random projections keep distances, so photos that look
alike stay close). A user vector is the recency- and action-weighted mean of the
vectors of the user's recent interactions. The scorer is a fixed logistic model
over dot products and context, exported to ONNX like every served network, so
the serving path is the same one a trained ranker uses.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from model.serving.contract import (
    ACTION_CODE,
    CONTENT_TEXT_FIELDS,
    ItemContent,
    sigmoid,
)

RULE_VERSION = "rule-3"
IMAGE_WEIGHT = 0.5
PROJECTION_SEED = 20240611
# How much each action says about intent (index = action code).
ACTION_WEIGHTS = np.array([0.0, 0.5, 1.0, 2.0, 3.0, 1.0], dtype=np.float32)
RECENCY_DECAY = 0.85  # weight of the k-th most recent interaction: decay**k


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def image_projection(text_dim: int, image_dim: int) -> np.ndarray:
    rng = np.random.default_rng(PROJECTION_SEED)
    return (rng.standard_normal((image_dim, text_dim)) / np.sqrt(text_dim)).astype(np.float32)


class RuleModel:
    """``ServingModel`` for the content rule model."""

    version = RULE_VERSION
    max_sequence = 50
    text_fields = CONTENT_TEXT_FIELDS
    rank_pool = None  # the rule scorer was not fitted on any candidate pool
    transitions = None  # no training data; co-visits come from the stream alone
    covisit_weight = 1.0  # nothing held out to choose by: the two rankings count alike

    def __init__(self, model_dir: Path, *, text_dim: int = 384, image_dim: int = 1280,
                 threads: int = 1) -> None:
        from model.serving.runtime import load_session

        config = json.loads((model_dir / "config.json").read_text())
        self.config: dict[str, Any] = config  # kind and dimensions; no encoders to check
        # No item ids were learnt: every item is known by its content alone.
        self.item_index: dict[str, int] = {}
        self.item_ids: list[str] = [""]
        self.text_dim = int(config.get("text_dim", text_dim))
        self.image_dim = int(config.get("image_dim", image_dim))
        self.fused_dim = self.text_dim
        self._projection = image_projection(self.text_dim, self.image_dim)
        self._session = load_session(model_dir / "ranker.onnx", None, intra_op_threads=threads)

    def item_vectors(self, content: ItemContent) -> np.ndarray:
        text = content.text * content.has_text[:, None]
        image = (content.image * content.has_image[:, None]) @ self._projection
        fused = text + IMAGE_WEIGHT * image
        # Items with neither modality get a deterministic vector from their id,
        # so they are stored and retrievable by id-based paths.
        empty = ~(content.has_text | content.has_image)
        for row in np.flatnonzero(empty):
            seed = int.from_bytes(hashlib.sha256(content.item_ids[row].encode()).digest()[:8], "little")
            fused[row] = np.random.default_rng(seed).standard_normal(self.fused_dim)
        return _normalise(fused)

    def query_vectors(self, text: np.ndarray) -> np.ndarray:
        return _normalise(text)

    def user_vectors(self, sequences: np.ndarray, actions: np.ndarray) -> np.ndarray:
        batch, length, _ = sequences.shape
        # Most recent position (last) gets weight 1, then decay**1, ...
        recency = RECENCY_DECAY ** np.arange(length - 1, -1, -1, dtype=np.float32)  # (L,)
        weights = ACTION_WEIGHTS[actions] * recency[None, :]  # (B, L); padding weighs 0
        pooled = np.einsum("bl,bld->bd", weights, sequences)
        return _normalise(pooled)

    def context_features(self, item_ids: list[str], retrieval_scores: np.ndarray, now: float) -> None:
        """None: the fixed scorer was fitted on no data, so the worker's live context is its context."""
        return None

    item_part_dim = 1  # whether the item has a photo: the only item-only term of the scorer

    def item_part(self, vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> np.ndarray:
        """(N, 1): 1.0 where the item's photo vector is non-zero, as the ONNX scorer tests it."""
        image = vectors["image"]
        return (np.abs(image).sum(axis=1) > 0).astype(np.float32)[:, None]

    def score_split(
        self,
        user_vector: np.ndarray,
        query_vector: np.ndarray | None,
        candidate_fused: np.ndarray,
        item_part: np.ndarray,
        candidate_text: np.ndarray | None,
        context: np.ndarray,
    ) -> np.ndarray:
        """``score`` in numpy from the candidates' fused vectors and photo flags (the same fixed weights)."""
        affinity = candidate_fused @ np.asarray(user_vector, np.float32)  # (N,)
        logit = (
            4.0 * affinity
            + 0.15 * context[:, 0]
            - 0.1 * np.log1p(np.maximum(context[:, 1], 0.0))
            + 1.0 * context[:, 2]
            + 0.05 * item_part[:, 0]
            - 2.0
        )
        if query_vector is not None and candidate_text is not None:
            logit = logit + 4.0 * (candidate_text @ np.asarray(query_vector, np.float32))
        return sigmoid(logit)

    def score(
        self,
        user_vector: np.ndarray,
        query_vector: np.ndarray | None,
        candidate_fused: np.ndarray,
        candidate_text: np.ndarray,
        candidate_image: np.ndarray,
        context: np.ndarray,
    ) -> np.ndarray:
        query = query_vector if query_vector is not None else np.zeros(self.text_dim, np.float32)
        inputs = {
            "user": user_vector,
            "query": query,
            "cand_fused": candidate_fused,
            "cand_text": candidate_text,
            "cand_image": candidate_image,
            "context": context,
        }
        # No copies for inputs that are already contiguous float32 (the usual case).
        feed = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in inputs.items()}
        (probability,) = self._session.run(None, feed)
        return probability


assert ACTION_WEIGHTS.shape[0] == len(ACTION_CODE)
