"""Artefact directories: file layout, manifest with hashes, atomic publication.

Layout of one trained model version::

    item_tower.onnx  user_tower.onnx  ranker.onnx   (served)
    weights.pt        state dicts, read only by the trainer / fine-tuner
    config.json       network config, training settings, encoder names
    id_maps.json      domain item id -> index, attribute name -> index
    item_features.npz per-item inputs needed to recompute item vectors
    manifest.json     version, parent, created_at, data, metrics, sha256 of every file
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.errors import ModelLoadError

MANIFEST = "manifest.json"
REQUIRED_FILES: tuple[str, ...] = (
    "item_tower.onnx",
    "user_tower.onnx",
    "ranker.onnx",
    "weights.pt",
    "config.json",
    "id_maps.json",
    "item_features.npz",
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        path.name: sha256_file(path)
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_version(dataset: str) -> str:
    """e.g. ``toys-and-games-20261128T101500Z``: sortable, readable, unique per second."""
    slug = "".join(c if c.isalnum() else "-" for c in dataset.lower()).strip("-")
    return f"{slug}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the sha256 of every other file in ``directory`` and write ``manifest.json``."""
    complete = dict(manifest, files=file_hashes(directory))
    (directory / MANIFEST).write_text(json.dumps(complete, indent=2, sort_keys=True) + "\n")
    return complete


def read_manifest(directory: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of an artefact; with ``verify`` every listed file must match its hash."""
    path = directory / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from error
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise ModelLoadError(f"artefact {directory} lacks {', '.join(missing)}")
    if verify:
        for name, expected in manifest.get("files", {}).items():
            file = directory / name
            if not file.is_file() or sha256_file(file) != expected:
                raise ModelLoadError(f"artefact file {file} is missing or does not match its sha256")
    return manifest


def staging_directory(final: Path) -> Path:
    """A fresh sibling directory to build an artefact in before ``publish``."""
    staging = final.parent / f".{final.name}.staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, final: Path) -> None:
    """Move a complete artefact into place with renames, never leaving a half-written ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        retired = final.parent / f".{final.name}.retired-{os.getpid()}"
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired)
    else:
        os.replace(staging, final)
