"""What the fine-tuner knows about items: the catalogue events it drained, and their content.

``catalog.items`` is read by the fine-tuner's own consumer group (``job.drain_topics``);
the newest upsert of every item is kept in ``<data_dir>/finetune/catalogue.json``
(a deletion removes it). A first model, and the items a serving version never
learnt, take their text and attributes from here: the text vector is the one a
worker computes (the exported text tower over the fields the model reads), the
attributes are the names in ``category`` (several separated by ``|``), as a
trained model parses them for an item it does not know.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import DecodeError
from core.text import compose_text
from finetune.files import replace_whole
from model.serving.contract import attribute_names

CATALOGUE_FILE = "catalogue.json"
KEPT_FIELDS = ("title", "description", "category")


class CatalogueLog:
    """Item id -> ``{"title", "description", "category", "attributes"}`` of its newest upsert."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / CATALOGUE_FILE

    def read(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except ValueError as error:
            raise DecodeError(f"{self.path}: not JSON ({error}); delete it and the next drain rebuilds "
                              "it only from catalogue events not yet read by the group") from error

    def apply(self, raw_events: list[bytes], max_bytes: int) -> int:
        """Fold catalogue events (in topic order) into the file; returns the undecodable count.

        Written (then renamed) before the consumer commits, like the interaction log.
        """
        from core.events import CatalogItem, decode

        if not raw_events:
            return 0
        items, bad = self.read(), 0
        for raw in raw_events:
            try:
                event = decode(CatalogItem, raw, max_bytes=max_bytes)
            except DecodeError:
                bad += 1
                continue
            if event.op == "delete":
                items.pop(event.item_id, None)
            else:
                items[event.item_id] = {name: str(getattr(event, name) or "") for name in KEPT_FIELDS}
                items[event.item_id]["attributes"] = dict(event.attributes)
        text = json.dumps(items, separators=(",", ":"))
        replace_whole(self.path, lambda handle: handle.write(text.encode()),
                      scratch=self.path.with_suffix(".writing").name)
        return bad


def entry_attribute_names(entry: dict[str, Any] | None) -> tuple[str, ...]:
    """The attribute names of one catalogue entry: its ``category`` and ``attributes``."""
    entry = entry or {}
    return attribute_names(str(entry.get("category") or ""), entry.get("attributes") or {})


def text_vectors(encoder: Any, fields: tuple[str, ...], item_ids: list[str],
                 catalogue: dict[str, dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(N, text_dim) text vectors of ``fields`` of each item through ``encoder`` (a
    ``TextEncoder``), zero where the catalogue has no such text; (N,) bool has_text."""
    texts = [compose_text(fields, catalogue.get(item_id, {})) for item_id in item_ids]
    present = np.asarray([bool(text) for text in texts], dtype=bool)
    vectors = np.zeros((len(item_ids), encoder.dim), dtype=np.float32)
    if present.any():
        vectors[present] = encoder.encode([text for text in texts if text])
    return vectors, present
