"""Catalogue writes: items and their photos become named vectors in the store.

One batch of events costs one text-tower call, one image-tower call, one
item-tower call and one store upsert, whatever its size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import DecodeError
from core.events import CatalogItem, ImageEvent, ImageRef
from core.settings import Settings
from model.serving.contract import ItemContent, attribute_text
from stream.images import read_image_bytes
from stream.item_vectors import (
    item_points,
    payload_attribute_text,
    stored_vectors,
    write_items,
)
from stream.services import Services


@dataclass
class Rejected:
    """An accepted-by-schema event that still could not be applied."""

    index: int
    error: DecodeError


def decode_photos(settings: Settings, image_encoder: Any,
                  refs: list[ImageRef]) -> tuple[list[np.ndarray | None], list[DecodeError | None]]:
    """Read and decode images with ``image_encoder``'s preprocessing (an ``ImageEncoder``):
    a (3, S, S) tensor or the error, per reference."""
    pixels: list[np.ndarray | None] = []
    errors: list[DecodeError | None] = []
    for ref in refs:
        try:
            data = read_image_bytes(
                ref,
                image_root=settings.image_root,
                allow_http=settings.image_allow_http,
                max_bytes=settings.max_image_bytes,
            )
            pixels.append(image_encoder.decode_image(data, settings.max_image_pixels))
            errors.append(None)
        except DecodeError as exc:
            pixels.append(None)
            errors.append(exc)
    return pixels, errors


def embed_photos(image_encoder: Any, pixels: list[np.ndarray | None]) -> np.ndarray:
    """(N, image_dim) image vectors, zero rows where there are no pixels."""
    vectors = np.zeros((len(pixels), image_encoder.dim), np.float32)
    rows = [i for i, p in enumerate(pixels) if p is not None]
    if rows:
        vectors[rows] = image_encoder.encode_pixels(np.stack([pixels[i] for i in rows]))
    return vectors


def _decode_images(services: Services, refs: list[ImageRef]) -> tuple[list[np.ndarray | None], list[DecodeError | None]]:
    return decode_photos(services.settings, services.image_encoder, refs)


def _embed(services: Services, pixels: list[np.ndarray | None]) -> np.ndarray:
    return embed_photos(services.image_encoder, pixels)


def _load_images(services: Services, refs: list[ImageRef]) -> tuple[np.ndarray, list[DecodeError | None]]:
    """Decode and embed images; (N, image_dim) with zero rows where one failed."""
    pixels, errors = _decode_images(services, refs)
    return _embed(services, pixels), errors


def apply_catalog(services: Services, items: list[CatalogItem]) -> list[Rejected]:
    """Upsert or delete catalogue items in event order; return those rejected."""
    # Every photo is checked, superseded or not: one by one, an upsert with an
    # unusable photo would be rejected and the item keep its previous event, so
    # a batch rejects it too and the last *usable* event for an item wins.
    photo_rows = [i for i, item in enumerate(items) if item.op == "upsert" and item.image is not None]
    photo_pixels, photo_errors = _decode_images(services, [items[i].image for i in photo_rows])  # type: ignore[misc]
    rejected = [Rejected(i, error) for i, error in zip(photo_rows, photo_errors) if error is not None]
    pixels_by_row = dict(zip(photo_rows, photo_pixels))
    failed = {r.index for r in rejected}
    last: dict[str, int] = {item.item_id: i for i, item in enumerate(items) if i not in failed}
    order = sorted(last.values())
    deletions = [items[i].item_id for i in order if items[i].op == "delete"]
    upsert_rows = [i for i in order if items[i].op == "upsert"]
    store, collection = services.store, services.collections.items
    if deletions:
        store.delete(collection, deletions)
        services.item_cache.drop(deletions)
        services.signals.forget(deletions)
    if not upsert_rows:
        return rejected

    upserts = [items[i] for i in upsert_rows]
    image = np.zeros((len(upserts), services.model.image_dim), np.float32)
    has_image = np.array([item.image is not None for item in upserts])
    if has_image.any():
        # Only the winners' photos are embedded: (n_with_photo, image_dim).
        image[has_image] = _embed(services, [pixels_by_row[row] for row, h in zip(upsert_rows, has_image) if h])
    # An upsert without a photo keeps the photo the item already has.
    without = [n for n, item in enumerate(upserts) if item.image is None]
    if without:
        existing = store.retrieve(collection, [upserts[n].item_id for n in without], with_vectors=["image"])
        image[without], has_image[without] = stored_vectors(
            [existing.get(upserts[n].item_id) for n in without], "image", services.model.image_dim)
    texts = [item.text_for(services.model.text_fields) for item in upserts]
    has_text = np.array([bool(t) for t in texts])
    text = services.text_encoder.encode(texts)
    text[~has_text] = 0.0
    content = ItemContent(
        item_ids=[item.item_id for item in upserts],
        text=text,
        image=image,
        has_text=has_text,
        has_image=has_image,
        categories=[attribute_text(item.category, item.attributes) for item in upserts],
    )
    payloads = [item_payload(item, has_image=bool(h)) for item, h in zip(upserts, has_image)]
    write_items(store, services.serving, item_points(services.model, content, payloads))
    return rejected


def item_payload(item: CatalogItem, *, has_image: bool) -> dict[str, object]:
    return {
        "title": item.title,
        "category": item.category,
        "description": item.description,  # with title and category: the text a new model may re-embed
        "price": item.price,
        "attributes": dict(item.attributes),
        "created_at": item.event_time,
        "has_image": has_image,
        "image_uri": item.image.image_uri if item.image else None,
    }


def apply_catalog_photos(services: Services, events: list[ImageEvent]) -> list[Rejected]:
    """Set the photo of existing (or new, photo-only) items and refresh their fused vector."""
    if not events:
        return []
    vectors, errors = _load_images(services, [e.image for e in events])
    rejected = [Rejected(i, e) for i, e in enumerate(errors) if e is not None]
    good = [i for i, e in enumerate(errors) if e is None]
    if not good:
        return rejected
    # Last photo per item wins.
    last = {events[i].item_id: i for i in good}
    rows = sorted(last.values())
    ids = [events[i].item_id for i in rows]  # type: ignore[misc]
    store, collection = services.store, services.collections.items
    existing = store.retrieve(collection, ids, with_vectors=["text"])  # type: ignore[arg-type]
    text, has_text = stored_vectors([existing.get(i) for i in ids], "text", services.model.text_dim)  # type: ignore[arg-type]
    content = ItemContent(
        item_ids=ids,  # type: ignore[arg-type]
        text=text,
        image=vectors[rows],
        has_text=has_text,
        has_image=np.ones(len(rows), bool),
        categories=[payload_attribute_text(existing.get(i)) for i in ids],  # type: ignore[arg-type]
    )
    payloads = []
    for n, item_id in enumerate(ids):
        hit = existing.get(item_id)  # type: ignore[arg-type]
        payload = dict(hit.payload) if hit else {"title": "", "category": "", "price": None,
                                                  "attributes": {}, "created_at": events[rows[n]].event_time}
        payload.pop("id", None)
        payload["has_image"] = True
        payload["image_uri"] = events[rows[n]].image.image_uri
        payloads.append(payload)
    write_items(store, services.serving, item_points(services.model, content, payloads))
    return rejected


def embed_query_image(services: Services, ref: ImageRef) -> np.ndarray:
    """A visual-search photo -> its (image_dim,) vector; raises DecodeError if unusable."""
    vectors, errors = _load_images(services, [ref])
    if errors[0] is not None:
        raise errors[0]
    return vectors[0]
