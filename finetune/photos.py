"""The photo vectors the fine-tuner trains on: the newest usable photo of every item it drained.

A catalogue upsert with a photo, or a ``catalog_photo`` event on ``events.images``,
sets the item's photo; an upsert without one keeps it; a deletion removes it,
as on a worker. Photos are read (``STREAMREC_IMAGE_ROOT``, inline base64, or
http when allowed) and embedded with the exported image tower, the one every
worker uses, once, when drained; the vectors are kept in
``<data_dir>/finetune/photos.npz`` (written then renamed before the consumer
commits), so a cycle trains on them without reading a photo again. A photo
that cannot be read or decoded is skipped (workers dead-letter it) and counted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from core.events import CatalogItem, ImageEvent, ImageRef
from core.settings import Settings
from finetune.files import replace_whole

PHOTOS_FILE = "photos.npz"
PHOTO_CHUNK = 256  # photos decoded at a time: 256 x (3, 224, 224) float32 is about 150 MB


class PhotoLog:
    """Item id -> (image_dim,) unit vector of its newest usable photo."""

    def __init__(self, folder: Path, settings: Settings, image_encoder: Any | None = None) -> None:
        self.path = Path(folder) / PHOTOS_FILE
        self.settings = settings
        self._encoder = image_encoder  # an ImageEncoder; loaded on the first photo drained

    @property
    def encoder(self) -> Any:
        if self._encoder is None:
            from model.serving.content import ImageEncoder
            from stream.services import exported_towers

            self._encoder = ImageEncoder.from_dir(exported_towers(self.settings) / "image",
                                                  intra_op_threads=self.settings.onnx_threads)
        return self._encoder

    def read(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            return {}
        with np.load(self.path, allow_pickle=False) as stored:
            return dict(zip(stored["item_ids"].tolist(), stored["vectors"]))

    def apply(self, events: list[CatalogItem | ImageEvent]) -> int:
        """Fold catalogue upserts and deletions and catalogue photos (in topic order) into the
        file; returns how many photos could not be used."""
        photos: dict[str, ImageRef] = {}  # the newest photo per item in this batch, then embedded
        deleted: set[str] = set()
        for event in events:
            if isinstance(event, CatalogItem) and event.op == "delete":
                photos.pop(event.item_id, None)
                deleted.add(event.item_id)
            elif event.image is not None and event.item_id is not None:
                if isinstance(event, ImageEvent) and event.purpose != "catalog_photo":
                    continue
                photos[event.item_id] = event.image
                deleted.discard(event.item_id)
        if not photos and not deleted:
            return 0
        from stream.catalog import decode_photos, embed_photos

        vectors = self.read()
        for item_id in deleted:
            vectors.pop(item_id, None)
        unusable = 0
        pending = list(photos.items())
        for start in range(0, len(pending), PHOTO_CHUNK):
            chunk = pending[start:start + PHOTO_CHUNK]
            pixels, errors = decode_photos(self.settings, self.encoder, [ref for _, ref in chunk])
            embedded = embed_photos(self.encoder, pixels)  # (len(chunk), image_dim)
            for row, ((item_id, _), error) in enumerate(zip(chunk, errors)):
                if error is None:
                    vectors[item_id] = embedded[row]
                else:
                    unusable += 1
        self._write(vectors)
        return unusable

    def _write(self, vectors: dict[str, np.ndarray]) -> None:
        ids = list(vectors)
        dim = len(next(iter(vectors.values()))) if vectors else 0
        matrix = np.stack([vectors[i] for i in ids]).astype(np.float32) if ids else np.zeros((0, dim), np.float32)
        replace_whole(self.path, lambda handle: np.savez(handle, item_ids=np.asarray(ids, dtype=str), vectors=matrix),
                      scratch="photos.writing.npz")


def photo_matrix(item_ids: list[str], photos: dict[str, np.ndarray], image_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, image_dim) photo vectors of ``item_ids`` (zero rows without one) and (N,) has_image."""
    image = np.zeros((len(item_ids), image_dim), np.float32)
    has_image = np.zeros(len(item_ids), bool)
    for row, item_id in enumerate(item_ids):
        vector = photos.get(item_id)
        if vector is not None:
            image[row], has_image[row] = vector, True
    return image, has_image
