"""The three trained networks: item tower, user tower and ranker (pure modules, no I/O).

Shapes use N for items/candidates, B for users, L for sequence length,
d for ``fused_dim``, T for ``text_dim``, I for ``image_dim``, A for the
attribute slots per item.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from model.serving.contract import ACTIONS, CONTEXT_FEATURES
from model.serving.networks import TowerConfig


class ItemTower(nn.Module):
    """Fuses id, attributes, text and image into one d-dim item vector.

    The parts are summed. An item missing a modality gets that modality's
    learned "missing" vector instead of its projection (zero until training
    sees items without it), so a film without a poster is not placed as if its
    poster were blank; an unknown item (index 0) is described by its content.
    """

    MISSING = ("missing_text", "missing_image")

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        d = config.fused_dim
        self.item_embedding = nn.Embedding(config.n_items + 1, d)
        self.attribute_embedding = nn.Embedding(config.n_attributes + 1, d, padding_idx=0)
        self.text_projection = nn.Linear(config.text_dim, d)
        self.image_projection = nn.Linear(config.image_dim, d)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.attribute_embedding.weight, std=0.02)
        with torch.no_grad():
            self.attribute_embedding.weight[0].zero_()
        for projection in (self.text_projection, self.image_projection):
            nn.init.normal_(projection.weight, std=0.02)
            nn.init.zeros_(projection.bias)
        self.missing_text = nn.Parameter(torch.zeros(d))
        self.missing_image = nn.Parameter(torch.zeros(d))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Weights saved before the "missing" vectors existed behaved as if they were zero.
        for name in self.MISSING:
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def content_vectors(
        self, text: torch.Tensor | None, has_text: torch.Tensor | None,
        image: torch.Tensor | None, has_image: torch.Tensor | None,
    ) -> torch.Tensor:
        """Text and image terms: (N, T), (N,), (N, I), (N,) -> (N, d); None = nobody has it."""
        parts = []
        for projection, missing, values, present in (
            (self.text_projection, self.missing_text, text, has_text),
            (self.image_projection, self.missing_image, image, has_image),
        ):
            if values is None or present is None:
                parts.append(missing.unsqueeze(0))
                continue
            flag = present.unsqueeze(-1)
            parts.append(projection(values) * flag + missing * (1.0 - flag))
        return parts[0] + parts[1]

    def attribute_vectors(self, attributes: torch.Tensor) -> torch.Tensor:
        """Mean attribute embedding: (N, A) int64, 0 = empty slot -> (N, d)."""
        present = (attributes > 0).to(torch.float32)  # (N, A)
        summed = self.attribute_embedding(attributes).sum(dim=1)  # (N, d); row 0 is zero
        return summed / present.sum(dim=1, keepdim=True).clamp(min=1.0)

    def forward(
        self,
        item_index: torch.Tensor,
        attributes: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor,
        has_text: torch.Tensor,
        has_image: torch.Tensor,
    ) -> torch.Tensor:
        """(N,) int64, (N, A) int64, (N, T), (N, I), (N,) float, (N,) float -> (N, d)."""
        vectors = self.item_embedding(item_index) + self.attribute_vectors(attributes)
        return vectors + self.content_vectors(text, has_text, image, has_image)

    def catalogue_vectors(
        self,
        attribute_mixing: torch.Tensor,
        text: torch.Tensor | None = None,
        has_text: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        id_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Vectors of every known item (index 0..n_items), for training.

        attribute_mixing: sparse (N+1, n_attributes+1), row i = mean weights of
        item i's attributes (see ``attribute_mixing``). id_rows (N+1,) int64:
        the id embedding row each item reads (default its own; 0 makes it an
        unknown item, known by content). Same maths as ``forward``; the sparse
        product keeps steps cheap.
        """
        ids = self.item_embedding.weight if id_rows is None else self.item_embedding(id_rows)
        vectors = ids + torch.sparse.mm(attribute_mixing, self.attribute_embedding.weight)
        return vectors + self.content_vectors(text, has_text, image, has_image)


def attribute_mixing(attributes: torch.Tensor, n_attributes: int) -> torch.Tensor:
    """Sparse (N, n_attributes+1) matrix whose product with the attribute table is the mean.

    attributes: (N, A) int64, 0 = empty slot.
    """
    rows, slots = (attributes > 0).nonzero(as_tuple=True)
    columns = attributes[rows, slots]
    counts = (attributes > 0).sum(dim=1).clamp(min=1).to(torch.float32)
    values = 1.0 / counts[rows]
    return torch.sparse_coo_tensor(
        torch.stack([rows, columns]), values, (attributes.shape[0], n_attributes + 1), check_invariants=True
    ).coalesce()


