"""Text and photo vectors of every catalogue item, with the exported ONNX towers, cached.

Training reads the same towers a worker serves with (``streamrec setup`` writes
them under ``<models>/towers``), so an item's text and image inputs are the
vectors the worker will compute for it. Each vector is computed once: the cache
(one ``.npz`` per tower) is keyed by the SHA-256 of the tower's ONNX file and of
the content (the text, or the photo's bytes and the crop), so a changed photo
or encoder is re-encoded and nothing else is.
"""
from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.errors import ConfigError, DecodeError
from core.settings import load_settings
from core.text import compose_text
from model.serving.content import (
    IMAGE_SIDECAR,
    TEXT_SIDECAR,
    ImageEncoder,
    TextEncoder,
    read_sidecar,
)
from model.training.data import InteractionData

IMAGE_BATCH = 32
MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class ContentVectors:
    """Per item index (row 0 = unknown): text (N+1, T), has_text (N+1,), image (N+1, I), has_image (N+1,)."""

    text: np.ndarray
    has_text: np.ndarray
    image: np.ndarray
    has_image: np.ndarray
    text_fields: tuple[str, ...]


def default_towers_dir() -> Path:
    return load_settings().models_path / "towers"


def check_towers(towers_dir: Path, encoders: dict[str, dict[str, str]]) -> None:
    """The exported towers must come from the encoders the artefact records."""
    for kind, sidecar in (("text", TEXT_SIDECAR), ("image", IMAGE_SIDECAR)):
        meta = read_sidecar(towers_dir / kind, sidecar)
        if meta.get("source_fingerprint") != encoders[kind]["source_fingerprint"]:
            raise ConfigError(
                f"the {kind} tower in {towers_dir / kind} was exported from other weights than this training "
                f"uses; run `streamrec setup` with the same encoder, or pass --towers DIR"
            )


def item_text_fields(data: InteractionData) -> tuple[str, ...]:
    """What an item's text is made of: the title, and the description when the catalogue has them."""
    return ("title", "description") if data.descriptions is not None else ("title",)


def item_texts(data: InteractionData, fields: tuple[str, ...]) -> list[str]:
    """The text tower's input per item index, composed as a worker composes it (``compose_text``)."""
    titles = data.titles or [""] * (data.n_items + 1)
    descriptions = data.descriptions or [""] * (data.n_items + 1)
    return [compose_text(fields, {"title": t, "description": d}) for t, d in zip(titles, descriptions)]


