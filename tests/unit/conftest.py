"""Fixtures that open a worker's services in this process (see tests/unit/world.py)."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from core.settings import load_settings
from model.serving.content import ImageEncoder, TextEncoder
from stream.services import Services
from tests.unit.world import World


@pytest.fixture(scope="module")
def shared_encoders() -> Iterator[None]:
    """Load each exported tower once per module instead of once per test.

    The encoders are stateless ONNX sessions, so every ``Services.open`` below
    still gets the real objects; only the half-second load is shared.
    """
    loaded: dict[tuple[type, Path], object] = {}
    with pytest.MonkeyPatch.context() as patch:
        for encoder in (TextEncoder, ImageEncoder):
            load = encoder.from_dir

            def from_dir(model_dir: Path, *, load=load, encoder=encoder, **options: object) -> object:
                key = (encoder, Path(model_dir).resolve())
                if key not in loaded:
                    loaded[key] = load(model_dir, **options)
                return loaded[key]

            patch.setattr(encoder, "from_dir", from_dir)
        yield


@pytest.fixture
def open_world(
    models_dir: Path, shared_encoders: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., World]]:
    """Opens the worker of a test, with settings overridden as given (once per test)."""
    for name in list(os.environ):
        if name.startswith("STREAMREC_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env file
    (tmp_path / "images").mkdir()
    opened: list[Services] = []

    def open_(**overrides: object) -> World:
        assert not opened, "one worker per test"
        settings = load_settings(
            data_dir=tmp_path / "state", model_dir=models_dir, image_root=tmp_path / "images", **overrides
        )
        registry = CollectorRegistry()
        opened.append(Services.open(settings, registry))
        return World(opened[0], registry)

    try:
        yield open_
    finally:
        for services in opened:
            services.close()


@pytest.fixture
def world(open_world: Callable[..., World]) -> World:
    return open_world()
