"""Every ``ServingModel`` implementation provides all the Protocol declares (river-style contract checks).

Workers read models through the Protocol with plain attribute access, so an
implementation missing a member fails a request, not an import: the members
are read off the Protocol itself, so a new declaration is checked here too.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch

from model.export.rule_scorer import build_rule_scorer
from model.serving.contract import CONTEXT_FEATURES, ServingModel
from model.serving.rule_model import RuleModel
from model.serving.trained import TrainedModel
from model.training.data import InteractionData
from model.training.ranker import RankerSettings
from model.training.retrieval import RetrievalSettings
from model.training.train import train_artefact

N_ITEMS = 12


def protocol_attributes() -> set[str]:
    return set(ServingModel.__annotations__)


def protocol_methods() -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(ServingModel).items()
        if inspect.isfunction(member) and not name.startswith("_")
    }


def rule_model(folder: Path) -> RuleModel:
    build_rule_scorer(folder)
    return RuleModel(folder)


def trained_model(folder: Path) -> TrainedModel:
    """A barely trained artefact: the contract is about members, not quality."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    sequences = [np.asarray([(start + step) % N_ITEMS + 1 for step in range(6)], dtype=np.int64)
                 for start in rng.integers(0, N_ITEMS, 60)]
    data = InteractionData(
        name="contract",
        user_ids=[str(user) for user in range(len(sequences))],
        sequences=sequences,
        item_ids=[f"sku-{item}" for item in range(1, N_ITEMS + 1)],
        attributes=np.zeros((N_ITEMS + 1, 1), dtype=np.int64),
        attribute_names=["category-1"],
    )
    train_artefact(
        data, "s3rec", None, folder,
        tower_overrides={"fused_dim": 8, "max_sequence": 6, "n_layers": 1, "ranker_hidden": 4},
        retrieval=RetrievalSettings(epochs=1, minutes=0.5, eval_every=1),
        ranker=RankerSettings(candidates=5, negatives=2, epochs=1),
        progress=False,
    )
    return TrainedModel(folder)


@pytest.fixture(scope="module", params=["rule", "trained"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ServingModel:
    build = {"rule": rule_model, "trained": trained_model}[request.param]
    return build(tmp_path_factory.mktemp(request.param) / "model")


def test_the_protocol_declares_what_workers_read() -> None:
    # Guards the reading below: an empty set would make the other checks pass vacuously.
    assert {"config", "item_index", "item_ids", "transitions", "covisit_weight"} <= protocol_attributes()
    assert {"item_vectors", "query_vectors", "user_vectors", "score", "context_features"} <= set(protocol_methods())


def test_every_declared_attribute_is_provided(model: ServingModel) -> None:
    missing = sorted(name for name in protocol_attributes() if not hasattr(model, name))
    assert missing == [], f"{type(model).__name__} lacks {missing}"


def test_every_declared_method_is_provided_with_the_same_parameters(model: ServingModel) -> None:
    for name, declared in protocol_methods().items():
        provided = getattr(model, name, None)
        assert callable(provided), f"{type(model).__name__} lacks {name}()"
        # Bound: the declared signature without ``self``.
        assert list(inspect.signature(provided).parameters) == list(declared.parameters)[1:], name


def test_the_item_vocabulary_is_one_map_and_its_inverse(model: ServingModel) -> None:
    assert isinstance(model.config, dict)
    assert model.item_ids[0] == "" and 0 not in model.item_index.values()
    assert all(model.item_ids[index] == item_id for item_id, index in model.item_index.items())


def test_context_features_are_the_models_own_or_none(model: ServingModel) -> None:
    ids = ["sku-1", "never-seen"]
    context = model.context_features(ids, np.array([0.9, 0.1], np.float32), 1.7e9)
    if isinstance(model, RuleModel):
        assert context is None  # the worker's live context
    else:
        assert context is not None and context.shape == (len(ids), len(CONTEXT_FEATURES))