class VectorCache:
    """Content hash -> vector, in one ``.npz`` per tower file."""

    def __init__(self, cache_dir: Path | None, tower_sha256: str, kind: str) -> None:
        self.path = None if cache_dir is None else Path(cache_dir) / f"{kind}-{tower_sha256[:16]}.npz"
        self.vectors: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.is_file():
            with np.load(self.path) as stored:
                self.vectors = dict(zip(stored["keys"].tolist(), stored["vectors"]))
        self.added = 0

    def put(self, key: str, vector: np.ndarray) -> None:
        self.vectors[key] = vector
        self.added += 1

    def save(self) -> None:
        if self.path is None or not self.added or not self.vectors:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial.npz")
        np.savez(partial, keys=np.asarray(list(self.vectors)), vectors=np.stack(list(self.vectors.values())))
        partial.replace(self.path)


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def encode_texts(texts: list[str], towers_dir: Path, cache_dir: Path | None,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(N, T) unit text vectors (zero rows for empty texts) and (N,) has_text."""
    meta = read_sidecar(towers_dir / "text", TEXT_SIDECAR)
    cache = VectorCache(cache_dir, str(meta["sha256"]), "text")
    keys = [_digest(text.encode()) for text in texts]
    present = np.asarray([bool(text.strip()) for text in texts])
    missing = sorted({key for key, text, here in zip(keys, texts, present) if here and key not in cache.vectors})
    if missing:
        encoder = TextEncoder.from_dir(towers_dir / "text", intra_op_threads=2)
        by_key = {key: text for key, text in zip(keys, texts)}
        bar = tqdm(total=len(missing), desc="text vectors", unit="item", disable=not progress, file=sys.stderr)
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            for key, vector in zip(chunk, encoder.encode([by_key[key] for key in chunk])):
                cache.put(key, vector)
            bar.update(len(chunk))
        bar.close()
        cache.save()
    vectors = np.zeros((len(texts), int(meta["output_dim"])), dtype=np.float32)
    for row in np.flatnonzero(present):
        vectors[row] = cache.vectors[keys[row]]
    return vectors, present


def crop_centre(pixels: np.ndarray, share: float) -> np.ndarray:
    """The centre ``share`` of a (3, S, S) image, scaled back to S x S (nearest neighbour)."""
    size = pixels.shape[-1]
    side = max(1, round(size * share))
    start = (size - side) // 2
    picked = start + (np.arange(size) * side) // size  # (S,) source row/column of each output pixel
    return np.ascontiguousarray(pixels[:, picked][:, :, picked])


def encode_images(paths: list[Path | None], towers_dir: Path, cache_dir: Path | None,
                  progress: bool = True, crop: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, I) unit image vectors (zero rows where there is no usable photo) and (N,) has_image.

    ``crop``: encode only the centre share of each photo (a visual-search query
    that shows part of the item). A photo that cannot be decoded is reported
    on stderr and counts as absent.
    """
    meta = read_sidecar(towers_dir / "image", IMAGE_SIDECAR)
    cache = VectorCache(cache_dir, str(meta["sha256"]), "image")
    tag = b"" if crop is None else f"crop={crop:.4f}".encode()
    contents: dict[int, bytes] = {}
    keys: dict[int, str] = {}
    for row, path in enumerate(paths):
        if path is not None:
            contents[row] = Path(path).read_bytes()
            keys[row] = _digest(contents[row], tag)
    todo = [row for row in keys if keys[row] not in cache.vectors]
    bad: set[int] = set()
    if todo:
        encoder = ImageEncoder.from_dir(towers_dir / "image", intra_op_threads=2)
        bar = tqdm(total=len(todo), desc="image vectors", unit="photo", disable=not progress, file=sys.stderr)
        for start in range(0, len(todo), IMAGE_BATCH):
            rows, batch = [], []
            for row in todo[start : start + IMAGE_BATCH]:
                try:
                    pixels = encoder.decode_image(contents[row], MAX_PIXELS)
                except DecodeError as error:
                    print(f"{paths[row]}: {error}; the item counts as having no photo", file=sys.stderr)
                    bad.add(row)
                    continue
                rows.append(row)
                batch.append(pixels if crop is None else crop_centre(pixels, crop))
            if batch:
                for row, vector in zip(rows, encoder.encode_pixels(np.stack(batch), IMAGE_BATCH)):
                    cache.put(keys[row], vector)
            bar.update(len(todo[start : start + IMAGE_BATCH]))
        bar.close()
        cache.save()
    vectors = np.zeros((len(paths), int(meta["output_dim"])), dtype=np.float32)
    present = np.zeros(len(paths), dtype=bool)
    for row, key in keys.items():
        if row not in bad and key in cache.vectors:
            vectors[row], present[row] = cache.vectors[key], True
    return vectors, present


def content_vectors(data: InteractionData, towers_dir: Path, cache_dir: Path | None,
                    progress: bool = True) -> ContentVectors:
    """Text and image vectors of every item index of ``data`` (row 0 has neither)."""
    fields = item_text_fields(data)
    text, has_text = encode_texts(item_texts(data, fields), towers_dir, cache_dir, progress)
    images = data.images or [None] * (data.n_items + 1)
    image, has_image = encode_images(list(images), towers_dir, cache_dir, progress)
    has_text[0] = has_image[0] = False
    return ContentVectors(text, has_text, image, has_image, fields)
