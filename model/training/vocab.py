"""Growing a model's item and attribute vocabularies between two trainings.

A fine-tuning cycle sees items (and attribute names) the serving version never
learnt: they were served from their content alone (id index 0). The next
version gives each of them an index after the known ones, so every index a
known item had stays valid, and a new row in the id embedding (and in the
attribute embedding for a new attribute name). The new rows start at zero:
before any training step the new version places a new item exactly where its
content put it, and training then moves it by what its interactions taught.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch

from model.export.fused import Networks
from model.serving.networks import NETWORKS

GROWN_TABLES: dict[str, str] = {
    "item_embedding.weight": "n_items",
    "attribute_embedding.weight": "n_attributes",
}


def grow(known: list[str], seen: Iterable[str]) -> list[str]:
    """``known`` in its order, then every id of ``seen`` it lacks, in first-seen order."""
    present = set(known)
    grown = list(known)
    for name in seen:
        if name not in present:
            present.add(name)
            grown.append(name)
    return grown


def _extended(table: torch.Tensor, rows: int) -> torch.Tensor:
    """``table`` with zero rows appended up to ``rows`` (never shrunk)."""
    if rows < table.shape[0]:
        raise ValueError(f"a vocabulary only grows: {table.shape[0]} rows, asked for {rows}")
    grown = torch.zeros(rows, *table.shape[1:], dtype=table.dtype)
    grown[: table.shape[0]] = table
    return grown


def grow_networks(networks: Networks, n_items: int, n_attributes: int, max_attributes: int) -> Networks:
    """A copy of ``networks`` whose embeddings hold ``n_items`` items and ``n_attributes``
    attribute names; rows already there keep their values, new ones are zero."""
    config = replace(networks.config, n_items=n_items, n_attributes=n_attributes,
                     max_attributes=max(max_attributes, networks.config.max_attributes))
    grown = Networks.build(config)
    for name in NETWORKS:
        state = dict(networks.module(name).state_dict())
        if name == "item_tower":
            for key, size in GROWN_TABLES.items():
                state[key] = _extended(state[key], getattr(config, size) + 1)
        grown.module(name).load_state_dict(state)
    return grown
