"""The user vector a worker keeps online is the trained encoder's output for the same clicks.

A worker serves the small trained model of ``tests.integration.synthetic``
(promoted in its registry). The catalogue and a user's purchases go through
the broker; the user's stored vector is then compared with what the torch
networks from the artefact's ``weights.pt`` compute offline for the same
sequence (item tower on the same content, user tower on those item vectors).
The recommendations must come from that model: its version is on the
response, and the first item is the offline model's best unseen item.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.stack import LocalStack
from core.events import CatalogItem, ClickEvent, ImageEvent, ImageRef
from core.settings import Settings
from model.export.fused import Networks
from model.serving.content import ImageEncoder, TextEncoder
from model.serving.contract import ACTION_CODE, TRAINED_TEXT_FIELDS, attribute_names
from tests.integration.helpers import (
    ask_http,
    ask_kafka,
    processed,
    publish,
    user_state,
    wait_until,
)
from tests.integration.synthetic import (
    N_ITEMS,
    category,
    registry_with,
    train_photo_model,
    walk,
)

pytestmark = pytest.mark.integration

CLICKED = walk(start=40, step=1, length=12)  # i40 .. i51


@pytest.fixture
def trained_settings(settings: Settings, base_artefact: Path, models_dir: Path, tmp_path: Path) -> Settings:
    models = tmp_path / "models"
    registry_with(base_artefact, models, models_dir / "towers")
    return settings.model_copy(update={"model_dir": models})


def offline_vectors(artefact: Path, models_dir: Path, catalogue: dict[int, CatalogItem],
                    clicked: list[int], action: str) -> tuple[np.ndarray, np.ndarray]:
    """The torch networks' item vectors (catalogue order, (N, d)) and user vector for ``clicked``."""
    networks = Networks.load(artefact)
    networks.item_tower.eval()
    networks.user_tower.eval()
    numbers = sorted(catalogue)
    items = [catalogue[i] for i in numbers]
    # A trained model's item text is what it was trained on (the title), not every text field.
    encoder = TextEncoder.from_dir(models_dir / "towers" / "text")
    text = encoder.encode([item.text_for(TRAINED_TEXT_FIELDS) for item in items])
    count = len(items)
    with torch.no_grad():
        item_vectors = networks.item_tower(
            torch.tensor(numbers, dtype=torch.int64),
            # The attribute the model was trained with: category c<k> is attribute k + 1.
            torch.tensor([[int(item.category[1:]) + 1] for item in items], dtype=torch.int64),
            torch.from_numpy(text),
            torch.zeros(count, networks.config.image_dim),
            torch.ones(count),
            torch.zeros(count),
        )  # (N, d)
        sequence = item_vectors[[numbers.index(i) for i in clicked]].unsqueeze(0)  # (1, L, d)
        actions = torch.full((1, len(clicked)), ACTION_CODE[action], dtype=torch.int64)
        user = networks.user_tower(sequence, actions)[0]
    return item_vectors.numpy(), user.numpy()


def test_online_user_vector_equals_the_offline_encoder(
    trained_settings: Settings, base_artefact: Path, models_dir: Path, tmp_path: Path
) -> None:
    # The networks alone: co-visits would put the walk's next item first
    # (their serving is held to the offline ranking by test_prequential).
    settings = trained_settings.model_copy(update={"covisit_weight": 0.0})
    version = json.loads((base_artefact / "manifest.json").read_text())["version"]
    catalogue = {
        i: CatalogItem(event_id=f"cat-{i}", event_time=time.time(), item_id=f"i{i}",
                       title=f"item number {i}", category=category(i))
        for i in range(1, N_ITEMS + 1)
    }
    with LocalStack(settings, log_dir=tmp_path / "logs", start_broker=False) as stack:
        publish(settings, catalogue.values())
        wait_until(lambda: processed(stack, "catalog") >= N_ITEMS, 120, "catalogue applied")
        publish(settings, [
            ClickEvent(event_id=uuid.uuid4().hex, event_time=time.time() + n, user_id="walker",
                       item_id=f"i{i}", action="purchase")
            for n, i in enumerate(CLICKED)
        ])
        wait_until(lambda: len(user_state(settings, "walker").get("items", [])) == len(CLICKED), 60,
                   "clicks applied")
        state = user_state(settings, "walker")
        over_kafka, over_http = ask_kafka(settings, "walker", k=10), ask_http(settings, "walker", k=10)

    assert state["items"] == [f"i{i}" for i in CLICKED]
    assert state["model_version"] == version
    online = np.asarray(state["vector"], dtype=np.float32)
    item_vectors, offline = offline_vectors(base_artefact, models_dir, catalogue, CLICKED, "purchase")
    assert online.shape == offline.shape == (32,)
    np.testing.assert_allclose(online, offline, rtol=1e-3, atol=1e-4)

    # The offline model's best unseen item (the re-ranker always keeps the best first).
    scores = item_vectors @ offline  # (N,), catalogue order i1 .. iN
    scores[[i - 1 for i in CLICKED]] = -np.inf
    best = f"i{int(np.argmax(scores)) + 1}"
    for response in (over_kafka, over_http):
        assert response.model_version == version
        ranked = [item.item_id for item in response.items]
        assert len(ranked) == 10 and not set(ranked) & {f"i{i}" for i in CLICKED}
        assert ranked[0] == best, (ranked, best)


# ---- A model trained with photos: served as trained, and a new photo moves the item ----

PHOTO_CLICKS = ["i01", "i02", "i03", "i04", "i05"]


