"""The fine-tuner's photo vectors: drained from catalogue events and catalogue photos, as a worker applies them."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image

from core.events import CatalogItem, ImageEvent, ImageRef
from core.settings import load_settings
from finetune.candidate import window_photos
from finetune.photos import PhotoLog, photo_matrix
from model.serving.content import ImageEncoder


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def item(item_id: str, image: ImageRef | None = None, op: str = "upsert") -> CatalogItem:
    return CatalogItem(event_id=f"c-{item_id}-{op}", event_time=1.0, item_id=item_id, title=item_id, op=op,  # type: ignore[arg-type]
                       image=image)


def test_photos_are_embedded_once_and_follow_upserts_photos_and_deletions(models_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "red.jpg").write_bytes(jpeg((220, 20, 20)))
    settings = load_settings(data_dir=tmp_path / "state", model_dir=models_dir, image_root=images)
    encoder = ImageEncoder.from_dir(models_dir / "towers" / "image")
    red, blue = encoder.encode([jpeg((220, 20, 20))])[0], encoder.encode([jpeg((20, 20, 220))])[0]
    log = PhotoLog(tmp_path / "finetune", settings, encoder)
    assert log.read() == {}

    unusable = log.apply([
        item("a", ImageRef(image_uri="red.jpg")),  # by path under the image root
        item("b", ImageRef(image_b64=base64.b64encode(jpeg((20, 20, 220))).decode())),  # inline
        item("c", ImageRef(image_uri="missing.jpg")),  # a worker dead-letters it: skipped, counted
        item("d"),
    ])
    assert unusable == 1
    stored = log.read()
    assert sorted(stored) == ["a", "b"]
    np.testing.assert_allclose(stored["a"], red, atol=1e-6)
    np.testing.assert_allclose(stored["b"], blue, atol=1e-6)

    # An upsert without a photo keeps it; a deletion removes it; a catalogue photo sets one;
    # a visual search is no item's photo.
    assert log.apply([
        item("a"), item("b", op="delete"),
        ImageEvent(event_id="p-d", event_time=2.0, purpose="catalog_photo", item_id="d",
                   image=ImageRef(image_uri="red.jpg")),
        ImageEvent(event_id="v-1", event_time=2.0, purpose="visual_search", user_id="u1",
                   image=ImageRef(image_uri="red.jpg")),
    ]) == 0
    stored = PhotoLog(tmp_path / "finetune", settings).read()  # from the file
    assert sorted(stored) == ["a", "d"]
    np.testing.assert_allclose(stored["d"], red, atol=1e-6)


def test_the_window_has_photos_only_where_items_have_them() -> None:
    vector = np.full(4, 0.5, np.float32)
    image, has_image = photo_matrix(["x", "y"], {"y": vector}, 4)
    assert has_image.tolist() == [False, True] and not image[0].any() and (image[1] == vector).all()
    window_image, window_has = window_photos(["x", "y", "z"], {"y": vector}, None, 4)
    assert window_image is not None and window_has is not None
    assert window_has.tolist() == [False, False, True, False]  # row 0: the unknown item
    assert window_photos(["x"], {}, None, 4) == (None, None)  # no photo anywhere: the old path
