"""Fine-tuning on the newest step, its length chosen on held-out users' validation items (tiny data)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from model.nets.towers import TowerConfig, attribute_mixing
from model.training.data import InteractionData, leave_one_out
from model.training.retrieval import (
    Catalogue,
    RetrievalSettings,
    fine_tune_newest,
    full_ranking_metrics,
    held_out_users,
    newest_step_sequences,
    train_retrieval,
)
from model.training.train import training_device

N_ITEMS = 12


def walk_data() -> InteractionData:
    rng = np.random.default_rng(0)
    # Users walk the items in order from a random start: the next item is learnable.
    sequences = [np.arange(start, start + length) % N_ITEMS + 1
                 for start, length in zip(rng.integers(0, N_ITEMS, 60), rng.integers(4, 9, 60))]
    data = InteractionData(name="walk", user_ids=[str(u) for u in range(60)], sequences=sequences,
                           item_ids=[str(i) for i in range(1, N_ITEMS + 1)],
                           attributes=np.zeros((N_ITEMS + 1, 1), dtype=np.int64), attribute_names=[])
    return data


def world() -> tuple[TowerConfig, Catalogue, object]:
    data = walk_data()
    attributes = torch.from_numpy(data.attributes)
    catalogue = Catalogue(attributes=attributes, attribute_mixing=attribute_mixing(attributes, 0))
    config = TowerConfig(n_items=N_ITEMS, n_attributes=0, max_attributes=1, fused_dim=8, text_dim=4, image_dim=3,
                         max_sequence=8, n_layers=1, dropout=0.0, attention_dropout=0.0)
    return config, catalogue, leave_one_out(data)


SETTINGS = RetrievalSettings(negatives=0, epochs=4, eval_every=1, batch_size=16, seed=3,
                             fine_tune_epochs=3, fine_tune_holdout=0.25, train_action=4)


def test_held_out_users_keep_their_validation_item_out_of_the_fine_tuning() -> None:
    _, _, split = world()
    held = held_out_users(len(split.users), 0.25, seed=3)
    assert held.sum() == round(len(split.users) * 0.25)
    assert np.array_equal(held, held_out_users(len(split.users), 0.25, seed=3))  # seeded
    sequences = newest_step_sequences(split, held)
    for row, sequence in enumerate(sequences):
        expected = split.train[row] if held[row] else np.append(split.train[row], split.valid[row])
        assert np.array_equal(sequence, expected)  # a prefix of items[:-1]: never the test step


def held_ndcg(model, catalogue, split, settings) -> float:  # type: ignore[no-untyped-def]
    rows = np.flatnonzero(held_out_users(len(split.users), settings.fine_tune_holdout, settings.seed))
    return full_ranking_metrics(model, catalogue, [split.train[r] for r in rows], split.valid[rows],
                                model.user_tower.max_sequence, settings.train_action)["ndcg@10"]


def test_the_kept_state_is_the_epoch_that_ranks_the_held_out_validation_items_best() -> None:
    config, catalogue, split = world()
    model, _ = train_retrieval(config, SETTINGS, split, catalogue, progress=False)
    choice = fine_tune_newest(model, SETTINGS, split, catalogue, progress=False)
    assert len(choice.validation_ndcg) == SETTINGS.fine_tune_epochs + 1
    assert choice.best_epoch == int(np.argmax(choice.validation_ndcg))
    assert held_ndcg(model, catalogue, split, SETTINGS) == pytest.approx(choice.validation_ndcg[choice.best_epoch],
                                                                         abs=1e-6)


def test_fine_tuning_that_only_hurts_leaves_the_model_as_it_was() -> None:
    config, catalogue, split = world()
    model, _ = train_retrieval(config, SETTINGS, split, catalogue, progress=False)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    wrecking = replace(SETTINGS, learning_rate=50.0, fine_tune_lr_share=1.0, weight_decay=0.0)
    choice = fine_tune_newest(model, wrecking, split, catalogue, progress=False)
    assert choice.best_epoch == 0
    assert max(choice.validation_ndcg[1:]) < choice.validation_ndcg[0]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_asking_for_a_gpu_where_torch_sees_none_is_a_configuration_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert training_device("auto") == "cpu"
    assert training_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="--device cuda"):
        training_device("cuda")


def test_an_artefact_records_the_fine_tuning_and_serves_the_blend_chosen_after_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from model.export.fused import Networks
    from model.training.ranker import RankerSettings
    from model.training.train import FORMAT_RETRIEVAL, train_artefact

    torch.set_num_threads(1)
    _, _, split = world()
    data = walk_data()
    manifest = train_artefact(
        data, "s3rec", None, tmp_path / "model",
        tower_overrides={"fused_dim": 8, "max_sequence": 8, "n_layers": 1, "ranker_hidden": 4},
        retrieval=replace(FORMAT_RETRIEVAL["s3rec"], epochs=2, minutes=0.5, eval_every=1, fine_tune_epochs=2),
        ranker=RankerSettings(candidates=5, negatives=2, epochs=1, holdout_share=0.25), progress=False)
    fine_tune, ranker = manifest["metrics"]["fine_tune"], manifest["metrics"]["ranker"]
    assert fine_tune["held_out_users"] == int(0.25 * len(split.users))  # the ranker's held-out users
    assert len(fine_tune["held_out_valid_ndcg@10"]) == 3 and 0 <= fine_tune["epochs"] <= 2
    served = Networks.load(tmp_path / "model").ranker
    assert float(served.blend) == ranker["after_fine_tune"]["blend"]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["covisit"]["weight"] == manifest["metrics"]["covisit"]["weight"]
    # The ranker reads the counts of everything before the step it predicts: through items[:-1],
    # the newest step the towers learnt, not the items[:-2] they started from.
    from model.training.data import item_counts

    with np.load(tmp_path / "model" / "item_features.npz") as stored:
        np.testing.assert_array_equal(stored["popularity"], item_counts(split.inputs("test"), N_ITEMS))
