"""The general input format: an interaction table plus a catalogue file.

Interactions: TSV, CSV or JSONL (by extension: ``.tsv``, ``.csv``, ``.jsonl``),
one interaction per row, with a header for TSV/CSV. Columns (any order, extra
columns ignored): ``user_id`` (or ``user``), ``item_id`` (or ``item``),
``timestamp`` (or ``time``; seconds, a number) and an optional ``action``
(``view``, ``click``, ``add_to_cart``, ``purchase``).

Catalogue: a JSON list of objects, or JSONL (one object a line). Fields, each
optional except the id: ``item_id`` (or ``id``), ``title``, ``description``,
``category`` (a string, several joined by ``|``, or a list), ``attributes``
(a string map; each pair becomes the attribute ``key=value``), ``image`` (a
path relative to the image root, an absolute path or a ``file://`` URI under
it, or ``{"image_uri": ...}`` as on ``catalog.items``). ``--catalogue-fields``
renames source fields, e.g. ``category=genres,image=poster``, and makes other
source fields attributes: ``attributes.KEY=SOURCE`` gives each item the
attribute ``KEY=<its SOURCE value>``, and ``attributes.KEY=SOURCE:year`` the
year (four digits) found in that value, e.g. ``attributes.year=release_date:year``
turns ``"01-Jan-1995"`` into ``year=1995``. An item without the field has no
such attribute; a value without a year is a bad row. On ``catalog.items`` the
same attribute is ``"attributes": {"year": "1995"}``.

Every bad row raises ``ConfigError`` naming the file and the line.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from core.errors import ConfigError
from model.serving.contract import ACTIONS, CATEGORY_SEPARATOR, attribute_names

USER_COLUMNS = ("user_id", "user")
ITEM_COLUMNS = ("item_id", "item")
TIME_COLUMNS = ("timestamp", "time")
ACTION_COLUMN = "action"
CATALOGUE_FIELDS = ("item_id", "title", "description", "category", "attributes", "image")
ATTRIBUTE_PREFIX = "attributes."  # --catalogue-fields attributes.KEY=SOURCE[:FORM]
ATTRIBUTE_FORMS = ("year",)
YEAR = re.compile(r"(?<!\d)(\d{4})(?!\d)")
VALID_ACTIONS = tuple(action for action in ACTIONS if action not in ("pad", "search"))


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    time: float
    action: str | None
    line: int  # where it was read (ties in time keep file order)


@dataclass(frozen=True)
class CatalogueRecord:
    """One catalogue item as the trainer reads it; ``image`` is a resolved local path or None."""

    item_id: str
    title: str = ""
    description: str = ""
    categories: tuple[str, ...] = ()
    image: Path | None = None


def _pick(header: list[str], names: tuple[str, ...], path: Path, required: bool = True) -> str | None:
    for name in names:
        if name in header:
            return name
    if required:
        raise ConfigError(f"{path}:1: the header needs a column {' or '.join(names)!r}; it has {header}")
    return None


def _field(value: Any, what: str, where: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{where}: empty {what}")
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ConfigError(f"{where}: {what} must be a string or an integer, not {type(value).__name__}")
    return str(value).strip()


def _interaction(row: dict[str, Any], columns: tuple[str, str, str, str | None], where: str) -> Interaction:
    user_col, item_col, time_col, action_col = columns
    user, item = _field(row.get(user_col), user_col, where), _field(row.get(item_col), item_col, where)
    raw_time = row.get(time_col)
    try:
        time = float(raw_time)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {time_col} must be a number (seconds), got {raw_time!r}") from None
    if not np.isfinite(time):
        raise ConfigError(f"{where}: {time_col} must be finite, got {raw_time!r}")
    action = None
    if action_col is not None and row.get(action_col) not in (None, ""):
        action = str(row[action_col]).strip()
        if action not in VALID_ACTIONS:
            raise ConfigError(f"{where}: unknown action {action!r}; expected one of {VALID_ACTIONS}")
    return Interaction(user, item, time, action, int(where.rsplit(":", 1)[1]))


def read_interactions(path: Path) -> list[Interaction]:
    """Every row of an interaction file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"interaction file not found: {path}")
    suffix = path.suffix.lower()
    rows: list[Interaction] = []
    if suffix == ".jsonl":
        columns: tuple[str, str, str, str | None] | None = None
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                except ValueError as error:
                    raise ConfigError(f"{where}: not valid JSON ({error})") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{where}: expected a JSON object")
                if columns is None:
                    keys = list(row)
                    columns = (_pick(keys, USER_COLUMNS, path) or "", _pick(keys, ITEM_COLUMNS, path) or "",
                               _pick(keys, TIME_COLUMNS, path) or "", ACTION_COLUMN)
                rows.append(_interaction(row, columns, where))
        return rows
    if suffix not in (".tsv", ".csv"):
        raise ConfigError(f"{path}: interaction files are .tsv, .csv or .jsonl, not {suffix or 'no extension'!r}")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t" if suffix == ".tsv" else ",")
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise ConfigError(f"{path}:1: empty file; expected a header line")
        columns = (_pick(header, USER_COLUMNS, path) or "", _pick(header, ITEM_COLUMNS, path) or "",
                   _pick(header, TIME_COLUMNS, path) or "", _pick(header, (ACTION_COLUMN,), path, required=False))
        for values in reader:
            number = reader.line_num
            if not values or not any(v.strip() for v in values):
                continue
            where = f"{path}:{number}"
            if len(values) != len(header):
                raise ConfigError(f"{where}: {len(values)} fields, the header has {len(header)}")
            rows.append(_interaction(dict(zip(header, values)), columns, where))
    return rows


