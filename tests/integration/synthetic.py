"""A small trained model for integration tests, and the synthetic catalogue it knows.

Every user of the training data walks the catalogue ``i1 .. i200`` one item at
a time (wrapping around), so the model learns "the next item is the following
one"; items carry one of ten categories ``c0 .. c9``.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model.serving.registry import Registry
from model.training.data import InteractionData
from model.training.ranker import RankerSettings
from model.training.train import DEFAULT_RETRIEVAL, train_artefact

N_ITEMS, N_USERS, LENGTH = 200, 300, 30
T0 = 1_700_000_000.0


def walk(start: int, step: int, length: int = LENGTH) -> list[int]:
    return [(start - 1 + k * step) % N_ITEMS + 1 for k in range(length)]


def category(item: int) -> str:
    """The category item ``i<item>`` was trained with."""
    return f"c{(item - 1) % 10}"


def train_walk_model(out: Path) -> Path:
    """Train the small model into ``out`` (about half a minute on one thread)."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    sequences = [np.asarray(walk(int(rng.integers(1, N_ITEMS + 1)), 1), dtype=np.int64) for _ in range(N_USERS)]
    attributes = np.zeros((N_ITEMS + 1, 1), dtype=np.int64)
    attributes[1:, 0] = np.arange(N_ITEMS) % 10 + 1
    data = InteractionData("synthetic", [f"u{u}" for u in range(N_USERS)], sequences,
                           [f"i{i}" for i in range(1, N_ITEMS + 1)], attributes, [f"c{c}" for c in range(10)])
    train_artefact(data, "s3rec", None, out,
                   tower_overrides={"fused_dim": 32, "max_sequence": 20, "n_layers": 1, "dropout": 0.1},
                   retrieval=replace(DEFAULT_RETRIEVAL, epochs=4, minutes=0.3, eval_every=2),
                   ranker=RankerSettings(epochs=1), progress=False)
    return out


def registry_with(base: Path, models: Path, towers: Path) -> Registry:
    """A model registry under ``models`` serving ``base``, beside the exported content towers."""
    registry = Registry(models)
    registry.promote(registry.add(base))
    (models / "towers").symlink_to(towers.resolve())  # the exported content towers, shared
    return registry
