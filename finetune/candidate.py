"""The candidate version of one fine-tuning cycle: its vocabulary, data, networks and files.

Two starts, one result (an artefact folder like ``streamrec train`` writes):

- **from the serving version** (its ``weights.pt``): the item vocabulary is
  the parent's, grown by the items the window holds and the parent never
  learnt (``model.training.vocab``); the towers are fine-tuned on every
  user's window but the newest interaction;
- **from nothing** (only the rule model serves): the vocabulary is the
  window's items; the towers are trained from scratch on items[:-2] with
  early stopping on items[-2], then on items[:-1], as ``streamrec train`` does.

Either way the item tower reads each item's photo vector where it has one
(``finetune.photos``, else the parent's stored one) and the missing-photo
vector where it has none. The ranker is then fitted with the new towers on the window's
items[-2] step (``model.training.ranker``); ``job`` keeps it only when it
beats retrieval alone on the held-out newest interactions.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.text import CONTENT_TEXT_FIELDS
from finetune.catalogue import entry_attribute_names, text_vectors
from finetune.photos import photo_matrix
from model.export.fused import Networks, export_all
from model.nets.towers import attribute_mixing
from model.serving.artefact import write_manifest
from model.serving.contract import (
    ACTION_CODE,
    ACTIONS,
    CATEGORY_SEPARATOR,
    ItemContent,
    ItemContext,
)
from model.serving.covisit import FILE_NAME as TRANSITIONS_FILE
from model.serving.covisit import NEIGHBOURS, WINDOW, build_table
from model.serving.networks import TowerConfig
from model.training.data import InteractionData, LeaveOneOut, item_counts, leave_one_out
from model.training.ranker import RankerInputs, RankerSettings, retrieve, train_ranker
from model.training.retrieval import (
    Catalogue,
    RetrievalModel,
    RetrievalSettings,
    fine_tune_retrieval,
    length_bucketed_batches,
    next_item_loss,
    train_retrieval,
    training_pairs,
)
from model.training.vocab import grow, grow_networks

# A first model's shape: small enough to learn something within a cycle's budget on a few
# cores (on the demo's window, 40 s on a busy 2-core machine: one layer over the newest 20
# items reached validation NDCG@10 0.048 in 13 epochs; two over 50 reached 0.038 in 8).
FIRST_TOWER: dict[str, Any] = {"fused_dim": 64, "max_sequence": 20, "n_layers": 1, "n_heads": 2, "dropout": 0.2}
FIRST_EPOCHS = 200  # the time budget ends training first on any real window
# From scratch: finetune_learning_rate x this (3e-4 -> 3e-3, the Amazon default of ``streamrec train``).
# On the demo's 30,000 ratings it stopped early at validation NDCG@10 0.105 after 16 epochs (22 s),
# against 0.097 after 20 (32 s) at 1e-3: fewer epochs matter when the machine is busy.
FIRST_LEARNING_RATE_FACTOR = 10.0
FIRST_FINAL_EPOCHS = 1  # passes over items[:-1] after early stopping (outside the time budget: keep it short)
RANKER = RankerSettings(epochs=4, min_gain=0.0)  # the cycle decides on its own window (ranker_choice)
# The time budget's share kept for the ranker and the last pass over items[:-1].
RESERVED_SHARE = 0.25


@dataclass
class Window:
    """The window over the candidate's vocabulary.

    data: per-user sequences over ``item_ids`` (1-based; 0 = unknown), with times;
    actions: per user, the action code of every interaction, aligned with ``data.sequences``;
    text / has_text: (N+1, T) / (N+1,) what the item tower trains on: the text of ``fields``;
    new_items: domain ids the parent did not know;
    image / has_image: (N+1, I) / (N+1,) photo vectors (zero rows without), or None when no
    item of the window has a photo.
    """

    data: InteractionData
    actions: list[np.ndarray]
    text: np.ndarray
    has_text: np.ndarray
    categories: list[str]
    new_items: list[str]
    new_attributes: list[str]
    fields: tuple[str, ...]
    image: np.ndarray | None = None
    has_image: np.ndarray | None = None

    @property
    def split(self) -> LeaveOneOut:
        return leave_one_out(self.data)

    def catalogue(self) -> Catalogue:
        attributes = torch.from_numpy(self.data.attributes)
        image = has_image = None
        if self.image is not None and self.has_image is not None:
            image, has_image = torch.from_numpy(self.image), torch.from_numpy(self.has_image.astype(np.float32))
        return Catalogue(attributes, attribute_mixing(attributes, self.data.n_attributes),
                         torch.from_numpy(self.text), torch.from_numpy(self.has_text.astype(np.float32)),
                         image, has_image)

    def content(self, encoder: Any, fields: tuple[str, ...], catalogue: dict[str, dict[str, Any]],
                image_dim: int) -> ItemContent:
        """Items 1..N as a worker would hand them to a model reading ``fields`` (with their photos)."""
        item_ids = self.data.item_ids
        if tuple(fields) == self.fields:
            text, has_text = self.text[1:], self.has_text[1:]
        else:
            text, has_text = text_vectors(encoder, tuple(fields), item_ids, catalogue)
        count = len(item_ids)
        if self.image is not None and self.has_image is not None and self.image.shape[1] == image_dim:
            image, has_image = self.image[1:], self.has_image[1:]
        else:
            image, has_image = np.zeros((count, image_dim), np.float32), np.zeros(count, bool)
        return ItemContent(list(item_ids), text, image, has_text, has_image, list(self.categories[1:]))


def build_window(rows: list[dict[str, Any]], catalogue: dict[str, dict[str, Any]], parent: Any | None,
                 encoder: Any, name: str, photos: dict[str, np.ndarray] | None = None,
                 image_dim: int | None = None) -> Window:
    """The window's interactions over the parent's vocabulary grown by the window's new items.

    Item text is read from the fields the parent reads; a first model reads what the rule
    model read (``CONTENT_TEXT_FIELDS``), so workers swapping to it keep their stored text vectors.
    Photos: the drained ``photos`` (item id -> vector), else the parent's stored photo vector.
    """
    fields = tuple(parent.text_fields) if parent is not None else tuple(CONTENT_TEXT_FIELDS)
    ordered = sorted(rows, key=lambda row: float(row["t"]))
    known = list(parent.item_ids[1:]) if parent is not None else []
    item_ids = grow(known, (str(row["i"]) for row in ordered))
    new_items = item_ids[len(known):]
    known_names = ([name for name, _ in sorted(parent.attribute_index.items(), key=lambda kv: kv[1])]
                   if parent is not None else [])
    names = grow(known_names, (name for item in new_items for name in entry_attribute_names(catalogue.get(item))))
    name_index = {name: i + 1 for i, name in enumerate(names)}
    per_item: list[list[int]] = [[]]
    for index, item in enumerate(item_ids, start=1):
        if parent is not None and index < len(parent.item_ids):
            stored = parent.stored_attributes[index]
            per_item.append(stored[stored > 0].tolist())
        else:
            per_item.append([name_index[n] for n in entry_attribute_names(catalogue.get(item))])
    width = max(1, max(len(row) for row in per_item))
    attributes = np.zeros((len(item_ids) + 1, width), np.int64)
    for index, row in enumerate(per_item):
        attributes[index, : len(row)] = row
    # The text the item tower trains on: what the parent trained with, else the catalogue's.
    text = np.zeros((len(item_ids) + 1, encoder.dim), np.float32)
    has_text = np.zeros(len(item_ids) + 1, bool)
    text[1:], has_text[1:] = text_vectors(encoder, fields, item_ids, catalogue)
    if parent is not None and parent.stored_text is not None and parent.stored_has_text is not None:
        stored = np.flatnonzero(parent.stored_has_text.astype(bool))
        stored = stored[stored < len(item_ids) + 1]
        text[stored], has_text[stored] = parent.stored_text[stored], True
    categories = [""] + [CATEGORY_SEPARATOR.join(entry_attribute_names(catalogue.get(item))) for item in item_ids]
    image, has_image = window_photos(item_ids, photos or {}, parent, image_dim)

    index = {item: i for i, item in enumerate(item_ids, start=1)}
    by_user: dict[str, list[tuple[float, int, int]]] = {}
    for row in ordered:
        by_user.setdefault(str(row["u"]), []).append((float(row["t"]), index[str(row["i"])], int(row["a"])))
    user_ids = sorted(by_user)
    sequences = [np.asarray([i for _, i, _ in by_user[u]], np.int64) for u in user_ids]
    actions = [np.asarray([a for _, _, a in by_user[u]], np.int64) for u in user_ids]
    timestamps = [np.asarray([t for t, _, _ in by_user[u]], np.float64) for u in user_ids]
    data = InteractionData(name=name, user_ids=user_ids, sequences=sequences, item_ids=item_ids,
                           attributes=attributes, attribute_names=names, timestamps=timestamps)
    return Window(data, actions, text, has_text, categories, new_items, names[len(known_names):], fields,
                  image, has_image)


def window_photos(item_ids: list[str], photos: dict[str, np.ndarray], parent: Any | None,
                  image_dim: int | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(N+1, I) photo vectors and (N+1,) has_image over the window's vocabulary (row 0: the
    unknown item), or (None, None) when no item has one."""
    stored = parent is not None and parent.stored_image is not None and parent.stored_has_image is not None
    if not photos and not stored:
        return None, None
    dim = image_dim or (parent.image_dim if parent is not None else len(next(iter(photos.values()))))
    image = np.zeros((len(item_ids) + 1, dim), np.float32)
    has_image = np.zeros(len(item_ids) + 1, bool)
    if stored:
        known = min(len(parent.stored_has_image), len(item_ids) + 1)
        image[:known], has_image[:known] = parent.stored_image[:known], parent.stored_has_image[:known].astype(bool)
    # A photo drained from the stream is the item's newest.
    drained, has_drained = photo_matrix(item_ids, photos, dim)  # (N, I), (N,)
    image[1:][has_drained] = drained[has_drained]
    has_image[1:] |= has_drained
    has_image[0] = False
    if not has_image.any():
        return None, None
    return image, has_image


