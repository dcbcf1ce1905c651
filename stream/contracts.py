"""Every contract document streamrec publishes, by path: what ``streamrec schema`` writes.

JSON Schema per message kind and the AsyncAPI document (``core.contracts``),
and the HTTP endpoint's OpenAPI document (``stream.openapi``). The committed
copies live in docs/schemas/; ``stale`` says which of them the code no longer
generates, for ``streamrec schema --check`` and the test that keeps them equal.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.contracts import asyncapi_document, json_schemas
from stream.openapi import openapi_document

DOCS_DIR = Path("docs/schemas")


def documents() -> dict[str, dict[str, Any]]:
    """Relative path -> document."""
    found: dict[str, dict[str, Any]] = {
        f"json/{name}.schema.json": schema for name, schema in json_schemas().items()
    }
    found["asyncapi.json"] = asyncapi_document()
    found["openapi.json"] = openapi_document()
    return found


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def write(out: Path) -> list[Path]:
    """Write every document under ``out``; remove generated files the code no longer makes."""
    wanted = documents()
    for stray in _stray(out, wanted):
        stray.unlink()
    written = []
    for relative, document in wanted.items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(document))
        written.append(path)
    return written


def stale(out: Path) -> list[str]:
    """Paths under ``out`` that are missing, differ from what the code generates, or are no longer generated."""
    wanted = documents()
    found = [relative for relative, document in wanted.items()
             if not (out / relative).is_file() or (out / relative).read_text() != render(document)]
    return found + [str(path.relative_to(out)) for path in _stray(out, wanted)]


def _stray(out: Path, wanted: dict[str, dict[str, Any]]) -> list[Path]:
    folder = out / "json"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.schema.json") if str(p.relative_to(out)) not in wanted)
