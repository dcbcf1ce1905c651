"""``streamrec train`` on the general format with photos: the image projection learns and is served."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.export.fused import Networks
from model.serving.contract import ItemContent, attribute_text
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


def test_an_item_the_model_does_not_know_is_placed_by_its_category_and_attributes(
        artefact: tuple[Path, Path]) -> None:
    """A catalogue item listed after training reads its ``key=value`` attributes as training did."""
    import torch

    directory, _ = artefact
    model, networks = TrainedModel(directory), Networks.load(directory)
    names = json.loads((directory / "id_maps.json").read_text())["attributes"]
    assert {"g1", "shelf=s0", "shelf=s1"} <= set(names)
    text, image = np.zeros((1, model.text_dim), np.float32), np.zeros((1, model.image_dim), np.float32)

    def served(category: str, attributes: dict[str, str]) -> np.ndarray:
        return model.item_vectors(ItemContent(["listed-later"], text, image, np.zeros(1, bool), np.zeros(1, bool),
                                              [attribute_text(category, attributes)]))

    with torch.no_grad():
        networks.item_tower.eval()
        trained = networks.item_tower(torch.tensor([0]), torch.tensor([[names["g1"], names["shelf=s1"]]]),
                                      torch.from_numpy(text), torch.from_numpy(image), torch.zeros(1), torch.zeros(1))
    np.testing.assert_allclose(served("g1", {"shelf": "s1"}), trained.numpy(), atol=1e-5)
    assert not np.allclose(served("g1", {"shelf": "s1"}), served("g1", {"shelf": "s0"}), atol=1e-4)
    # A value the model never saw is left out, as an unknown category is.
    np.testing.assert_allclose(served("g1", {"shelf": "s9"}), served("g1", {}), atol=1e-6)


def test_the_cache_holds_every_photo(artefact: tuple[Path, Path], models_dir: Path) -> None:
    _, root = artefact
    caches = list((root / "cache").glob("image-*.npz"))
    assert len(caches) == 1
    with np.load(caches[0]) as cache:
        assert len(cache["keys"]) == 27


def test_fine_tuning_from_it_trains_on_its_stored_photos(artefact: tuple[Path, Path], models_dir: Path) -> None:
    """A cycle warm-starting from a version trained with photos hands the item tower those photos."""
    from finetune.candidate import build_window
    from model.serving.content import TextEncoder

    directory, _ = artefact
    parent = TrainedModel(directory)
    assert parent.stored_image is not None and parent.stored_has_image is not None

    rows = [{"t": float(n), "u": f"u{n % 4}", "i": f"i{1 + n % N_ITEMS:02d}", "a": 4} for n in range(60)]
    encoder = TextEncoder.from_dir(models_dir / "towers" / "text")
    window = build_window(rows, {}, parent, encoder, "photos")
    catalogue = window.catalogue()
    assert catalogue.image is not None and catalogue.has_image is not None
    np.testing.assert_array_equal(catalogue.image.numpy(), parent.stored_image)
    assert catalogue.has_image.numpy().astype(bool).tolist() == [False] + [True] * 27 + [False] * 3
    # A photo drained from the stream replaces the stored one; an item without stays without.
    fresh = np.full(parent.image_dim, 1 / np.sqrt(parent.image_dim), np.float32)
    window = build_window(rows, {}, parent, encoder, "photos", {"i02": fresh, "i29": fresh}, parent.image_dim)
    assert window.image is not None and window.has_image is not None
    np.testing.assert_array_equal(window.image[parent.item_index["i02"]], fresh)
    np.testing.assert_array_equal(window.image[parent.item_index["i01"]], parent.stored_image[parent.item_index["i01"]])
    assert window.has_image[parent.item_index["i29"]] and not window.has_image[parent.item_index["i30"]]
    content = window.content(encoder, window.fields, {}, parent.image_dim)  # what the held-out evaluation serves
    np.testing.assert_array_equal(content.image, window.image[1:])
