"""Growing a model's item and attribute vocabularies between two trainings.

A fine-tuning cycle sees items (and attribute names) the serving version never
learnt: they were served from their content alone (id index 0). The next
version gives each of them an index after the known ones, so every index a
known item had stays valid, and a new row in the id embedding (and in the
attribute embedding for a new attribute name). A new id row starts as a copy
of row 0, the unknown item's: before any training step the new version places
a new item exactly where the serving version placed it (by its content, as an
unknown item), and training then moves it by what its interactions taught. A
new attribute row starts at zero (attribute row 0 is padding).
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
START_AS_UNKNOWN = frozenset({"item_embedding.weight"})  # new rows copy row 0; the others start at zero


def grow(known: list[str], seen: Iterable[str]) -> list[str]:
    """``known`` in its order, then every id of ``seen`` it lacks, in first-seen order."""
    present = set(known)
    grown = list(known)
    for name in seen:
        if name not in present:
            present.add(name)
            grown.append(name)
    return grown


def _extended(table: torch.Tensor, rows: int, like_row_0: bool) -> torch.Tensor:
    """``table`` with rows appended up to ``rows`` (never shrunk): copies of row 0, or zeros."""
    if rows < table.shape[0]:
        raise ValueError(f"a vocabulary only grows: {table.shape[0]} rows, asked for {rows}")
    grown = torch.zeros(rows, *table.shape[1:], dtype=table.dtype)
    if like_row_0:
        grown[:] = table[0]
    grown[: table.shape[0]] = table
    return grown


def grow_networks(networks: Networks, n_items: int, n_attributes: int, max_attributes: int) -> Networks:
    """A copy of ``networks`` whose embeddings hold ``n_items`` items and ``n_attributes``
    attribute names; rows already there keep their values (new ones: see the module)."""
    config = replace(networks.config, n_items=n_items, n_attributes=n_attributes,
                     max_attributes=max(max_attributes, networks.config.max_attributes))
    grown = Networks.build(config)
    for name in NETWORKS:
        state = dict(networks.module(name).state_dict())
        if name == "item_tower":
            for key, size in GROWN_TABLES.items():
                state[key] = _extended(state[key], getattr(config, size) + 1, key in START_AS_UNKNOWN)
        grown.module(name).load_state_dict(state)
    return grown