class CausalSelfAttention(nn.Module):
    """Multi-head attention written out so the masking is explicit and NaN-free."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), allowed (B, 1, L, L) bool -> (B, L, d)."""
        batch, length, dim = x.shape
        head_dim = dim // self.n_heads
        # (B, L, 3d) -> 3 x (B, h, L, d/h)
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # (B, h, L, L)
        # A large finite fill (not -inf): every row keeps its diagonal, so no
        # row is fully masked and softmax never sees an all -inf row.
        scores = scores.masked_fill(~allowed, -1e9)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        mixed = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.out(mixed)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, ffn_multiplier: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, n_heads, attention_dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_multiplier * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_multiplier * dim, dim),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), allowed))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class UserTower(nn.Module):
    """Causal transformer over recent item vectors; the user is the last output.

    Sequences are left-padded (action code 0 at padding), so the newest item is
    always at the last position and positions count back from there.
    """

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        d = config.fused_dim
        self.max_sequence = config.max_sequence
        self.input_scale = math.sqrt(d)
        self.position_embedding = nn.Embedding(config.max_sequence, d)
        # Zero start: action kinds absent from the training data add nothing.
        self.action_embedding = nn.Embedding(len(ACTIONS), d)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        nn.init.zeros_(self.action_embedding.weight)
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d, config.n_heads, config.ffn_multiplier, config.dropout, config.attention_dropout)
            for _ in range(config.n_layers)
        )
        self.final_norm = nn.LayerNorm(d)

    def encode(self, item_vectors: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(B, L, d) item vectors, (B, L) action codes -> (B, L, d) state after each item."""
        length = item_vectors.shape[1]
        valid = actions > 0  # (B, L)
        steps = torch.arange(length, device=actions.device)
        # Left padding: the newest item always sits at position max_sequence - 1.
        positions = self.position_embedding(steps + (self.max_sequence - length))  # (L, d)
        x = item_vectors * self.input_scale + positions + self.action_embedding(actions)
        # Padding is zeroed rather than masked out of the keys alone; see ``allowed``.
        x = self.input_dropout(x) * valid.unsqueeze(-1).to(x.dtype)
        causal = steps.unsqueeze(1) >= steps.unsqueeze(0)  # (L, L) query i sees keys j <= i
        diagonal = steps.unsqueeze(1) == steps.unsqueeze(0)
        # (B, 1, L, L): attend to earlier real items, and always to yourself so
        # that padded rows are never fully masked (the NaN trap of fused kernels).
        allowed = (causal & valid[:, None, :]) | diagonal
        allowed = allowed.unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed)
        return self.final_norm(x)

    def forward(self, item_vectors: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """(B, L, d), (B, L) -> (B, d) user vector."""
        return self.encode(item_vectors, actions)[:, -1]


RETRIEVAL_SCORE = CONTEXT_FEATURES.index("retrieval_score")


class Ranker(nn.Module):
    """Click probability of each candidate: retrieval score plus a learned correction.

    logit = w * retrieval_score + b + blend * mlp(features). With ``blend`` 0 the
    ranker orders exactly as retrieval does; the trainer picks ``blend`` on
    held-out users so that ranking never loses to plain retrieval there.
    """

    def __init__(self, config: TowerConfig) -> None:
        super().__init__()
        d, hidden = config.fused_dim, config.ranker_hidden
        self.text_projection = nn.Linear(config.text_dim, hidden)
        self.image_projection = nn.Linear(config.image_dim, hidden)
        n_context = len(CONTEXT_FEATURES)
        self.register_buffer("context_mean", torch.zeros(n_context))
        self.register_buffer("context_scale", torch.ones(n_context))
        self.register_buffer("blend", torch.ones(()))
        in_features = 3 * d + 2 * hidden + n_context + 1
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.GELU(),
            nn.Linear(hidden, 1),
        )
        self.score_weight = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        # Prior for search requests (no search data to learn from yet): text
        # that matches the query raises the click odds.
        self.query_weight = nn.Parameter(torch.ones(()))

    def logits(
        self,
        user_vector: torch.Tensor,
        candidate_fused: torch.Tensor,
        candidate_text: torch.Tensor,
        candidate_image: torch.Tensor,
        query_vector: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """(N, d), (N, d), (N, T), (N, I), (N, T), (N, C) -> (N,) logits."""
        query_match = (query_vector * candidate_text).sum(dim=-1)  # (N,) cosine of unit vectors
        scaled_context = (context - self.context_mean) / self.context_scale
        features = torch.cat(
            [
                user_vector * candidate_fused,
                user_vector,
                candidate_fused,
                self.text_projection(candidate_text),
                self.image_projection(candidate_image),
                scaled_context,
                query_match.unsqueeze(-1),
            ],
            dim=-1,
        )
        correction = self.mlp(features).squeeze(-1)
        retrieval_score = context[:, RETRIEVAL_SCORE]
        return (
            self.score_weight * retrieval_score
            + self.bias
            + self.query_weight * query_match
            + self.blend * correction
        )

    def forward(
        self,
        user_vector: torch.Tensor,
        candidate_fused: torch.Tensor,
        candidate_text: torch.Tensor,
        candidate_image: torch.Tensor,
        query_vector: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        """Same inputs as ``logits`` -> (N,) click probabilities."""
        return torch.sigmoid(
            self.logits(user_vector, candidate_fused, candidate_text, candidate_image, query_vector, context)
        )
