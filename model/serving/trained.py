"""A trained artefact served through onnxruntime; implements ``ServingModel``.

Only the ONNX files, ``config.json``, ``id_maps.json``, ``item_features.npz``,
``transitions.npz`` and ``ranker_parts.npz`` are read: serving never unpickles
torch weights. With ``ranker_parts.npz`` (written by every export since the
split) requests score through ``score_split``; an older artefact scores
through ``ranker.onnx`` as before.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.errors import ModelLoadError
from model.serving.artefact import read_manifest
from model.serving.contract import (
    CONTEXT_FEATURES,
    TRAINED_TEXT_FIELDS,
    ItemContent,
    ItemContext,
    attribute_names,
)
from model.serving.covisit import FILE_NAME as TRANSITIONS_FILE
from model.serving.covisit import CoVisitTable
from model.serving.networks import INPUT_NAMES, TowerConfig
from model.serving.ranker_parts import FILE_NAME as RANKER_PARTS_FILE
from model.serving.ranker_parts import RankerParts
from model.serving.runtime import load_session


class TrainedModel:
    """Item tower, user tower and ranker of one artefact version.

    ``int8`` serves the ``*.int8.onnx`` copies when the artefact has them.
    """

    def __init__(self, directory: Path, *, threads: int = 1, int8: bool = False, verify: bool = True) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, verify=verify)
        try:
            config = json.loads((self.directory / "config.json").read_text())
            id_maps = json.loads((self.directory / "id_maps.json").read_text())
            with np.load(self.directory / "item_features.npz") as features:
                stored = {key: features[key] for key in features.files}
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot read artefact {self.directory}: {error}") from error
        self.config = config
        self.tower = TowerConfig.from_dict(config["tower"])
        self.version: str = self.manifest["version"]
        self.fused_dim = self.tower.fused_dim
        self.text_dim = self.tower.text_dim
        self.image_dim = self.tower.image_dim
        self.max_sequence = self.tower.max_sequence
        self.train_action: int = int(config.get("train_action", 1))
        self.text_fields: tuple[str, ...] = tuple(config.get("text_fields", TRAINED_TEXT_FIELDS))
        # The ranker learnt to re-order the retrieval top-K only (``RankerSettings.candidates``).
        self.rank_pool: int | None = int(config.get("ranker", {}).get("candidates", 0)) or None
        # An artefact without a table has weight 0: it is served as it was evaluated.
        self.covisit_weight = float(config.get("covisit", {}).get("weight", 0.0))
        transitions_path = self.directory / TRANSITIONS_FILE
        try:
            self.transitions: CoVisitTable | None = (
                CoVisitTable.load(transitions_path) if transitions_path.is_file() else None
            )
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot read artefact {self.directory}: {error}") from error
        self.item_index: dict[str, int] = {str(k): int(v) for k, v in id_maps["items"].items()}
        self.attribute_index: dict[str, int] = {str(k): int(v) for k, v in id_maps["attributes"].items()}
        self.item_ids: list[str] = [""] * (self.tower.n_items + 1)
        for item_id, index in self.item_index.items():
            self.item_ids[index] = item_id
        self.stored_attributes: np.ndarray = stored["attributes"].astype(np.int64)  # (N+1, A)
        self.popularity: np.ndarray = stored["popularity"]  # (N+1,) training interactions per item
        self.last_seen: np.ndarray | None = stored.get("last_seen")  # (N+1,) seconds, data with times only
        self.stored_text: np.ndarray | None = stored.get("text")  # (N+1, T) or absent
        self.stored_has_text: np.ndarray | None = stored.get("has_text")
        parts_path = self.directory / RANKER_PARTS_FILE
        try:
            # int8 serves the quantised ONNX ranker: its scores are not the float split's.
            self._parts = RankerParts.load(parts_path) if parts_path.is_file() and not int8 else None
        except (OSError, ValueError, KeyError) as error:
            raise ModelLoadError(f"cannot read artefact {self.directory}: {error}") from error
        self.item_part_dim = self._parts.hidden if self._parts is not None else 0
        self.stored_image: np.ndarray | None = stored.get("image")  # (N+1, I): models trained with photos
        self.stored_has_image: np.ndarray | None = stored.get("has_image")
        suffix = ".int8.onnx" if int8 else ".onnx"
        self._sessions = {}
        self.served_files: dict[str, Path] = {}  # network -> the ONNX file its session runs
        for name in INPUT_NAMES:
            path = self.directory / f"{name}{suffix}"
            if int8 and not path.is_file():
                path = self.directory / f"{name}.onnx"
            # Hashes were checked by read_manifest (when verify is on).
            self._sessions[name] = load_session(path, None, intra_op_threads=threads)
            self.served_files[name] = path

    @property
    def n_items(self) -> int:
        return self.tower.n_items

    def _attribute_rows(self, indices: np.ndarray, categories: list[str]) -> np.ndarray:
        """(N, A) attribute indices: the trained item's own, else parsed from ``categories``."""
        rows: list[list[int]] = []
        for index, category in zip(indices.tolist(), categories):
            known = self.stored_attributes[index]
            if index > 0 and known.any():
                rows.append(known[known > 0].tolist())
                continue
            names = attribute_names(category)
            rows.append([self.attribute_index[name] for name in names if name in self.attribute_index])
        width = max([len(row) for row in rows] + [1])
        matrix = np.zeros((len(rows), width), dtype=np.int64)
        for row_number, row in enumerate(rows):
            matrix[row_number, : len(row)] = row
        return matrix

    def item_vectors(self, content: ItemContent) -> np.ndarray:
        """(N, fused_dim) float32; unknown ids are embedded from their content alone."""
        count = len(content.item_ids)
        if count == 0:
            return np.zeros((0, self.fused_dim), dtype=np.float32)
        indices = np.asarray([self.item_index.get(str(i), 0) for i in content.item_ids], dtype=np.int64)
        text = np.asarray(content.text, dtype=np.float32).reshape(count, self.text_dim).copy()
        has_text = np.asarray(content.has_text, dtype=bool).reshape(count).copy()
        if self.stored_text is not None and self.stored_has_text is not None:
            # Known items without text in this request keep the text they were trained with.
            fill = ~has_text & (indices > 0) & self.stored_has_text[indices].astype(bool)
            text[fill] = self.stored_text[indices[fill]]
            has_text |= fill
        image = np.asarray(content.image, dtype=np.float32).reshape(count, self.image_dim)
        has_image = np.asarray(content.has_image, dtype=bool).reshape(count)
        if self.stored_image is not None and self.stored_has_image is not None:
            # Likewise the photo: a request without one does not erase the trained item's.
            fill = ~has_image & (indices > 0) & self.stored_has_image[indices].astype(bool)
            image, has_image = image.copy(), has_image.copy()
            image[fill] = self.stored_image[indices[fill]]
            has_image |= fill
        feeds = {
            "item_index": indices,
            "attributes": self._attribute_rows(indices, list(content.categories)),
            "text": text,
            "image": image,
            "has_text": has_text.astype(np.float32),
            "has_image": has_image.astype(np.float32),
        }
        return self._sessions["item_tower"].run(None, feeds)[0]

    def query_vectors(self, text: np.ndarray) -> np.ndarray:
        """(N, text_dim) query embeddings -> (N, fused_dim): a query is embedded as a
        new item described only by that text, so a search can sit in a user's sequence."""
        text = np.asarray(text, dtype=np.float32).reshape(-1, self.text_dim)
        count = len(text)
        content = ItemContent(
            item_ids=[""] * count,
            text=text,
            image=np.zeros((count, self.image_dim), np.float32),
            has_text=np.ones(count, bool),
            has_image=np.zeros(count, bool),
            categories=[""] * count,
        )
        return self.item_vectors(content)

    def catalogue_content(self, indices: np.ndarray) -> ItemContent:
        """What the artefact knows about its own items (photos only if it was trained with them)."""
        count = len(indices)
        if self.stored_text is not None and self.stored_has_text is not None:
            text = self.stored_text[indices].astype(np.float32)
            has_text = self.stored_has_text[indices].astype(bool)
        else:
            text, has_text = np.zeros((count, self.text_dim), np.float32), np.zeros(count, bool)
        if self.stored_image is not None and self.stored_has_image is not None:
            image = self.stored_image[indices].astype(np.float32)
            has_image = self.stored_has_image[indices].astype(bool)
        else:
            image, has_image = np.zeros((count, self.image_dim), np.float32), np.zeros(count, bool)
        return ItemContent(
            item_ids=[self.item_ids[i] for i in indices.tolist()],
            text=text,
            image=image,
            has_text=has_text,
            has_image=has_image,
            categories=[""] * count,
        )

    def catalogue_vectors(self, batch_size: int = 4096) -> np.ndarray:
        """(n_items + 1, fused_dim) vectors of every trained item; row 0 is the unknown item."""
        all_indices = np.arange(self.n_items + 1)
        parts = [
            self.item_vectors(self.catalogue_content(all_indices[start : start + batch_size]))
            for start in range(0, len(all_indices), batch_size)
        ]
        return np.concatenate(parts)

    def context_features(self, item_ids: list[str], retrieval_scores: np.ndarray, now: float) -> np.ndarray:
        """(N, len(CONTEXT_FEATURES)) float32, computed exactly as the ranker was trained on them.

        Popularity is the item's training-interaction count (0 for items the
        model never saw); recency is days from the item's last training
        interaction to ``now``, the time of the user's latest event (the
        trainer's request time), and 0 for a model trained without times.
        """
        indices = np.asarray([self.item_index.get(str(i), 0) for i in item_ids], dtype=np.int64)
        context = ItemContext(self.popularity, self.last_seen)
        scores = np.asarray(retrieval_scores, dtype=np.float32).reshape(1, -1)
        return context.features(indices[None, :], scores, np.asarray([now], dtype=np.float64))[0]

    def user_vectors(self, sequences: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """(B, L, d) item vectors + (B, L) action codes, left-padded -> (B, d) float32."""
        sequences = np.asarray(sequences, dtype=np.float32)
        actions = np.asarray(actions, dtype=np.int64)
        if sequences.shape[0] == 0:
            return np.zeros((0, self.fused_dim), dtype=np.float32)
        if sequences.shape[1] > self.max_sequence:
            # Left padding keeps the newest items last: keep the newest max_sequence.
            sequences, actions = sequences[:, -self.max_sequence :], actions[:, -self.max_sequence :]
        if sequences.shape[1] == 0:
            sequences = np.zeros((sequences.shape[0], 1, self.fused_dim), dtype=np.float32)
            actions = np.zeros((sequences.shape[0], 1), dtype=np.int64)
        sequences = sequences * (actions > 0)[..., None]
        feeds = {"item_vectors": np.ascontiguousarray(sequences), "actions": np.ascontiguousarray(actions)}
        return self._sessions["user_tower"].run(None, feeds)[0]

    def score_rows(
        self,
        user_vectors: np.ndarray,
        query_vectors: np.ndarray,
        candidate_fused: np.ndarray,
        candidate_text: np.ndarray,
        candidate_image: np.ndarray,
        context: np.ndarray,
    ) -> np.ndarray:
        """One ranker call over rows that may belong to many requests: all inputs (N, ...) -> (N,)."""
        if len(candidate_fused) == 0:
            return np.zeros(0, dtype=np.float32)
        feeds = {
            "user_vector": np.ascontiguousarray(user_vectors, dtype=np.float32),
            "candidate_fused": np.ascontiguousarray(candidate_fused, dtype=np.float32),
            "candidate_text": np.ascontiguousarray(candidate_text, dtype=np.float32),
            "candidate_image": np.ascontiguousarray(candidate_image, dtype=np.float32),
            "query_vector": np.ascontiguousarray(query_vectors, dtype=np.float32),
            "context": np.ascontiguousarray(context, dtype=np.float32),
        }
        return self._sessions["ranker"].run(None, feeds)[0]

    def item_part(self, vectors: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> np.ndarray:
        """(N, ranker hidden): the ranker's item-only first-layer share (``RankerParts``)."""
        if self._parts is None:
            raise ModelLoadError(f"artefact {self.directory} has no {RANKER_PARTS_FILE}: it cannot split scores")
        return self._parts.item_part(vectors["fused"], vectors["text"], vectors["image"])

    def score_split(
        self,
        user_vector: np.ndarray,
        query_vector: np.ndarray | None,
        candidate_fused: np.ndarray,
        item_part: np.ndarray,
        candidate_text: np.ndarray | None,
        context: np.ndarray,
    ) -> np.ndarray:
        """``score`` from the candidates' fused vectors and item parts: numpy, no ONNX call."""
        if self._parts is None:
            raise ModelLoadError(f"artefact {self.directory} has no {RANKER_PARTS_FILE}: it cannot split scores")
        count = len(candidate_fused)
        if np.asarray(context).shape != (count, len(CONTEXT_FEATURES)):
            raise ValueError(f"context must be ({count}, {len(CONTEXT_FEATURES)})")
        return self._parts.score(user_vector, query_vector, candidate_fused, item_part, candidate_text, context)

    def score(
        self,
        user_vector: np.ndarray,
        query_vector: np.ndarray | None,
        candidate_fused: np.ndarray,
        candidate_text: np.ndarray,
        candidate_image: np.ndarray,
        context: np.ndarray,
    ) -> np.ndarray:
        """Click probabilities of one request's N candidates, one ONNX call -> (N,)."""
        count = len(candidate_fused)
        if np.asarray(context).shape != (count, len(CONTEXT_FEATURES)):
            raise ValueError(f"context must be ({count}, {len(CONTEXT_FEATURES)})")
        users = np.broadcast_to(np.asarray(user_vector, dtype=np.float32), (count, self.fused_dim))
        query = np.zeros(self.text_dim, np.float32) if query_vector is None else query_vector
        queries = np.broadcast_to(np.asarray(query, dtype=np.float32), (count, self.text_dim))
        return self.score_rows(users, queries, candidate_fused, candidate_text, candidate_image, context)