def parse_field_map(text: str | None) -> dict[str, str]:
    """``category=genres,image=poster`` -> {"category": "genres", "image": "poster"};
    ``attributes.year=release_date:year`` -> {"attributes.year": "release_date:year"}."""
    mapping: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        ours, _, theirs = part.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if ours.startswith(ATTRIBUTE_PREFIX):
            key, (source, _, form) = ours[len(ATTRIBUTE_PREFIX):], theirs.partition(":")
            if not key or not source or "=" in key or CATEGORY_SEPARATOR in key or \
                    (form and form not in ATTRIBUTE_FORMS):
                raise ConfigError(f"bad catalogue field mapping {part!r}: expected {ATTRIBUTE_PREFIX}KEY=SOURCE "
                                  f"or {ATTRIBUTE_PREFIX}KEY=SOURCE:FORM with FORM one of {ATTRIBUTE_FORMS}")
        elif ours not in CATALOGUE_FIELDS or not theirs:
            raise ConfigError(f"bad catalogue field mapping {part!r}: expected FIELD=SOURCE with FIELD one of "
                              f"{CATALOGUE_FIELDS}, or {ATTRIBUTE_PREFIX}KEY=SOURCE[:year]")
        mapping[ours] = theirs
    return mapping


def resolve_image(value: Any, image_root: Path | None, where: str) -> Path | None:
    """A catalogue image reference -> a local file under ``image_root`` (None when absent)."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        value = value.get("image_uri")
        if value is None:
            raise ConfigError(f"{where}: an image object needs 'image_uri' (inline bytes are not read in training)")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: image must be a path or URI string, not {type(value).__name__}")
    parsed = urlparse(value)
    if parsed.scheme == "file":
        candidate = Path(unquote(parsed.path))
    elif parsed.scheme in ("", ):
        candidate = Path(value)
    else:
        raise ConfigError(f"{where}: image {value!r}: only local paths and file:// URIs are read in training")
    if image_root is None:
        raise ConfigError(f"{where}: the catalogue names an image ({value!r}); give --image-root DIR")
    root = image_root.resolve()
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise ConfigError(f"{where}: image {value!r} is outside the image root {root}")
    if not resolved.is_file():
        raise ConfigError(f"{where}: image file not found: {resolved}")
    return resolved


def _categories(value: Any, attributes: Any, mapped: dict[str, str], where: str) -> tuple[str, ...]:
    """The record's categories, then its own attributes and the mapped ones as ``key=value``."""
    if value is not None and not isinstance(value, str) and \
            not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ConfigError(f"{where}: category must be a string or a list of strings")
    if attributes is not None and not isinstance(attributes, dict):
        raise ConfigError(f"{where}: attributes must be an object of strings")
    return attribute_names(value, {**(attributes or {}), **mapped})


