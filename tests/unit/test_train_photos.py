"""``streamrec train`` on the general format with photos: the image projection learns and is served."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.export.fused import Networks
from model.serving.contract import ItemContent
from model.serving.trained import TrainedModel
from tests.integration.synthetic import PHOTO_ITEMS as N_ITEMS
from tests.integration.synthetic import train_photo_model


@pytest.fixture(scope="module")
def artefact(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("photos")
    train_photo_model(root, models_dir / "towers")
    return root / "artefact", root


def test_the_image_projection_is_trained_and_stored(artefact: tuple[Path, Path]) -> None:
    directory, _ = artefact
    networks = Networks.load(directory)
    assert networks.item_tower.image_projection.weight.abs().sum() > 0
    # Items without a photo read the learned "missing" vector, which training moved from zero.
    assert networks.item_tower.missing_image.abs().sum() > 0
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["data"]["items_with_image"] == 27 and manifest["data"]["items_with_text"] == 29
    with np.load(directory / "item_features.npz") as features:
        assert features["has_image"].tolist() == [False] + [True] * 27 + [False] * 3
        assert features["image"].shape == (N_ITEMS + 1, 1280)


def test_served_vectors_use_the_stored_photo_and_a_new_one(artefact: tuple[Path, Path]) -> None:
    directory, _ = artefact
    model = TrainedModel(directory)
    stored = model.catalogue_content(np.arange(N_ITEMS + 1))
    assert stored.has_image[1] and not stored.has_image[29]

    def content(item_id: str, image: np.ndarray | None) -> ItemContent:
        return ItemContent([item_id], np.zeros((1, model.text_dim), np.float32),
                           np.zeros((1, model.image_dim), np.float32) if image is None else image[None],
                           np.zeros(1, bool), np.asarray([image is not None]), [""])

    # A known item sent without its photo keeps the photo it was trained with.
    np.testing.assert_allclose(model.item_vectors(content("i01", None)),
                               model.item_vectors(content("i01", stored.image[1])), atol=1e-6)
    # A new photo moves a new item's vector; a red photo puts it nearer the red group than none does.
    red, blue = stored.image[2], stored.image[25]
    unknown_red, unknown_blue = model.item_vectors(content("new", red)), model.item_vectors(content("new", blue))
    assert not np.allclose(unknown_red, unknown_blue, atol=1e-4)


def test_the_cache_holds_every_photo(artefact: tuple[Path, Path], models_dir: Path) -> None:
    _, root = artefact
    caches = list((root / "cache").glob("image-*.npz"))
    assert len(caches) == 1
    with np.load(caches[0]) as cache:
        assert len(cache["keys"]) == 27