def training_action(window: Window) -> int:
    """The action code the window holds most often (the towers read one action, as in training)."""
    codes = np.concatenate(window.actions) if window.actions else np.zeros(0, np.int64)
    codes = codes[codes > 0]
    return int(np.bincount(codes).argmax()) if len(codes) else ACTION_CODE["click"]


@dataclass(frozen=True)
class FineTuneSettings:
    epochs: int = 3
    minutes: float = 0.5
    learning_rate: float = 3e-4
    batch_size: int = 256
    seed: int = 42


def finetune_towers(networks: Networks, catalogue: Catalogue, sequences: list[np.ndarray], train_action: int,
                    settings: FineTuneSettings) -> dict[str, float]:
    """Continue training both towers in place on ``sequences``; returns loss and steps."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model = RetrievalModel(networks.config)
    model.item_tower, model.user_tower = networks.item_tower, networks.user_tower
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.1,
                                  betas=(0.9, 0.98))
    inputs, targets = (torch.from_numpy(a) for a in training_pairs(sequences, networks.config.max_sequence))
    lengths = (inputs > 0).sum(dim=1).numpy()
    loss_settings = RetrievalSettings()
    deadline = time.monotonic() + 60.0 * settings.minutes
    steps, total_loss, total_rows, epoch = 0, 0.0, 0, 0
    model.train()
    for epoch in range(1, settings.epochs + 1):
        for rows in length_bucketed_batches(lengths, settings.batch_size, rng):
            index = torch.from_numpy(rows)
            batch_inputs, batch_targets = inputs[index], targets[index]
            used = int((batch_inputs > 0).any(dim=0).nonzero()[0]) if (batch_inputs > 0).any() else 0
            batch_inputs, batch_targets = batch_inputs[:, used:], batch_targets[:, used:]  # drop all-padding columns
            vectors = model.catalogue_vectors(catalogue)  # (N+1, d)
            actions = torch.where(batch_inputs > 0, train_action, 0)
            hidden = model.user_tower.encode(vectors[batch_inputs], actions)  # (B, L, d)
            mask = batch_targets > 0
            if not mask.any():
                continue
            loss = next_item_loss(hidden[mask], batch_targets[mask], vectors, loss_settings)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            total_loss += float(loss.detach()) * int(mask.sum())
            total_rows += int(mask.sum())
            if time.monotonic() > deadline:
                break
        if time.monotonic() > deadline:
            break
    model.eval()
    return {"steps": float(steps), "epochs": float(epoch), "train_loss": total_loss / max(total_rows, 1),
            "train_rows": float(total_rows)}


def _context(window: Window, inputs: list[np.ndarray]) -> ItemContext:
    """Popularity and last-seen time of every item over ``inputs`` (the part trained on)."""
    data = window.data
    counts = item_counts(inputs, data.n_items)
    last_seen = np.zeros(data.n_items + 1, np.float64)
    split = window.split
    for user, sequence in zip(split.users.tolist(), inputs):
        np.maximum.at(last_seen, sequence, data.timestamps[user][: len(sequence)])  # type: ignore[index]
    return ItemContext(counts, last_seen)


def fit_ranker(networks: Networks, window: Window, train_action: int) -> tuple[Any, dict[str, float], Any, Any]:
    """A ranker fitted on the window's items[-2] step with ``networks``' towers (history items[:-2],
    context counted over items[:-2]); also returns the candidate lists and ranker inputs it used."""
    split = window.split
    model = RetrievalModel(networks.config)
    model.item_tower, model.user_tower = networks.item_tower, networks.user_tower
    catalogue = window.catalogue()
    times = np.asarray([window.data.timestamps[u][-3] for u in split.users], np.float64)  # type: ignore[index]
    lists = retrieve(model, catalogue, split.train, split.valid, _context(window, split.train), times,
                     networks.config, train_action, RANKER.candidates)
    with torch.no_grad():
        vectors = model.catalogue_vectors(catalogue).numpy()
    inputs = RankerInputs(vectors, window.text, networks.config, image=window.image)
    ranker, report = train_ranker(networks.config, RANKER, lists, inputs, progress=False)
    if window.image is None:
        with torch.no_grad():  # it only ever saw zeros: photos must not move its scores
            ranker.image_projection.weight.zero_()
    return ranker, report, lists, inputs


def train_first(window: Window, encoder_dim: int, tune: FineTuneSettings,
                train_action: int) -> tuple[Networks, dict[str, Any], float]:
    """Towers from scratch (items[:-2], early stopping on items[-2]), ranker, then items[:-1].

    Returns the networks, the training report and the co-visit fusion weight chosen on the
    ranker's held-out users (as ``streamrec train`` chooses it)."""
    from model.training.train import (
        covisit_choice,
        share_action_embedding,
        silence_untrained_modalities,
    )

    data, split = window.data, window.split
    config = TowerConfig(n_items=data.n_items, n_attributes=data.n_attributes,
                         max_attributes=data.attributes.shape[1], text_dim=encoder_dim, **FIRST_TOWER)
    settings = RetrievalSettings(negatives=0, learning_rate=tune.learning_rate * FIRST_LEARNING_RATE_FACTOR,
                                 epochs=max(tune.epochs, FIRST_EPOCHS), minutes=tune.minutes * (1 - RESERVED_SHARE),
                                 eval_every=2, patience=4, train_action=train_action, seed=tune.seed,
                                 fine_tune_epochs=FIRST_FINAL_EPOCHS)
    catalogue = window.catalogue()
    model, report = train_retrieval(config, settings, split, catalogue, progress=False)
    share_action_embedding(model, train_action)
    silence_untrained_modalities(model, trained_text=bool(window.has_text.any()),
                                 trained_image=window.image is not None)
    networks = Networks(config, model.item_tower, model.user_tower, Networks.build(config).ranker)
    ranker, ranker_report, lists, inputs = fit_ranker(networks, window, train_action)
    networks.ranker = ranker
    # Chosen on every user's items[-2] step: the ranker's 10% alone are too few on a small window.
    weight, covisit_report = covisit_choice(ranker, lists, inputs, data, split, np.arange(len(lists.targets)))
    loss = fine_tune_retrieval(model, settings, split.inputs("test"), catalogue, settings.fine_tune_epochs,
                               settings.learning_rate * settings.fine_tune_lr_share, progress=False)
    share_action_embedding(model, train_action)
    return networks, {"start": "scratch", "best_epoch": report.best_epoch, "epochs": report.epochs_run,
                      "valid_ndcg@10": report.validation.get("ndcg@10", 0.0), "last_loss": loss,
                      "seconds": round(report.seconds, 2), "ranker": ranker_report, "covisit": covisit_report,
                      "retrieval": asdict(settings)}, weight


