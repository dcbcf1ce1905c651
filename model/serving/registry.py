"""The model registry: a directory of artefact versions and a ``current`` pointer.

Layout::

    <models>/versions/<version>/   one artefact each (see ``model.serving.artefact``)
    <models>/current               symlink -> versions/<version> (what workers serve)
    <models>/promotions.jsonl      append-only log: one line per promotion or rollback

A version is added by renaming a complete staging directory into
``versions/`` (never half-written). Promotion verifies every file's sha256
before it switches ``current``; the switch itself is a new symlink renamed over
the old one, so a reader sees either the old or the new target, never neither.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError, ModelLoadError
from model.serving.artefact import MANIFEST, read_manifest

VERSIONS = "versions"
CURRENT = "current"
PROMOTIONS = "promotions.jsonl"


@dataclass(frozen=True)
class VersionInfo:
    """One registered version, as ``streamrec model list`` shows it."""

    version: str
    parent: str | None
    created_at: str
    path: Path
    current: bool
    metrics: dict[str, Any]


class Registry:
    """Verbs over the registry folder: add, list, verify, promote, rollback, load."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / VERSIONS

    # --- reading -------------------------------------------------------------
    def path(self, version: str) -> Path:
        if not version or "/" in version or version.startswith("."):
            raise ConfigError(f"not a version name: {version!r}")
        return self.versions_dir / version

    def current_version(self) -> str | None:
        """The promoted version, or None when nothing (or something unregistered) is current."""
        pointer = self.root / CURRENT
        if not pointer.is_symlink():
            return None
        target = Path(os.readlink(pointer))
        return target.name if target.parent.name == VERSIONS else None

    def versions(self) -> list[VersionInfo]:
        """Every registered version, oldest first (by creation time, then name)."""
        current = self.current_version()
        found: list[VersionInfo] = []
        if not self.versions_dir.is_dir():
            return found
        for folder in self.versions_dir.iterdir():
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            try:
                manifest = json.loads((folder / MANIFEST).read_text())
            except (OSError, ValueError):
                manifest = {}
            found.append(VersionInfo(
                version=folder.name,
                parent=manifest.get("parent"),
                created_at=str(manifest.get("created_at", "")),
                path=folder,
                current=folder.name == current,
                metrics=dict(manifest.get("metrics", {})),
            ))
        return sorted(found, key=lambda info: (info.created_at, info.version))

    def verify(self, version: str) -> dict[str, Any]:
        """The version's manifest after checking every file's sha256; ``ModelLoadError`` if not."""
        folder = self.path(version)
        if not folder.is_dir():
            raise ModelLoadError(f"version {version!r} is not in the registry {self.versions_dir}")
        manifest = read_manifest(folder, verify=True)
        if manifest.get("version") != version:
            raise ModelLoadError(f"{folder} holds version {manifest.get('version')!r}, not {version!r}")
        return manifest

    def load(self, version: str | None = None, *, threads: int = 1, int8: bool = False) -> Any:
        """A verified ``TrainedModel`` of ``version`` (default: the current one)."""
        from model.serving.trained import TrainedModel

        version = version or self.current_version()
        if version is None:
            raise ModelLoadError(f"no model is promoted in {self.root}")
        self.verify(version)
        return TrainedModel(self.path(version), threads=threads, int8=int8, verify=False)

    def history(self) -> list[dict[str, Any]]:
        log = self.root / PROMOTIONS
        if not log.is_file():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    # --- writing -------------------------------------------------------------
    def add(self, artefact: Path, *, move: bool = False) -> str:
        """Register a complete artefact directory; returns its version.

        The artefact is verified first; it is copied (or, with ``move``,
        renamed) into a hidden staging folder and renamed into ``versions/``.
        """
        manifest = read_manifest(Path(artefact), verify=True)
        version = str(manifest["version"])
        final = self.path(version)
        if final.exists():
            raise ConfigError(f"version {version!r} is already registered")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = self.versions_dir / f".{version}.adding-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        if move:
            os.replace(artefact, staging)
        else:
            shutil.copytree(artefact, staging)
        os.replace(staging, final)
        return version

    def promote(self, version: str, *, reason: str = "promote", details: dict[str, Any] | None = None) -> None:
        """Verify ``version`` and make it current atomically; log the promotion."""
        self.verify(version)
        previous = self.current_version()
        self._point_current_at(version)
        self._log({"action": reason, "version": version, "previous": previous, "at": time.time(),
                   **(details or {})})

    def rollback(self) -> str:
        """Make the version promoted before the current one current again; returns it."""
        current = self.current_version()
        # Replay the log as a stack: a promotion pushes, a rollback pops what it
        # replaced, so repeated rollbacks keep walking back.
        stack: list[str] = []
        for entry in self.history():
            if entry.get("action") == "rollback":
                if stack:
                    stack.pop()
            elif entry.get("version"):
                stack.append(str(entry["version"]))
        if stack and stack[-1] == current:
            stack.pop()
        for candidate in reversed(stack):
            if candidate == current:
                continue
            try:
                self.promote(candidate, reason="rollback", details={"rolled_back": current})
            except ModelLoadError:
                continue  # a corrupt older version is skipped, never served
            return candidate
        raise ConfigError(f"no earlier promoted version to roll back to (current: {current})")

    def _point_current_at(self, version: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        pointer = self.root / CURRENT
        if pointer.exists() and not pointer.is_symlink():
            raise ConfigError(f"{pointer} exists and is not a symlink; move it into {self.versions_dir}")
        fresh = self.root / f".{CURRENT}.{os.getpid()}.{time.monotonic_ns()}"
        os.symlink(Path(VERSIONS) / version, fresh)  # relative: the registry can be moved
        os.replace(fresh, pointer)

    def _log(self, entry: dict[str, Any]) -> None:
        with (self.root / PROMOTIONS).open("a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
