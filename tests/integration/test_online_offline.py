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
from core.events import CatalogItem, ClickEvent
from core.settings import Settings
from model.export.fused import Networks
from model.serving.content import TextEncoder
from model.serving.contract import ACTION_CODE, TRAINED_TEXT_FIELDS
from tests.integration.helpers import (
    ask_http,
    ask_kafka,
    processed,
    publish,
    user_state,
    wait_until,
)
from tests.integration.synthetic import N_ITEMS, category, registry_with, walk

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
