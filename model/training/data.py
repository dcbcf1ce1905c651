"""Interaction data for training and offline evaluation.

Two formats are read:

- ``s3rec``: one user per line, ``user_id item_id item_id ...`` in time order,
  with an optional ``<stem>_item2attributes.json`` beside it
  (``{"item_id": [attribute_id, ...]}``).
- ``ml100k``: the MovieLens-100k atomic files shipped in the ``recbole`` wheel
  (``ml-100k.inter`` and ``ml-100k.item``); genres become attributes and
  titles are kept for the text tower.
- ``table``: the general format of ``model.training.table_format``, an
  interaction table (TSV/CSV/JSONL) plus a catalogue (JSON/JSONL) with titles,
  descriptions, categories and photos.

Item indices are 1-based in the order of the domain ids (numeric order when
every id is an integer), index 0 is reserved for "unknown / padding". Ties in
popularity are therefore broken by the lower domain id, as the published
protocol does.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConfigError

FORMATS: tuple[str, ...] = ("s3rec", "ml100k", "table")


@dataclass(frozen=True)
class InteractionData:
    """Users' item sequences plus per-item side information.

    sequences:        one int64 array of item indices per user, oldest first
    item_ids:         domain id of item index i at position i - 1
    attributes:       (n_items + 1, max_attributes) int64 attribute indices, 0 = none
    attribute_names:  domain name of attribute index a at position a - 1
    titles:           one title per item index (index 0 is ""), or None
    timestamps:       per user, the event times (seconds) aligned with sequences, or None
    descriptions:     one description per item index ("" when absent), or None
    images:           one local photo path per item index (None when absent), or None
    action:           the interaction kind the towers learn from (None: the format's default)
    """

    name: str
    user_ids: list[str]
    sequences: list[np.ndarray]
    item_ids: list[str]
    attributes: np.ndarray
    attribute_names: list[str]
    titles: list[str] | None = None
    timestamps: list[np.ndarray] | None = None
    descriptions: list[str] | None = None
    images: list[Path | None] | None = None
    action: str | None = None

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_attributes(self) -> int:
        return len(self.attribute_names)

    def item_index(self) -> dict[str, int]:
        return {item_id: index + 1 for index, item_id in enumerate(self.item_ids)}


@dataclass(frozen=True)
class LeaveOneOut:
    """The standard leave-one-out split of every user with at least 3 items.

    users:   indices into ``InteractionData.sequences`` of the evaluated users
    train:   per user, items[:-2] (what the model may learn from)
    valid:   (U,) items[-2], predicted from items[:-2]
    test:    (U,) items[-1], predicted from items[:-1]
    """

    users: np.ndarray
    train: list[np.ndarray]
    valid: np.ndarray
    test: np.ndarray
    full: list[np.ndarray]

    def inputs(self, split: str) -> list[np.ndarray]:
        """The sequences a model sees when predicting ``split``'s targets."""
        if split == "valid":
            return self.train
        if split == "test":
            return [sequence[:-1] for sequence in self.full]
        raise ConfigError(f"unknown split {split!r}; expected 'valid' or 'test'")

    def targets(self, split: str) -> np.ndarray:
        if split == "valid":
            return self.valid
        if split == "test":
            return self.test
        raise ConfigError(f"unknown split {split!r}; expected 'valid' or 'test'")


def leave_one_out(data: InteractionData) -> LeaveOneOut:
    kept = [u for u, sequence in enumerate(data.sequences) if len(sequence) >= 3]
    full = [data.sequences[u] for u in kept]
    return LeaveOneOut(
        users=np.asarray(kept, dtype=np.int64),
        train=[sequence[:-2] for sequence in full],
        valid=np.asarray([sequence[-2] for sequence in full], dtype=np.int64),
        test=np.asarray([sequence[-1] for sequence in full], dtype=np.int64),
        full=full,
    )


def unsplit_sequences(data: InteractionData, split: LeaveOneOut) -> list[np.ndarray]:
    """The sequences leave-one-out leaves out (fewer than 3 items): they still hold transitions."""
    kept = set(split.users.tolist())
    return [sequence for user, sequence in enumerate(data.sequences) if user not in kept]


def _sorted_ids(ids: set[str]) -> list[str]:
    if all(item.isdigit() for item in ids):
        return sorted(ids, key=int)
    return sorted(ids)


def _attribute_matrix(per_item: list[list[int]]) -> np.ndarray:
    width = max((len(attributes) for attributes in per_item), default=0)
    matrix = np.zeros((len(per_item), max(width, 1)), dtype=np.int64)
    for index, attributes in enumerate(per_item):
        matrix[index, : len(attributes)] = attributes
    return matrix


def load_s3rec(path: Path, attributes_path: Path | None = None) -> InteractionData:
    """Read an S3-Rec style sequence file (and its attribute file, if found)."""
    if not path.is_file():
        raise ConfigError(f"interaction file not found: {path}")
    user_ids: list[str] = []
    raw_sequences: list[list[str]] = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        user_ids.append(fields[0])
        raw_sequences.append(fields[1:])
    item_ids = _sorted_ids({item for sequence in raw_sequences for item in sequence})
    index = {item_id: i + 1 for i, item_id in enumerate(item_ids)}
    sequences = [np.asarray([index[i] for i in seq], dtype=np.int64) for seq in raw_sequences]

    if attributes_path is None:
        candidate = path.with_name(f"{path.stem}_item2attributes.json")
        attributes_path = candidate if candidate.is_file() else None
    per_item: list[list[int]] = [[] for _ in range(len(item_ids) + 1)]
    attribute_names: list[str] = []
    if attributes_path is not None:
        raw = json.loads(attributes_path.read_text())
        names = _sorted_ids({str(a) for values in raw.values() for a in values})
        attribute_index = {name: i + 1 for i, name in enumerate(names)}
        attribute_names = names
        for item_id, values in raw.items():
            if item_id in index:
                per_item[index[item_id]] = [attribute_index[str(a)] for a in values]
    return InteractionData(
        name=path.stem,
        user_ids=user_ids,
        sequences=sequences,
        item_ids=item_ids,
        attributes=_attribute_matrix(per_item),
        attribute_names=attribute_names,
    )


def recbole_ml100k_dir() -> Path:
    """Folder of the MovieLens-100k files inside the installed ``recbole`` wheel."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise ConfigError("MovieLens-100k needs the 'recbole' package (pip install --no-deps recbole)")
    folder = Path(spec.origin).parent / "dataset_example" / "ml-100k"
    if not folder.is_dir():
        raise ConfigError(f"MovieLens-100k files not found in {folder}")
    return folder


def _read_atomic(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text(encoding="latin-1").splitlines()
    header = [column.split(":")[0] for column in lines[0].split("\t")]
    return header, [line.split("\t") for line in lines[1:] if line]


def film_title(title: str, year: str) -> str:
    """A MovieLens film's title as the catalogue publishes it and the text tower reads it.

    Training and the catalogue events (``bench.movielens``) must embed the same
    string: "Toy Story" and "Toy Story (1995)" are different text vectors, and a
    served item would no longer be the item the model learned.
    """
    return f"{title} ({year})" if year else title


def load_ml100k(folder: Path | None = None) -> InteractionData:
    """MovieLens-100k: every rating is an interaction, ordered by timestamp."""
    folder = folder if folder is not None else recbole_ml100k_dir()
    if folder.is_file():
        folder = folder.parent
    header, rows = _read_atomic(folder / "ml-100k.inter")
    user_col, item_col, time_col = (header.index(c) for c in ("user_id", "item_id", "timestamp"))
    by_user: dict[str, list[tuple[float, int, str]]] = {}
    for row_number, row in enumerate(rows):
        # The row number breaks timestamp ties so the order is deterministic.
        by_user.setdefault(row[user_col], []).append((float(row[time_col]), row_number, row[item_col]))

    item_header, item_rows = _read_atomic(folder / "ml-100k.item")
    title_col, year_col, genre_col = (item_header.index(c) for c in ("movie_title", "release_year", "class"))
    item_info = {row[0]: row for row in item_rows}
    item_ids = _sorted_ids({item for events in by_user.values() for _, _, item in events})
    index = {item_id: i + 1 for i, item_id in enumerate(item_ids)}

    genres = _sorted_ids({g for row in item_rows for g in row[genre_col].split()})
    genre_index = {genre: i + 1 for i, genre in enumerate(genres)}
    titles = [""] * (len(item_ids) + 1)
    per_item: list[list[int]] = [[] for _ in range(len(item_ids) + 1)]
    for item_id, i in index.items():
        row = item_info.get(item_id)
        if row is None:
            continue
        titles[i] = film_title(row[title_col], row[year_col] if year_col < len(row) else "")
        per_item[i] = [genre_index[g] for g in row[genre_col].split()]

    user_ids = _sorted_ids(set(by_user))
    sequences, timestamps = [], []
    for user in user_ids:
        events = sorted(by_user[user])
        sequences.append(np.asarray([index[item] for _, _, item in events], dtype=np.int64))
        timestamps.append(np.asarray([t for t, _, _ in events], dtype=np.float64))
    return InteractionData(
        name="ml-100k",
        user_ids=user_ids,
        sequences=sequences,
        item_ids=item_ids,
        attributes=_attribute_matrix(per_item),
        attribute_names=genres,
        titles=titles,
        timestamps=timestamps,
    )


def load_table(interactions: Path, catalogue: Path | None = None, image_root: Path | None = None,
               field_map: dict[str, str] | None = None) -> InteractionData:
    """The general format: every interaction row, plus what the catalogue says about each item.

    Items are those of the interactions and of the catalogue (an item listed
    but never interacted with still gets an index: it can be served). Each
    user's interactions are ordered by time, file order breaking ties.
    """
    from collections import Counter

    from model.training.table_format import read_catalogue, read_interactions

    rows = read_interactions(interactions)
    if not rows:
        raise ConfigError(f"{interactions}: no interactions")
    records = read_catalogue(catalogue, image_root, field_map) if catalogue is not None else []
    item_ids = _sorted_ids({row.item_id for row in rows} | {record.item_id for record in records})
    index = {item_id: i + 1 for i, item_id in enumerate(item_ids)}
    by_user: dict[str, list[tuple[float, int, int]]] = {}
    for row in rows:
        by_user.setdefault(row.user_id, []).append((row.time, row.line, index[row.item_id]))
    user_ids = _sorted_ids(set(by_user))
    sequences, timestamps = [], []
    for user in user_ids:
        events = sorted(by_user[user])
        sequences.append(np.asarray([item for _, _, item in events], dtype=np.int64))
        timestamps.append(np.asarray([t for t, _, _ in events], dtype=np.float64))

    names = _sorted_ids({name for record in records for name in record.categories})
    attribute_index = {name: i + 1 for i, name in enumerate(names)}
    per_item: list[list[int]] = [[] for _ in range(len(item_ids) + 1)]
    titles, descriptions = [""] * (len(item_ids) + 1), [""] * (len(item_ids) + 1)
    images: list[Path | None] = [None] * (len(item_ids) + 1)
    for record in records:
        i = index[record.item_id]
        per_item[i] = [attribute_index[name] for name in record.categories]
        titles[i], descriptions[i], images[i] = record.title, record.description, record.image
    actions = Counter(row.action for row in rows if row.action is not None)
    return InteractionData(
        name=interactions.stem if catalogue is None else catalogue.parent.name or interactions.stem,
        user_ids=user_ids,
        sequences=sequences,
        item_ids=item_ids,
        attributes=_attribute_matrix(per_item),
        attribute_names=names,
        titles=titles if any(titles) else None,
        timestamps=timestamps,
        descriptions=descriptions if any(descriptions) else None,
        images=images if any(path is not None for path in images) else None,
        action=actions.most_common(1)[0][0] if actions else None,
    )


def load_interactions(data_format: str, path: Path | None) -> InteractionData:
    if data_format == "s3rec":
        if path is None:
            raise ConfigError("--data is required for the s3rec format")
        return load_s3rec(path)
    if data_format == "ml100k":
        return load_ml100k(path)
    if data_format == "table":
        if path is None:
            raise ConfigError("--interactions is required for the table format")
        return load_table(path)
    raise ConfigError(f"unknown data format {data_format!r}; expected one of {FORMATS}")


def add_table_arguments(parser: argparse.ArgumentParser) -> None:
    """The general input format's options (shared with ``streamrec bench quality``)."""
    parser.add_argument("--interactions", type=Path,
                        help="interaction table (.tsv/.csv with a header, or .jsonl): user_id, item_id, timestamp, "
                             "optional action; implies --format table")
    parser.add_argument("--catalogue", type=Path, help="catalogue (.json list or .jsonl): item_id, title, "
                        "description, category, attributes, image")
    parser.add_argument("--image-root", type=Path, help="catalogue image paths are read only under this folder")
    parser.add_argument("--catalogue-fields", default=None,
                        help="rename catalogue fields, e.g. category=genres,image=poster")
    parser.add_argument("--towers", type=Path, default=None,
                        help="exported text and image towers (default <models>/towers, from `streamrec setup`)")
    parser.add_argument("--cache-dir", type=Path, default=Path(".streamrec/cache/content"),
                        help="where text and image vectors are cached by content hash")


def read_data(args: argparse.Namespace) -> tuple[InteractionData, str, Path | None]:
    """The data named by the arguments: the table format when --interactions is given."""
    from model.training.table_format import parse_field_map

    if args.interactions is None:
        if args.catalogue is not None:
            raise ConfigError("--catalogue needs --interactions")
        return load_interactions(args.data_format, args.data), args.data_format, args.data
    data = load_table(args.interactions, args.catalogue, args.image_root, parse_field_map(args.catalogue_fields))
    return data, "table", args.interactions


def first_seen(data: InteractionData) -> np.ndarray:
    """(N+1,) time of each item's first interaction (inf: never)."""
    if data.timestamps is None:
        raise ValueError("first interaction times need interaction timestamps")
    first = np.full(data.n_items + 1, np.inf)
    for sequence, times in zip(data.sequences, data.timestamps):
        np.minimum.at(first, sequence, times)
    return first


def newest_items(data: InteractionData, share: float) -> np.ndarray:
    """(N+1,) bool: the newest ``share`` of the interacted items by first interaction time."""
    first = first_seen(data)
    seen = np.flatnonzero(np.isfinite(first))
    count = max(1, math.ceil(share * len(seen)))
    newest = seen[np.lexsort((-seen, -first[seen]))][:count]  # latest first, ties: higher index first
    chosen = np.zeros(data.n_items + 1, dtype=bool)
    chosen[newest] = True
    return chosen


def item_counts(sequences: list[np.ndarray], n_items: int) -> np.ndarray:
    """(n_items + 1,) int64 number of interactions per item index."""
    counts = np.zeros(n_items + 1, dtype=np.int64)
    for sequence in sequences:
        np.add.at(counts, sequence, 1)
    return counts


def left_pad(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """(len(sequences), max_len) int64: the last ``max_len`` items, left-padded with 0."""
    batch = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, sequence in enumerate(sequences):
        tail = sequence[-max_len:]
        if len(tail):
            batch[row, max_len - len(tail):] = tail
    return batch
