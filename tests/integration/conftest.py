"""Integration fixtures: one embedded broker per session, a fresh worker per test.

Each test gets its own topic prefix, consumer group, vector-store folder and
HTTP port, so tests cannot see each other's events or state.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.stack import LocalStack, free_port
from core.settings import Settings, load_settings
from stream.broker import EmbeddedBroker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(free_port(), log_path=log) as running:
        yield running


@pytest.fixture(scope="session")
def base_artefact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained model (``tests.integration.synthetic``), trained once per session."""
    from tests.integration.synthetic import train_walk_model

    return train_walk_model(tmp_path_factory.mktemp("base") / "artefact")


@pytest.fixture
def settings(broker: EmbeddedBroker, models_dir: Path, tmp_path: Path) -> Settings:
    tag = uuid.uuid4().hex[:8]
    return load_settings(
        bootstrap_servers=broker.bootstrap,
        topic_prefix=f"t{tag}.",
        app_id=f"streamrec-test-{tag}",
        data_dir=tmp_path / "data",
        model_dir=models_dir,
        http_port=free_port(),
        partitions=2,
        batch_within_s=0.002,
    )


@pytest.fixture
def stack(settings: Settings, tmp_path: Path) -> Iterator[LocalStack]:
    with LocalStack(settings, log_dir=tmp_path / "logs", start_broker=False) as running:
        yield running
