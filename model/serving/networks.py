"""The shape of a trained artefact's networks, as config.json and the ONNX files declare it.

Torch-free: serving reads a model's dimensions and ONNX input names from here;
``model.nets.towers`` builds the torch modules from the same ``TowerConfig``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class TowerConfig:
    """Everything needed to rebuild the networks; saved as ``config.json``."""

    n_items: int
    n_attributes: int
    max_attributes: int
    fused_dim: int = 64
    text_dim: int = 384
    image_dim: int = 1280
    max_sequence: int = 50
    n_layers: int = 2
    n_heads: int = 2
    ffn_multiplier: int = 1
    dropout: float = 0.5
    attention_dropout: float = 0.2
    ranker_hidden: int = 64

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> "TowerConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})  # type: ignore[arg-type]


NETWORKS: tuple[str, ...] = ("item_tower", "user_tower", "ranker")
INPUT_NAMES: dict[str, tuple[str, ...]] = {
    "item_tower": ("item_index", "attributes", "text", "image", "has_text", "has_image"),
    "user_tower": ("item_vectors", "actions"),
    "ranker": ("user_vector", "candidate_fused", "candidate_text", "candidate_image", "query_vector", "context"),
}
OUTPUT_NAMES: dict[str, str] = {
    "item_tower": "item_vector",
    "user_tower": "user_vector",
    "ranker": "click_probability",
}
