"""The one builder of item vectors: content arrays -> a model's fused vectors -> points -> store and cache.

Catalogue events, photo events and a hot swap's rebuild all end here, so an
item's named vectors mean the same whichever path wrote them: "fused" always,
"text" only when the item has text and "image" only when it has a photo. A
vector left out is how the store records "none" (``Point``); a zero vector
written instead would be refused by a cosine collection and would make the
next rebuild take a missing photo for a present one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from model.serving.contract import ItemContent, ServingModel, attribute_text
from stream.store import Hit, Point, VectorStore
from stream.versions import ServingState


def stored_vectors(hits: Sequence[Hit | None], name: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Each hit's ``name`` vector: (N, dim) float32 with zero rows where a hit is
    missing or has none, and the (N,) bool mask of the rows that have one."""
    vectors = np.zeros((len(hits), dim), np.float32)
    present = np.zeros(len(hits), bool)
    for row, hit in enumerate(hits):
        if hit is not None and name in hit.vectors:
            vectors[row], present[row] = hit.vectors[name], True
    return vectors, present


def payload_attribute_text(hit: Hit | None) -> str:
    """A stored item's attribute names (its payload's category and attributes), as
    ``ItemContent.categories`` carries them; "" for a missing hit."""
    if hit is None:
        return ""
    return attribute_text(str(hit.payload.get("category") or ""), hit.payload.get("attributes") or {})


def item_points(model: ServingModel, content: ItemContent, payloads: Sequence[dict[str, Any]]) -> list[Point]:
    """One point per item of ``content``: ``model``'s fused vector plus the content vectors it has.

    ``content.text`` (N, text_dim) and ``content.image`` (N, image_dim) are
    stored as given where ``has_text`` / ``has_image`` is set; ``payloads``
    holds one payload per item, in the same order.
    """
    fused = model.item_vectors(content)  # (N, fused_dim) in this model's retrieval space
    points = []
    for row, (item_id, payload) in enumerate(zip(content.item_ids, payloads, strict=True)):
        vectors = {"fused": fused[row]}
        if content.has_text[row]:
            vectors["text"] = content.text[row]
        if content.has_image[row]:
            vectors["image"] = content.image[row]
        points.append(Point(item_id, vectors, payload))
    return points


def write_items(store: VectorStore, state: ServingState, points: Sequence[Point]) -> None:
    """Write ``points`` to ``state``'s items collection and item cache.

    Both come from the one state, so the cache never holds vectors of a model
    version other than the collection's (a swap builds a new state and writes
    there while the old one still serves).
    """
    store.upsert(state.collections.items, points)
    for point in points:
        state.item_cache.put(point.id, point.vectors, point.payload)