def train_warm(parent_dir: Path, window: Window, tune: FineTuneSettings,
               train_action: int) -> tuple[Networks, dict[str, Any]]:
    """The parent's networks, grown to the window's vocabulary, fine-tuned on items[:-1]; a ranker refitted."""
    data, split = window.data, window.split
    networks = grow_networks(Networks.load(parent_dir), data.n_items, data.n_attributes, data.attributes.shape[1])
    training = finetune_towers(networks, window.catalogue(), split.inputs("test"), train_action, tune)
    ranker, ranker_report, _, _ = fit_ranker(networks, window, train_action)
    networks.ranker = ranker
    return networks, {"start": "parent", **training, "ranker": ranker_report}


def retrieval_order(ranker: Any) -> None:
    """Switch the ranker's learnt correction off, exactly: blend 0 and a zero output layer,
    so its logit is ``score_weight * retrieval score + bias`` (+ the query prior on searches)."""
    with torch.no_grad():
        ranker.blend.fill_(0.0)
        ranker.mlp[-1].weight.zero_()
        ranker.mlp[-1].bias.zero_()
        if float(ranker.score_weight) <= 0.0:
            ranker.score_weight.fill_(1.0)


def write_version(networks: Networks, window: Window, staging: Path, manifest: dict[str, Any],
                  config: dict[str, Any], parent: Any | None, train_action: int) -> dict[str, float]:
    """Every file of the candidate artefact in ``staging``; returns the ONNX parity."""
    data, split = window.data, window.split
    parity = export_all(networks, staging)
    torch.save(networks.state_dicts(), staging / "weights.pt")
    inputs = split.inputs("test")
    context = _context(window, inputs)
    # An item the version has no id for (index 0) is one the window never saw: new, not 50 years old.
    context.last_seen[0] = max((float(t.max()) for t in data.timestamps if len(t)), default=0.0)  # type: ignore[union-attr]
    # The ranker was fitted on the window's counts: it is served with them.
    photos = ({"image": window.image, "has_image": window.has_image}
              if window.image is not None and window.has_image is not None else {})
    np.savez_compressed(staging / "item_features.npz", attributes=data.attributes, popularity=context.popularity,
                        text=window.text, has_text=window.has_text, last_seen=context.last_seen, **photos)
    (staging / "id_maps.json").write_text(json.dumps({
        "items": data.item_index(),
        "attributes": {name: i + 1 for i, name in enumerate(data.attribute_names)},
    }))
    covisit = dict(config.get("covisit", {"window": WINDOW, "neighbours": NEIGHBOURS, "weight": 0.0}))
    through = float(covisit.get("through", float("-inf")))
    fresh = [times > through for times in data.timestamps]  # type: ignore[union-attr]
    base = parent.transitions if parent is not None else None
    build_table(data.sequences, data.n_items, base=base, fresh=fresh).save(staging / TRANSITIONS_FILE)
    newest = max((float(times.max()) for times in data.timestamps if len(times)), default=through)  # type: ignore[union-attr]
    covisit["through"] = max(through, newest)
    config = {**config, "tower": networks.config.to_dict(), "train_action": train_action, "actions": list(ACTIONS),
              "ranker": {**config.get("ranker", {}), "candidates": RANKER.candidates}, "covisit": covisit}
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_manifest(staging, manifest)
    return parity


def first_config(towers_dir: Path, fields: tuple[str, ...]) -> dict[str, Any]:
    """``config.json`` basics of a first model: what it reads as text, and its encoders' fingerprints
    (from the exported towers' sidecars, so workers serve it over those towers only)."""
    encoders = {}
    for kind in ("text", "image"):
        sidecar = json.loads((towers_dir / kind / f"{kind}_tower.json").read_text())
        encoders[kind] = {"encoder": sidecar.get("encoder"), "source_fingerprint": sidecar.get("source_fingerprint")}
    return {"text_fields": list(fields), "encoders": encoders,
            "covisit": {"window": WINDOW, "neighbours": NEIGHBOURS, "weight": 1.0}}


def fresh_staging(staging: Path) -> Path:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


