"""The model registry: add, list, promote, roll back, and refuse corrupt artefacts.

Artefacts here hold placeholder bytes under the real file names: the registry
checks layout and hashes, it never opens the networks (``load`` does; the
fine-tuning integration test covers that with real exported models).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from core.errors import ConfigError, ModelLoadError
from model.serving.artefact import REQUIRED_FILES, write_manifest
from model.serving.registry import CURRENT, Registry


def make_artefact(folder: Path, version: str, parent: str | None = None, created_at: str = "") -> Path:
    folder.mkdir(parents=True)
    for name in REQUIRED_FILES:
        (folder / name).write_bytes(f"{version}:{name}".encode())
    write_manifest(folder, {"version": version, "parent": parent, "created_at": created_at,
                            "metrics": {"ndcg@10": 0.1}})
    return folder


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


def add(registry: Registry, tmp_path: Path, version: str, created_at: str) -> str:
    return registry.add(make_artefact(tmp_path / "build" / version, version, created_at=created_at))


def test_add_list_and_promote(registry: Registry, tmp_path: Path) -> None:
    assert registry.versions() == [] and registry.current_version() is None
    add(registry, tmp_path, "v1", "2026-01-01T00:00:00Z")
    add(registry, tmp_path, "v2", "2026-01-02T00:00:00Z")
    assert [v.version for v in registry.versions()] == ["v1", "v2"]
    registry.promote("v1")
    assert registry.current_version() == "v1"
    current = registry.root / CURRENT
    assert current.is_symlink() and not os.readlink(current).startswith("/")
    assert (current / "manifest.json").is_file()
    registry.promote("v2")
    assert registry.current_version() == "v2"
    assert [v.version for v in registry.versions() if v.current] == ["v2"]
    assert [entry["version"] for entry in registry.history()] == ["v1", "v2"]
    with pytest.raises(ConfigError):
        add(registry, tmp_path / "again", "v2", "")


def test_rollback_walks_back_through_promotions(registry: Registry, tmp_path: Path) -> None:
    for day, version in enumerate(("v1", "v2", "v3"), start=1):
        add(registry, tmp_path, version, f"2026-01-0{day}T00:00:00Z")
        registry.promote(version)
    assert registry.rollback() == "v2"
    assert registry.current_version() == "v2"
    assert registry.rollback() == "v1"
    with pytest.raises(ConfigError):
        registry.rollback()
    assert registry.current_version() == "v1"


def test_corrupt_artefact_is_refused_and_current_is_kept(registry: Registry, tmp_path: Path) -> None:
    add(registry, tmp_path, "good", "2026-01-01T00:00:00Z")
    add(registry, tmp_path, "bad", "2026-01-02T00:00:00Z")
    registry.promote("good")
    (registry.path("bad") / "ranker.onnx").write_bytes(b"flipped bits")
    with pytest.raises(ModelLoadError, match="sha256"):
        registry.promote("bad")
    assert registry.current_version() == "good"
    with pytest.raises(ModelLoadError, match="sha256"):
        registry.load("bad")


def test_incomplete_artefact_is_refused(registry: Registry, tmp_path: Path) -> None:
    folder = make_artefact(tmp_path / "build" / "partial", "partial")
    (folder / "user_tower.onnx").unlink()
    with pytest.raises(ModelLoadError, match="lacks user_tower.onnx"):
        registry.add(folder)
    assert registry.versions() == []


def test_rollback_skips_a_corrupted_earlier_version(registry: Registry, tmp_path: Path) -> None:
    for day, version in enumerate(("v1", "v2", "v3"), start=1):
        add(registry, tmp_path, version, f"2026-01-0{day}T00:00:00Z")
        registry.promote(version)
    manifest = registry.path("v2") / "manifest.json"
    data = json.loads(manifest.read_text())
    data["files"]["weights.pt"] = "0" * 64
    manifest.write_text(json.dumps(data))
    assert registry.rollback() == "v1"


def test_version_names_cannot_escape_the_registry(registry: Registry) -> None:
    with pytest.raises(ConfigError):
        registry.path("../elsewhere")
    with pytest.raises(ModelLoadError):
        registry.verify("missing")
