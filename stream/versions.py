"""Which collections hold which model version's vectors, and the pointer that records it.

A model version is served from its own items, users and queries collections
(``items_<version>`` after a hot swap, the plain names before any).
``<data_dir>/store/serving.json`` records which collections serve which
version, so a restarted worker opens the right ones; ``stream.swap`` builds
new collections and moves the pointer.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import Settings
from model.serving.contract import ITEM_PART, ServingModel, splits_scores
from stream.item_cache import Derived, ItemCache
from stream.store import CollectionSpec

POINTER = "serving.json"


@dataclass
class Collections:
    items: str
    users: str
    queries: str


@dataclass(frozen=True)
class ServingState:
    """One model version with the collections and item cache built for it.

    Swapped as one reference (``stream.swap``): a request reads it once and so
    never mixes two versions' vectors.
    """

    model: ServingModel
    collections: Collections
    item_cache: ItemCache


def collection_specs(collections: Collections, model: ServingModel) -> list[CollectionSpec]:
    """The items, users and queries collections of one model version."""
    # The retrieval space (fused items, users, queries) is scored by dot
    # product, exactly as the model computes it; content vectors by cosine.
    return [
        CollectionSpec(
            collections.items,
            {"text": model.text_dim, "image": model.image_dim, "fused": model.fused_dim},
            dot=frozenset({"fused"}),
            half=frozenset({"text", "image"}),  # content vectors; the retrieval space stays float32
            quantized=frozenset({"fused"}),  # every request's candidate search
            cold=frozenset({"text", "image"}),  # read per item; only a visual search scans photos
        ),
        CollectionSpec(collections.users, {"user": model.fused_dim}, dot=frozenset({"user"})),
        CollectionSpec(collections.queries, {"fused": model.fused_dim}, dot=frozenset({"fused"})),
    ]


def new_item_cache(settings: Settings, model: ServingModel) -> ItemCache:
    """The item cache of one model version; with the model's per-item scoring part when it splits scores."""
    split = splits_scores(model)
    derived = Derived(ITEM_PART, model.item_part_dim, model.item_part) if split else None  # type: ignore[attr-defined]
    return ItemCache(
        {"text": model.text_dim, "image": model.image_dim, "fused": model.fused_dim},
        # The in-process store has no other writer; a shared server may.
        ttl_s=float("inf") if settings.store_backend == "edge" else settings.item_cache_ttl_s,
        max_items=settings.item_cache_items,
        derived=derived,
        # A split scorer reads an item's photo only through its per-item part (and a
        # query's text against the item's text): the 1,280-d photo rows stay in the store.
        held=["fused", "text"] if split else None,
    )


def pointer_path(settings: Settings) -> Path:
    return settings.store_path / POINTER


def default_collections(settings: Settings) -> Collections:
    prefix = settings.collection_prefix
    return Collections(items=f"{prefix}items", users=f"{prefix}users", queries=f"{prefix}queries")


def version_collections(settings: Settings, version: str) -> Collections:
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in version)
    prefix = settings.collection_prefix
    return Collections(items=f"{prefix}items_{slug}", users=f"{prefix}users_{slug}",
                       queries=f"{prefix}queries_{slug}")


def read_pointer(settings: Settings) -> dict[str, Any] | None:
    try:
        return json.loads(pointer_path(settings).read_text())
    except (OSError, ValueError):
        return None


def write_pointer(settings: Settings, model: ServingModel, collections: Collections,
                  retired: Collections | None = None) -> None:
    path = pointer_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = path.with_suffix(f".{os.getpid()}.tmp")
    dims = {"text_dim": model.text_dim, "image_dim": model.image_dim, "fused_dim": model.fused_dim}
    record: dict[str, object] = {"version": model.version, **dataclasses.asdict(collections), **dims,
                                 "text_fields": list(model.text_fields)}
    if retired is not None:
        record["retired"] = dataclasses.asdict(retired)
    fresh.write_text(json.dumps(record))
    os.replace(fresh, path)


def recorded(pointer: dict[str, Any] | None, key: str | None = None) -> Collections | None:
    """The collections a pointer names (``key=None``) or keeps under ``key``; None when absent."""
    record = pointer if key is None or pointer is None else pointer.get(key)
    if not isinstance(record, dict):
        return None
    try:
        return Collections(items=record["items"], users=record["users"], queries=record["queries"])
    except KeyError:
        return None


def serving_collections(settings: Settings, version: str) -> Collections:
    """Where ``version`` is served from: the collections the pointer records for it; the
    version's own when the pointer names another (``stream.swap.reconcile`` fills them
    from the pointer's); the plain names on a first start."""
    pointer = read_pointer(settings)
    if pointer is None:
        return default_collections(settings)
    if pointer.get("version") == version:
        return recorded(pointer) or default_collections(settings)
    return version_collections(settings, version)
