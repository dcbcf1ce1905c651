"""Small trained models for integration tests, and the synthetic catalogues they know.

Every user of the training data walks the catalogue ``i1 .. i200`` one item at
a time (wrapping around), so the model learns "the next item is the following
one"; items carry one of ten categories ``c0 .. c9``.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


PHOTO_ITEMS, PHOTO_USERS = 30, 60
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220)]


def write_photo_data(root: Path) -> tuple[Path, Path]:
    """Three groups of ten items; each user walks inside one group; photos coloured by group.

    Items 28-30 have no photo and item 27 no title: the missing modalities.
    """
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for item in range(1, PHOTO_ITEMS + 1):
        group = (item - 1) // 10
        record: dict[str, object] = {"item_id": f"i{item:02d}", "title": f"thing {item}", "category": f"g{group}",
                                     "attributes": {"shelf": f"s{item % 2}"}}
        if item == 27:
            record["title"] = ""
        if item <= 27:
            noise = rng.integers(0, 40, size=(40, 40, 3))
            pixels = np.clip(np.asarray(COLOURS[group]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / f"{item}.jpg")
            record["image"] = f"{item}.jpg"
        records.append(record)
    (root / "catalogue.json").write_text(json.dumps(records))
    lines = ["user_id,item_id,timestamp"]
    for user in range(PHOTO_USERS):
        group = user % 3
        for step in range(12):
            lines.append(f"u{user},i{group * 10 + (user + step) % 10 + 1:02d},{1000 * user + step}")
    (root / "interactions.csv").write_text("\n".join(lines) + "\n")
    return root / "interactions.csv", root / "catalogue.json"


def train_photo_model(root: Path, towers: Path) -> Path:
    """A small model trained on ``write_photo_data`` with its photos; returns the artefact folder."""
    from model.training.data import load_table
    from model.training.train import FORMAT_RETRIEVAL

    interactions, catalogue = write_photo_data(root)
    data = load_table(interactions, catalogue, root / "images")
    torch.set_num_threads(1)
    train_artefact(data, "table", interactions, root / "artefact",
                   tower_overrides={"fused_dim": 16, "max_sequence": 12, "n_layers": 1},
                   retrieval=replace(FORMAT_RETRIEVAL["table"], epochs=3, minutes=0.3, eval_every=1),
                   ranker=RankerSettings(epochs=1), progress=False, towers_dir=towers, cache_dir=root / "cache")
    return root / "artefact"


def registry_with(base: Path, models: Path, towers: Path) -> Registry:
    """A model registry under ``models`` serving ``base``, beside the exported content towers."""
    registry = Registry(models)
    registry.promote(registry.add(base))
    (models / "towers").symlink_to(towers.resolve())  # the exported content towers, shared
    return registry
