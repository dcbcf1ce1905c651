"""What a serving worker needs from a model, whatever produced it.

Two implementations exist: the content rule model (``model.serving.rule_model``) that
needs no training, and a trained artefact (``model.serving.trained``) loaded from the
registry. Workers only ever talk to ``ServingModel``; shapes are the contract.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from core.text import CONTENT_TEXT_FIELDS, TRAINED_TEXT_FIELDS, compose_text  # noqa: F401 (part of the contract)

if TYPE_CHECKING:
    from model.serving.covisit import CoVisitTable

# Action types in the order of their integer codes (0 is padding).
ACTIONS: tuple[str, ...] = ("pad", "view", "click", "add_to_cart", "purchase", "search")
ACTION_CODE: dict[str, int] = {name: code for code, name in enumerate(ACTIONS)}

# An item's attribute names (the item tower's attribute vocabulary): each of its
# categories ("Toys|Puzzles" holds two) and each of its attributes as "key=value".
CATEGORY_SEPARATOR = "|"
KEY_VALUE = "="  # an attribute ``key=value`` (e.g. ``year=1995``), beside plain categories


def attribute_names(category: str | list[str] | tuple[str, ...] | None,
                    attributes: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The attribute names of one item, in order, each once; empty names dropped."""
    if isinstance(category, str):
        names = [name.strip() for name in category.split(CATEGORY_SEPARATOR)]
    else:
        names = [str(name).strip() for name in category or ()]
    names += [f"{key}{KEY_VALUE}{value}" for key, value in (attributes or {}).items()]
    return tuple(dict.fromkeys(name for name in names if name))


def attribute_text(category: str | list[str] | tuple[str, ...] | None,
                   attributes: Mapping[str, Any] | None = None) -> str:
    """``attribute_names`` as the one string per item ``ItemContent.categories`` carries."""
    return CATEGORY_SEPARATOR.join(attribute_names(category, attributes))


def sigmoid(logit: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) as float32 without overflow: e^-|x| never exceeds 1."""
    logit = np.asarray(logit, np.float32)
    small = np.exp(-np.abs(logit))
    return np.where(logit >= 0, 1.0 / (1.0 + small), small / (1.0 + small)).astype(np.float32)


# Context features per candidate, in this order (the ranker's last input).
CONTEXT_FEATURES: tuple[str, ...] = ("log_popularity", "recency_days", "retrieval_score")


@dataclass(frozen=True)
class ItemContent:
    """Content of a batch of items, as the towers produced it.

    text:  (N, text_dim) float32, zero rows where an item has no text
    image: (N, image_dim) float32, zero rows where an item has no image
    has_text, has_image: (N,) bool
    item_ids: the domain ids (strings); a model maps known ones to its vocabulary
    categories: per item, its attribute names joined by ``|`` (``attribute_text``; "" when none)
    """

    item_ids: list[str]
    text: np.ndarray
    image: np.ndarray
    has_text: np.ndarray
    has_image: np.ndarray
    categories: list[str]


class ServingModel(Protocol):
    version: str
    fused_dim: int
    text_dim: int
    image_dim: int
    max_sequence: int
    text_fields: tuple[str, ...]  # what item text is made of for this model (``compose_text``)
    # How many of a request's best candidates by retrieval score ``score`` was
    # trained to order (a trained ranker saw only the retrieval top-K); the
    # rest follow in retrieval order. None: ``score`` orders any candidates.
    rank_pool: int | None
    # Item-to-item transitions learnt in training (``model.serving.covisit``; None: none)
    # and the weight of their ranking in the fused order (0: not used).
    transitions: CoVisitTable | None
    covisit_weight: float
    # The config that travels with the weights (the artefact's config.json).
    # ``config["encoders"]``, when present, fingerprints the text and image
    # encoders the towers were trained on (``stream.services.check_encoders``).
    config: dict[str, Any]
    # The item vocabulary that ``transitions`` and the towers' id embeddings
    # index: domain id -> index in 1..n (0, the unknown item, is never a key),
    # and its inverse, (n + 1,) with "" at 0. A model that learnt no item ids
    # has n = 0: an empty index and [""].
    item_index: dict[str, int]
    item_ids: list[str]

    def item_vectors(self, content: ItemContent) -> np.ndarray:
        """(N, fused_dim) float32 item vectors in the retrieval space."""

    def query_vectors(self, text: np.ndarray) -> np.ndarray:
        """(N, text_dim) search-query text vectors -> (N, fused_dim) in the item space.

        Used both for search-type retrieval and to place a search in the user's
        sequence (action code ``ACTION_CODE["search"]``).
        """

    def user_vectors(self, sequences: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """User vectors from recent interactions, oldest first, left-padded.

        sequences: (B, L, fused_dim) float32 item vectors (zeros at padding)
        actions:   (B, L) int64 action codes from ``ACTION_CODE`` (0 = padding)
        returns    (B, fused_dim) float32
        """

    def score(
        self,
        user_vector: np.ndarray,
        query_vector: np.ndarray | None,
        candidate_fused: np.ndarray,
        candidate_text: np.ndarray,
        candidate_image: np.ndarray,
        context: np.ndarray,
    ) -> np.ndarray:
        """Click probabilities for one request's candidates, one ONNX call.

        user_vector (fused_dim,), query_vector (text_dim,) or None,
        candidate_fused (N, fused_dim), candidate_text (N, text_dim),
        candidate_image (N, image_dim), context (N, len(CONTEXT_FEATURES)) -> (N,)
        """

    def context_features(self, item_ids: list[str], retrieval_scores: np.ndarray, now: float) -> np.ndarray | None:
        """(N, len(CONTEXT_FEATURES)) float32 context of N candidates, as ``score`` was trained on it.

        item_ids: the N candidates; retrieval_scores: (N,); now: seconds, the
        time of the user's latest event. None when the model learnt no context
        of its own: the worker then computes it from live counts and ages.
        """


# The item cache column that holds a split scorer's per-item part.
ITEM_PART = "ranker_item"


@runtime_checkable
class SplitScorer(Protocol):
    """A model whose ``score`` splits into a per-item part and a per-request rest.

    ``item_part`` runs once per item (when the item cache takes it) on that
    item's stored vectors; ``score_split`` then needs only the candidates'
    fused vectors and parts, plus their text vectors for a search query.
    ``score_split`` must equal ``score`` within float tolerance (the models'
    parity tests). ``item_part_dim`` 0: this model version cannot split.
    """

    item_part_dim: int

    def item_part(self, vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> np.ndarray:
        """name -> (N, dim) stored vectors (zero rows where absent), name -> (N,) bool -> (N, item_part_dim)."""

    def score_split(
        self,
        user_vector: np.ndarray,
        query_vector: np.ndarray | None,
        candidate_fused: np.ndarray,
        item_part: np.ndarray,
        candidate_text: np.ndarray | None,
        context: np.ndarray,
    ) -> np.ndarray:
        """``score`` from the parts: (N, fused_dim), (N, item_part_dim), (N, text_dim) or None -> (N,)."""


def splits_scores(model: object) -> bool:
    """Whether ``model`` serves ``score_split`` (a ``SplitScorer`` with a non-zero part)."""
    return isinstance(model, SplitScorer) and model.item_part_dim > 0


SECONDS_PER_DAY = 86400.0


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
