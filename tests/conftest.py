"""Shared fixtures: real broker and real store, started by the test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests check what holds, not how fast: a per-example deadline only
# makes them fail when the machine is busy with other work.
settings.register_profile("streamrec", deadline=None)
settings.load_profile("streamrec")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """Exported towers and the rule scorer, built once (``make test`` runs setup first)."""
    from core.settings import load_settings
    from model.export.prepare import prepare_models
    from stream.services import load_serving_model

    folder = Path(os.environ.get("STREAMREC_TEST_MODELS", REPO / ".streamrec" / "models"))
    settings = load_settings(model_dir=folder)
    prepare_models(settings)
    load_serving_model(settings)
    return folder