def _mapped_attributes(record: dict[str, Any], mapping: dict[str, str], where: str) -> dict[str, str]:
    """The ``attributes.KEY=SOURCE[:year]`` attributes of one record; absent sources give none."""
    out: dict[str, str] = {}
    for key, spec in mapping.items():
        source, _, form = spec.partition(":")
        value = record.get(source)
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: {source} must be a string or a number to be attribute {key!r}, "
                              f"not {type(value).__name__}")
        text = str(value).strip()
        if form == "year":
            found = YEAR.search(text)
            if found is None:
                raise ConfigError(f"{where}: {source} {value!r} holds no four-digit year for attribute {key!r}")
            text = found.group(1)
        out[key] = text
    return out


def _text(value: Any, what: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {what} must be a string")
    return value.strip()


def _json_list(text: str, path: Path) -> list[tuple[str, Any]]:
    """The elements of a JSON list, each with ``FILE:LINE`` of where it starts."""
    decoder = json.JSONDecoder()
    position = len(text) - len(text.lstrip())
    if not text.startswith("[", position):
        raise ConfigError(f"{path}:1: expected a JSON list of items (or a .jsonl file)")
    position += 1
    entries: list[tuple[str, Any]] = []
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text):
            raise ConfigError(f"{path}:{text.count(chr(10), 0, position) + 1}: the JSON list is not closed")
        if text[position] == "]":
            return entries
        where = f"{path}:{text.count(chr(10), 0, position) + 1}"
        try:
            record, position = decoder.raw_decode(text, position)
        except ValueError as error:
            raise ConfigError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None  # type: ignore[attr-defined]
        entries.append((where, record))


def read_catalogue(path: Path, image_root: Path | None = None,
                   field_map: dict[str, str] | None = None) -> list[CatalogueRecord]:
    """The catalogue file's records; a JSON list (line numbers are record numbers) or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"catalogue file not found: {path}")
    names = {field: (field_map or {}).get(field, field) for field in CATALOGUE_FIELDS}
    mapped = {key[len(ATTRIBUTE_PREFIX):]: spec for key, spec in (field_map or {}).items()
              if key.startswith(ATTRIBUTE_PREFIX)}
    entries: list[tuple[str, Any]] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append((f"{path}:{number}", json.loads(line)))
                except ValueError as error:
                    raise ConfigError(f"{path}:{number}: not valid JSON ({error})") from None
    else:
        entries = _json_list(text, path)
    out: list[CatalogueRecord] = []
    seen: set[str] = set()
    for where, record in entries:
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        raw_id = record.get(names["item_id"], record.get("id") if names["item_id"] == "item_id" else None)
        item_id = _field(raw_id, "item_id", where)
        if item_id in seen:
            raise ConfigError(f"{where}: item {item_id!r} is listed twice")
        seen.add(item_id)
        out.append(CatalogueRecord(
            item_id=item_id,
            title=_text(record.get(names["title"]), "title", where),
            description=_text(record.get(names["description"]), "description", where),
            categories=_categories(record.get(names["category"]), record.get(names["attributes"]),
                                   _mapped_attributes(record, mapped, where), where),
            image=resolve_image(record.get(names["image"]), image_root, where),
        ))
    return out