@pytest.fixture(scope="module")
def photo_model(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("photo-model")
    return train_photo_model(root, models_dir / "towers"), root


def photo_catalogue(root: Path) -> dict[str, CatalogItem]:
    """The catalogue the photo model was trained on, photos by file:// URI under the image root."""
    records = json.loads((root / "catalogue.json").read_text())
    return {
        r["item_id"]: CatalogItem(
            event_id=f"cat-{r['item_id']}", event_time=time.time(), item_id=r["item_id"], title=r["title"],
            category=r["category"], attributes=r["attributes"],
            image=ImageRef(image_uri=f"file://{root / 'images' / r['image']}") if r.get("image") else None)
        for r in records
    }


def offline_photo_user(artefact: Path, models_dir: Path, catalogue: dict[str, CatalogItem],
                       photos: dict[str, bytes], clicked: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Item ids, (N, d) item vectors and the user vector of the torch networks, photos included."""
    networks = Networks.load(artefact)
    networks.item_tower.eval()
    networks.user_tower.eval()
    config = json.loads((artefact / "config.json").read_text())
    id_maps = json.loads((artefact / "id_maps.json").read_text())
    ids = sorted(catalogue)
    items = [catalogue[i] for i in ids]
    text = TextEncoder.from_dir(models_dir / "towers" / "text").encode(
        [item.text_for(config["text_fields"]) for item in items])
    image_encoder = ImageEncoder.from_dir(models_dir / "towers" / "image")
    image = np.zeros((len(ids), image_encoder.dim), np.float32)
    has_image = np.asarray([i in photos for i in ids])
    image[has_image] = image_encoder.encode([photos[i] for i in ids if i in photos])
    with torch.no_grad():
        item_vectors = networks.item_tower(
            torch.tensor([id_maps["items"][i] for i in ids]),
            torch.tensor([[id_maps["attributes"][name] for name in attribute_names(item.category, item.attributes)]
                          for item in items]),
            torch.from_numpy(text),
            torch.from_numpy(image),
            torch.tensor([1.0 if item.title else 0.0 for item in items]),
            torch.from_numpy(has_image.astype(np.float32)),
        )
        sequence = item_vectors[[ids.index(i) for i in clicked]].unsqueeze(0)
        actions = torch.full((1, len(clicked)), ACTION_CODE["view"], dtype=torch.int64)
        user = networks.user_tower(sequence, actions)[0]
    return ids, item_vectors.numpy(), user.numpy()


def test_a_model_trained_with_photos_is_served_as_trained(
    settings: Settings, photo_model: tuple[Path, Path], models_dir: Path, tmp_path: Path
) -> None:
    artefact, root = photo_model
    models = tmp_path / "models"
    registry_with(artefact, models, models_dir / "towers")
    settings = settings.model_copy(update={"model_dir": models, "covisit_weight": 0.0, "image_root": root})
    catalogue = photo_catalogue(root)
    photos = {i: (root / "images" / f"{int(i[1:])}.jpg").read_bytes() for i, item in catalogue.items() if item.image}
    # A new photo for i05: one of the blue group's, replacing its red one.
    new_photo = root / "images" / "25.jpg"
    with LocalStack(settings, log_dir=tmp_path / "logs", start_broker=False) as stack:
        publish(settings, catalogue.values())
        wait_until(lambda: processed(stack, "catalog") >= len(catalogue), 120, "catalogue applied")
        clicks = [ClickEvent(event_id=uuid.uuid4().hex, event_time=time.time() + n, user_id="viewer",
                             item_id=item, action="view") for n, item in enumerate(PHOTO_CLICKS)]
        publish(settings, clicks)
        wait_until(lambda: len(user_state(settings, "viewer").get("items", [])) == len(PHOTO_CLICKS), 60,
                   "clicks applied")
        before = np.asarray(user_state(settings, "viewer")["vector"], dtype=np.float32)
        response = ask_http(settings, "viewer", k=10)

        publish(settings, [ImageEvent(event_id="photo-i05", event_time=time.time(), purpose="catalog_photo",
                                      item_id="i05", image=ImageRef(image_uri=f"file://{new_photo}"))])
        wait_until(lambda: processed(stack, "images") >= 1, 120, "photo applied")
        publish(settings, [ClickEvent(event_id=uuid.uuid4().hex, event_time=time.time() + n, user_id="second",
                                      item_id=item, action="view") for n, item in enumerate(PHOTO_CLICKS)])
        wait_until(lambda: len(user_state(settings, "second").get("items", [])) == len(PHOTO_CLICKS), 60,
                   "second user's clicks applied")
        after = np.asarray(user_state(settings, "second")["vector"], dtype=np.float32)

    ids, item_vectors, offline = offline_photo_user(artefact, models_dir, catalogue, photos, PHOTO_CLICKS)
    np.testing.assert_allclose(before, offline, rtol=1e-3, atol=1e-4)
    scores = item_vectors @ offline
    scores[[ids.index(i) for i in PHOTO_CLICKS]] = -np.inf
    assert response.items[0].item_id == ids[int(np.argmax(scores))]
    assert not {item.item_id for item in response.items} & set(PHOTO_CLICKS)

    # The same clicks after i05's photo changed: the served i05 is the one with the new photo.
    _, _, offline_after = offline_photo_user(artefact, models_dir, catalogue,
                                             {**photos, "i05": new_photo.read_bytes()}, PHOTO_CLICKS)
    np.testing.assert_allclose(after, offline_after, rtol=1e-3, atol=1e-4)
    assert np.abs(after - before).max() > 1e-3
