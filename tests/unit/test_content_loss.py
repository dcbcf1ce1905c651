"""The content-only loss: new items ranked against each other by their content alone (tiny data)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from model.nets.towers import TowerConfig, attribute_mixing
from model.training.data import InteractionData, newest_items
from model.training.retrieval import (
    Catalogue,
    RetrievalModel,
    RetrievalSettings,
    _train_epoch,
    content_only_loss,
    make_optimizer,
    training_pairs,
)

N_ITEMS, TEXT_DIM = 6, 4


def model_and_catalogue(newest: list[int] | None) -> tuple[RetrievalModel, Catalogue]:
    torch.manual_seed(0)
    config = TowerConfig(n_items=N_ITEMS, n_attributes=2, max_attributes=1, fused_dim=8, text_dim=TEXT_DIM,
                         image_dim=3, max_sequence=5, n_layers=1, dropout=0.0, attention_dropout=0.0)
    model = RetrievalModel(config)
    with torch.no_grad():  # ids large enough that reading them would change every score
        model.item_tower.item_embedding.weight.normal_(std=1.0)
    attributes = torch.tensor([[0], [1], [2], [1], [2], [1], [2]])
    text = torch.randn(N_ITEMS + 1, TEXT_DIM)
    mask = None
    if newest is not None:
        mask = torch.zeros(N_ITEMS + 1, dtype=torch.bool)
        mask[newest] = True
    catalogue = Catalogue(attributes=attributes, attribute_mixing=attribute_mixing(attributes, 2), text=text,
                          has_text=torch.ones(N_ITEMS + 1), newest=mask)
    return model, catalogue


def test_only_steps_to_a_new_item_count_and_only_new_items_compete() -> None:
    model, catalogue = model_and_catalogue(newest=[4, 5, 6])
    hidden = torch.randn(2, 3, 8)
    targets = torch.tensor([[1, 5, 0], [4, 2, 6]])  # 0: padding
    mask = targets > 0
    settings = RetrievalSettings(content_loss_weight=1.0)
    loss = content_only_loss(model, hidden, targets, mask, catalogue, settings)
    with torch.no_grad():
        unknown = replace(catalogue, id_rows=torch.zeros(N_ITEMS + 1, dtype=torch.long))
        content = model.catalogue_vectors(unknown)  # every item by its content (id row 0)
    states = torch.stack([hidden[0, 1], hidden[1, 0], hidden[1, 2]])  # the steps whose target is new
    logits = states @ content[[4, 5, 6]].T
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 0, 2]))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_the_content_only_loss_never_reads_an_items_own_id_row() -> None:
    model, catalogue = model_and_catalogue(newest=[4, 5, 6])
    hidden, targets = torch.randn(1, 3, 8), torch.tensor([[4, 5, 6]])
    settings = RetrievalSettings(content_loss_weight=1.0)
    before = float(content_only_loss(model, hidden, targets, targets > 0, catalogue, settings).detach())
    with torch.no_grad():
        model.item_tower.item_embedding.weight[1:] += 3.0 * torch.randn(N_ITEMS, 8)
    assert float(content_only_loss(model, hidden, targets, targets > 0, catalogue, settings).detach()) == pytest.approx(before)
    with torch.no_grad():
        model.item_tower.text_projection.weight.mul_(3.0)
    assert float(content_only_loss(model, hidden, targets, targets > 0, catalogue, settings).detach()) != pytest.approx(before)


def test_without_a_step_to_a_new_item_the_loss_is_zero() -> None:
    model, catalogue = model_and_catalogue(newest=[6])
    hidden = torch.randn(1, 3, 8, requires_grad=True)
    targets = torch.tensor([[1, 2, 3]])
    loss = content_only_loss(model, hidden, targets, targets > 0, catalogue, RetrievalSettings())
    assert float(loss.detach()) == 0.0
    loss.backward()  # still a graph: the training step can add it unconditionally


def test_a_training_step_adds_the_weighted_content_only_loss() -> None:
    sequences = [np.array([1, 4, 2, 5]), np.array([3, 6, 4])]
    inputs, targets = (torch.from_numpy(a) for a in training_pairs(sequences, 5))
    losses = {}
    for weight in (0.0, 2.0):
        model, catalogue = model_and_catalogue(newest=[4, 5, 6])
        settings = RetrievalSettings(content_loss_weight=weight, learning_rate=0.0, batch_size=8)
        losses[weight] = _train_epoch(model, make_optimizer(model, settings, 0.0), (inputs, targets),
                                      catalogue, settings, None, lambda _: 1.0, 1, np.random.default_rng(0))
    model, catalogue = model_and_catalogue(newest=[4, 5, 6])
    model.train()
    with torch.no_grad():
        vectors = model.catalogue_vectors(catalogue)
        hidden = model.user_tower.encode(vectors[inputs], torch.where(inputs > 0, 4, 0))
        extra = content_only_loss(model, hidden, targets, targets > 0, catalogue, RetrievalSettings())
    rows = int((targets > 0).sum())
    assert losses[2.0] == pytest.approx(losses[0.0] + 2.0 * float(extra), rel=1e-4)
    assert rows == 5 and float(extra) > 0


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_the_text_projection_learns_at_its_share_of_the_rate(share: float) -> None:
    sequences = [np.array([1, 4, 2, 5]), np.array([3, 6, 4])]
    pairs = tuple(torch.from_numpy(a) for a in training_pairs(sequences, 5))
    model, catalogue = model_and_catalogue(newest=[4, 5, 6])
    settings = RetrievalSettings(learning_rate=0.05, text_learning_rate_share=share, weight_decay=0.0)
    text_before = model.item_tower.text_projection.weight.detach().clone()
    ids_before = model.item_tower.item_embedding.weight.detach().clone()
    _train_epoch(model, make_optimizer(model, settings, settings.learning_rate), pairs, catalogue, settings,  # type: ignore[arg-type]
                 None, lambda _: 1.0, 1, np.random.default_rng(0))
    assert not torch.equal(model.item_tower.item_embedding.weight, ids_before)
    assert torch.equal(model.item_tower.text_projection.weight, text_before) == (share == 0.0)


def test_newest_items_follow_the_first_interaction_time() -> None:
    data = InteractionData("tiny", ["a", "b"], [np.array([1, 2, 3]), np.array([4, 2])], ["1", "2", "3", "4"],
                           np.zeros((5, 1), np.int64), [],
                           timestamps=[np.array([1.0, 2.0, 9.0]), np.array([5.0, 6.0])])
    assert np.flatnonzero(newest_items(data, 0.5)).tolist() == [3, 4]
    with pytest.raises(ValueError, match="timestamps"):
        newest_items(replace(data, timestamps=None), 0.5)
