"""``streamrec train``: fit the towers and the ranker, export them, publish an artefact.

    streamrec train --data FILE --format s3rec|ml100k --out DIR
                    [--epochs N] [--minutes M] [--threads T]
    streamrec train --interactions FILE [--catalogue FILE --image-root DIR
                    --catalogue-fields category=genres,image=poster] --out DIR

The second form reads the general input format (``model.training.table_format``):
titles, descriptions and photos of the catalogue are embedded once with the
exported ONNX towers (``--towers``, default ``<models>/towers``) and cached by
content hash in ``--cache-dir``; the item tower learns from all of them.

Steps: leave-one-out split; retrieval towers on items[:-2] with a cosine
learning-rate schedule and early stopping on the validation item; ranker on
the validation step (``model.training.ranker``); a few fine-tuning epochs of the
towers on items[:-1], the newest step, as the streaming fine-tuner would do;
ONNX export with parity checks; test metrics (items[-1], never trained on)
through the exported networks; all files written to a staging directory that
is renamed into place at the end. ``--minutes`` bounds the wall clock: the
schedule ends when the epochs or the time run out, whichever comes first.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import ConfigError, StreamrecError
from model.export.fused import Networks, export_all
from model.nets.towers import TowerConfig, attribute_mixing
from model.serving.artefact import (
    new_version,
    publish,
    staging_directory,
    utc_now,
    write_manifest,
)
from model.serving.contract import (
    ACTION_CODE,
    ACTIONS,
    TRAINED_TEXT_FIELDS,
    ItemContext,
)
from model.serving.covisit import FILE_NAME as TRANSITIONS_FILE
from model.serving.covisit import NEIGHBOURS, WINDOW, build_table
from model.training.covisit_weight import choose_weight
from model.training.data import (
    FORMATS,
    InteractionData,
    LeaveOneOut,
    add_table_arguments,
    item_counts,
    leave_one_out,
    newest_items,
    read_data,
    unsplit_sequences,
)
from model.training.ranker import (
    RankerInputs,
    RankerSettings,
    holdout_split,
    rechoose_blend,
    reranked,
    retrieve,
    subset,
    train_ranker,
)
from model.training.retrieval import (
    Catalogue,
    RetrievalModel,
    RetrievalSettings,
    fine_tune_on_newest_step,
    train_retrieval,
)

# What one interaction of each source format means to the action vocabulary.
FORMAT_ACTION = {"s3rec": "purchase", "ml100k": "view", "table": "view"}
# Share of the time budget kept for the ranker and the fine-tuning epochs.
RESERVED_SHARE = 0.2
# Defaults per source format. The Amazon ones were tuned on Toys_and_Games
# (sparse, short sequences: strong dropout, popularity-drawn negatives keep
# each step cheap); MovieLens is dense with long sequences and a small catalogue
# (full softmax is cheap there, less dropout).
FORMAT_TOWER: dict[str, dict[str, Any]] = {
    "s3rec": {"fused_dim": 128, "max_sequence": 50, "n_layers": 2, "n_heads": 2, "dropout": 0.5},
    "ml100k": {"fused_dim": 64, "max_sequence": 50, "n_layers": 2, "n_heads": 2, "dropout": 0.2},
    "table": {"fused_dim": 64, "max_sequence": 50, "n_layers": 2, "n_heads": 2, "dropout": 0.2},
}
FORMAT_RETRIEVAL: dict[str, RetrievalSettings] = {
    "s3rec": RetrievalSettings(negatives=4096, negative_power=0.75, learning_rate=3e-3, epochs=30, batch_size=128,
                               fine_tune_epochs=10, fine_tune_holdout=0.1),
    "ml100k": RetrievalSettings(negatives=0, learning_rate=1e-3, epochs=100, eval_every=5),
    # Catalogues with content: a second softmax over the newest 20% of the items, each known by
    # its content alone, at half the weight of the main one, so that text and photo learn to
    # place an item listed after training without pulling the user states away from the films
    # already seen; the text projection learns at a tenth of the rate (tuned on
    # movielens-posters' cold split and all users at these 15 epochs, docs/model.md; id and
    # modality dropout did not help there).
    "table": RetrievalSettings(negatives=0, learning_rate=3e-3, epochs=15, eval_every=3, minutes=7.0,
                               content_loss_weight=0.5, content_loss_share=0.2, text_learning_rate_share=0.1),
}
DEFAULT_RETRIEVAL = FORMAT_RETRIEVAL["s3rec"]


def embed_titles(titles: list[str], batch_size: int = 64,
                 encoder_path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N+1, text_dim) unit text vectors of the titles with the frozen text tower, (N+1,) has_text."""
    from model.export.text_tower import (
        MAX_TEXT_TOKENS,
        default_text_encoder_path,
        load_text_tower,
    )

    tower, tokenizer = load_text_tower(encoder_path or default_text_encoder_path())
    vectors = np.zeros((len(titles), tower.dim), dtype=np.float32)
    present = np.asarray([bool(title.strip()) for title in titles])
    rows = np.flatnonzero(present)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            tokens = tokenizer(
                [titles[i] for i in chunk], padding=True, truncation=True,
                max_length=MAX_TEXT_TOKENS, return_tensors="pt",
            )
            vectors[chunk] = tower(tokens["input_ids"], tokens["attention_mask"]).numpy()
    return vectors, present


def text_encoder_dim(encoder_path: Path | None) -> int:
    """Output width of a local Hugging Face encoder (its ``hidden_size``), without loading it."""
    from model.export.text_tower import default_text_encoder_path

    config_path = Path(encoder_path or default_text_encoder_path()) / "config.json"
    try:
        return int(json.loads(config_path.read_text())["hidden_size"])
    except (OSError, ValueError, KeyError) as error:
        raise StreamrecError(f"cannot read the text encoder's width from {config_path}: {error}") from error


def item_last_seen(data: InteractionData, split: LeaveOneOut,
                   sequences: list[np.ndarray] | None = None) -> np.ndarray | None:
    """(N+1,) latest time per item (0 when never seen) in ``sequences`` (per split user, a prefix
    of its sequence; default the training prefixes items[:-2]), if times exist."""
    if data.timestamps is None:
        return None
    last_seen = np.zeros(data.n_items + 1, dtype=np.float64)
    for user, train in zip(split.users, split.train if sequences is None else sequences):
        times = data.timestamps[user][: len(train)]
        np.maximum.at(last_seen, train, times)
    return last_seen


def _training_times(data: InteractionData, split: LeaveOneOut, offset: int) -> np.ndarray | None:
    if data.timestamps is None:
        return None
    return np.asarray([data.timestamps[u][-offset] for u in split.users], dtype=np.float64)


def silence_untrained_modalities(model: RetrievalModel, *, trained_text: bool, trained_image: bool = False) -> None:
    """Make the projections of modalities the training data did not have a constant.

    Without photos (or titles) in the data those projections never learned
    anything: left at their random start they would add noise to every served
    item that has a photo or a title. Each becomes the modality's learned
    "missing" vector whatever the input, so such an item is placed exactly as in
    training; a later fine-tuning cycle that sees the modality trains it on.
    """
    tower = model.item_tower
    silenced = [] if trained_image else [(tower.image_projection, tower.missing_image)]
    if not trained_text:
        silenced.append((tower.text_projection, tower.missing_text))
    with torch.no_grad():
        for projection, missing in silenced:
            projection.weight.zero_()
            projection.bias.copy_(missing)


def share_action_embedding(model: RetrievalModel, trained_code: int) -> None:
    """Give every real action the embedding the data taught one of them.

    The training data has a single interaction kind; until fine-tuning on the
    stream teaches the difference, all kinds (and searches) read the same.
    """
    with torch.no_grad():
        table = model.user_tower.action_embedding.weight  # (len(ACTIONS), d)
        table[1:] = table[trained_code]
        table[ACTION_CODE["pad"]] = 0.0


def _item_features(
    data: InteractionData, split: LeaveOneOut, learnt: list[np.ndarray], text: np.ndarray | None,
    has_text: np.ndarray | None, image: np.ndarray | None = None, has_image: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The artefact's per-item features. The ranker's context (popularity, last seen) counts
    ``learnt``: the sequences the served towers learnt from, each a prefix of a split user's
    sequence, so a request is served with the counts of everything before the step it predicts,
    as the ranker was fitted (items[:-2] counts for the validation step)."""
    features = {"attributes": data.attributes, "popularity": item_counts(learnt, data.n_items)}
    if text is not None and has_text is not None:
        features.update(text=text, has_text=has_text)
    if image is not None and has_image is not None:
        features.update(image=image, has_image=has_image)
    last_seen = item_last_seen(data, split, learnt)
    if last_seen is not None:
        features["last_seen"] = last_seen
    return features


def covisit_choice(ranker: Any, held: Any, inputs: RankerInputs, data: InteractionData, split: LeaveOneOut,
                   holdout_rows: np.ndarray) -> tuple[float, dict[str, float]]:
    """The co-visit fusion weight, chosen on held-out users (``held``: their candidate lists,
    row i for ``split`` row ``holdout_rows[i]``).

    Their validation step, as it would be served: the ranker's order of the
    retrieval top-K, fused with co-visits from a table of what precedes the
    validation step (items[:-2] of the split's users, which never holds a
    validation target, and the whole of the sequences too short for the split).
    """
    orders = reranked(ranker, held, inputs, float(ranker.blend))
    histories = [split.train[row].tolist() for row in holdout_rows]
    table = build_table(split.train + unsplit_sequences(data, split), data.n_items)
    return choose_weight(orders.tolist(), histories, held.targets.tolist(), table)


def table_through(data: InteractionData) -> dict[str, float]:
    """``{"through": newest interaction time}`` of timestamped data: the fine-tuner extends
    the table only with later interactions, so a replay of the training data is not counted twice."""
    if data.timestamps is None:
        return {}
    newest = [float(times.max()) for times in data.timestamps if len(times)]
    return {"through": max(newest)} if newest else {}


def train_artefact(
    data: InteractionData,
    data_format: str,
    data_path: Path | None,
    out: Path,
    tower_overrides: dict[str, Any] | None = None,
    retrieval: RetrievalSettings | None = None,
    ranker: RankerSettings = RankerSettings(),
    progress: bool = True,
    text_encoder_path: Path | None = None,
    image_weights_path: Path | None = None,
    towers_dir: Path | None = None,
    cache_dir: Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train, export and publish one artefact at ``out``; returns its manifest.

    The towers train on ``device`` (``"cuda"`` on a GPU); the ranker, the export and the
    evaluation run on the CPU.

    ``text_encoder_path`` / ``image_weights_path``: the content encoders (default
    all-MiniLM-L6-v2 and the packaged EfficientNet-Lite0 weights); their
    identities are recorded so that workers serve the model only over towers
    exported from the same encoders. Data with descriptions or photos (the
    table format) is embedded with the exported towers in ``towers_dir``
    (default ``<models>/towers``), cached in ``cache_dir``.
    """
    from model.serving.trained import TrainedModel
    from model.training.evaluate import evaluate_trained

    started, cpu_started = time.monotonic(), time.process_time()
    split = leave_one_out(data)
    from model.export.towers import encoder_identities

    encoders = encoder_identities(text_encoder_path, image_weights_path)
    text_fields: tuple[str, ...] = TRAINED_TEXT_FIELDS
    image = has_image = None
    if data.images is not None or data.descriptions is not None:
        from model.training.content_vectors import (
            check_towers,
            content_vectors,
            default_towers_dir,
        )

        towers_dir = towers_dir or default_towers_dir()
        check_towers(towers_dir, encoders)
        content = content_vectors(data, towers_dir, cache_dir, progress)
        text, has_text, text_fields = content.text, content.has_text, content.text_fields
        if content.has_image.any():
            image, has_image = content.image, content.has_image
    else:
        text, has_text = (embed_titles(data.titles, encoder_path=text_encoder_path) if data.titles is not None
                          else (None, None))
    attributes = torch.from_numpy(data.attributes)
    catalogue = Catalogue(
        attributes=attributes,
        attribute_mixing=attribute_mixing(attributes, data.n_attributes),
        text=None if text is None else torch.from_numpy(text),
        has_text=None if has_text is None else torch.from_numpy(has_text.astype(np.float32)),
        image=None if image is None else torch.from_numpy(image),
        has_image=None if has_image is None else torch.from_numpy(has_image.astype(np.float32)),
    )
    config = TowerConfig(
        n_items=data.n_items,
        n_attributes=data.n_attributes,
        max_attributes=data.attributes.shape[1],
        text_dim=text.shape[1] if text is not None else text_encoder_dim(text_encoder_path),
        **{**FORMAT_TOWER[data_format], **(tower_overrides or {})},
    )
    retrieval = retrieval if retrieval is not None else FORMAT_RETRIEVAL[data_format]
    train_action = ACTION_CODE[data.action or FORMAT_ACTION[data_format]]
    retrieval = replace(retrieval, train_action=train_action, minutes=retrieval.minutes * (1 - RESERVED_SHARE))
    if retrieval.content_loss_weight > 0 and data.timestamps is not None:
        # The content-only loss ranks the newest items against each other (``content_only_loss``).
        catalogue = replace(catalogue, newest=torch.from_numpy(newest_items(data, retrieval.content_loss_share)))
    model, report = train_retrieval(config, retrieval, split, catalogue, progress=progress, device=device)
    share_action_embedding(model, train_action)
    silence_untrained_modalities(model, trained_text=text is not None, trained_image=image is not None)

    item_context = ItemContext(item_counts(split.train, data.n_items), item_last_seen(data, split))
    valid_times = _training_times(data, split, offset=3)
    lists = retrieve(model, catalogue, split.train, split.valid, item_context, valid_times, config,
                     train_action, ranker.candidates)
    with torch.no_grad():
        vectors = model.catalogue_vectors(catalogue).numpy()
    inputs = RankerInputs(vectors=vectors, text=text, config=config, image=image)
    fitted_ranker, ranker_report = train_ranker(config, ranker, lists, inputs, progress)
    if image is None:
        with torch.no_grad():  # it only ever saw zeros: photos must not move its scores
            fitted_ranker.image_projection.weight.zero_()
    _, holdout_rows = holdout_split(len(lists.targets), ranker)
    # The validation step has done its job (epoch choice, ranker fit); the towers then learn it too,
    # as the fine-tuner does with each new window. With a held-out share, for as many epochs as the
    # ranker's held-out users' validation items say it helps; their validation step stays unseen,
    # so the ranker's blend and the co-visit weight are then chosen again on it, as the fine-tuned
    # towers retrieve it.
    held = np.zeros(len(split.users), dtype=bool)
    held[holdout_rows] = True
    fine_tune_report = fine_tune_on_newest_step(model, retrieval, split, catalogue, progress, device, held)
    if retrieval.fine_tune_epochs > 0:
        share_action_embedding(model, train_action)
    if retrieval.fine_tune_epochs > 0 and retrieval.fine_tune_holdout > 0:
        with torch.no_grad():
            inputs = replace(inputs, vectors=model.catalogue_vectors(catalogue).numpy())
        held_lists = retrieve(model, catalogue, [split.train[row] for row in holdout_rows], split.valid[holdout_rows],
                              item_context, None if valid_times is None else valid_times[holdout_rows], config,
                              train_action, ranker.candidates)
        if not ranker_report["score_weight_reset"]:
            ranker_report["after_fine_tune"] = rechoose_blend(fitted_ranker, held_lists, inputs, ranker.min_gain)
        covisit_weight, covisit_report = covisit_choice(fitted_ranker, held_lists, inputs, data, split, holdout_rows)
    else:  # the ranker's inputs are from before any fine-tuning: the choice is as it was made before it
        covisit_weight, covisit_report = covisit_choice(fitted_ranker, subset(lists, holdout_rows), inputs, data,
                                                        split, holdout_rows)
    # After fine-tuning the towers have learnt the newest step (items[:-1]); the context counts it.
    learnt = split.inputs("test") if retrieval.fine_tune_epochs > 0 else split.train
    train_seconds = time.monotonic() - started
    # CPU seconds do not grow when other work shares the machine; wall seconds do.
    train_cpu_seconds = time.process_time() - cpu_started

    networks = Networks(config, model.item_tower, model.user_tower, fitted_ranker)
    staging = staging_directory(out)
    parity = export_all(networks, staging)
    torch.save(networks.state_dicts(), staging / "weights.pt")
    (staging / "config.json").write_text(json.dumps({
        "tower": config.to_dict(),
        "retrieval": asdict(retrieval),
        "ranker": asdict(ranker),
        "train_action": train_action,
        "actions": list(ACTIONS),
        "text_fields": list(text_fields),  # what serving must embed as an item's text
        "covisit": {"window": WINDOW, "neighbours": NEIGHBOURS, "weight": covisit_weight,
                    **table_through(data)},
        "encoders": encoders,
    }, indent=2) + "\n")
    (staging / "id_maps.json").write_text(json.dumps({
        "items": data.item_index(),
        "attributes": {name: i + 1 for i, name in enumerate(data.attribute_names)},
    }))
    np.savez_compressed(staging / "item_features.npz",
                        **_item_features(data, split, learnt, text, has_text, image, has_image))
    # Transitions of every training sequence, whole: the newest step and the users too short
    # for the split hold the most recent ones. The test metrics below rank with the networks
    # alone, so the table may hold items[-1]. Workers add the stream's transitions.
    build_table(data.sequences, data.n_items).save(staging / TRANSITIONS_FILE)
    manifest: dict[str, Any] = {
        "version": new_version(data.name),
        "parent": None,
        "created_at": utc_now(),
        "data": {
            "dataset": data.name,
            "format": data_format,
            "path": None if data_path is None else str(data_path),
            "users": len(data.sequences),
            "items": data.n_items,
            "items_with_text": int(has_text.sum()) if has_text is not None else 0,
            "items_with_image": int(has_image.sum()) if has_image is not None else 0,
            "interactions": int(sum(len(s) for s in data.sequences)),
            "window": (
                "leave-one-out per user: towers trained on items[:-2] with early stopping on items[-2], "
                "ranker fitted on the items[-2] step, then towers fine-tuned on items[:-1]; items[-1] never seen "
                "by the networks; co-visit table from every interaction"
            ),
        },
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "train_threads": torch.get_num_threads(),
        "train_device": device,
        "metrics": {
            "best_epoch": report.best_epoch,
            "epochs_run": report.epochs_run,
            "valid_retrieval": report.validation,
            "ranker": ranker_report,
            "covisit": {**covisit_report, "weight": covisit_weight},
            "fine_tune": fine_tune_report,
            "onnx_parity_max_abs_diff": parity,
        },
    }
    write_manifest(staging, manifest)
    served = TrainedModel(staging)
    test = evaluate_trained(served, data, split, "test", "full", covisits=True)
    manifest["metrics"]["test_full"] = {**test.metrics, **test.extra}
    manifest = write_manifest(staging, manifest)
    publish(staging, out)
    return manifest


def training_device(choice: str) -> str:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda`` without one is a configuration error."""
    available = torch.cuda.is_available()
    if choice == "cuda" and not available:
        raise ConfigError("--device cuda: torch sees no CUDA GPU here (use --device cpu or auto)")
    return "cuda" if choice == "cuda" or (choice == "auto" and available) else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrec train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="interaction file (optional for ml100k: the recbole copy)")
    parser.add_argument("--format", choices=FORMATS, default="s3rec", dest="data_format")
    add_table_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="artefact directory to create or replace")
    parser.add_argument("--epochs", type=int, help="retrieval epochs (the learning-rate schedule spans them)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget (default per format: 25 for s3rec/ml100k, 7 for table)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=DEFAULT_RETRIEVAL.seed)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the towers train (auto: a CUDA GPU when torch sees one, else the CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--text-encoder", type=Path, default=None,
                        help="local Hugging Face encoder folder (default all-MiniLM-L6-v2); serve the "
                             "model with STREAMREC_TEXT_ENCODER_PATH set to the same folder")
    parser.add_argument("--image-weights", type=Path, default=None,
                        help="EfficientNet-Lite0 state dict (default the packaged ImageNet weights); serve "
                             "with STREAMREC_IMAGE_ENCODER_WEIGHTS set to the same file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        device = training_device(args.device)
        data, args.data_format, args.data = read_data(args)
        defaults = FORMAT_RETRIEVAL[args.data_format]
        retrieval = replace(
            defaults,
            epochs=args.epochs if args.epochs is not None else defaults.epochs,
            minutes=args.minutes if args.minutes is not None else defaults.minutes,
            seed=args.seed,
        )
        manifest = train_artefact(data, args.data_format, args.data, args.out, retrieval=retrieval,
                                  progress=not args.quiet, text_encoder_path=args.text_encoder,
                                  image_weights_path=args.image_weights, towers_dir=args.towers,
                                  cache_dir=args.cache_dir, device=device)
    except StreamrecError as error:
        print(f"streamrec train: {error}", file=sys.stderr)
        return 2
    test = manifest["metrics"]["test_full"]
    print(json.dumps({
        "artefact": str(args.out),
        "version": manifest["version"],
        "train_seconds": manifest["train_seconds"],
        "train_cpu_seconds": manifest["train_cpu_seconds"],
        "best_epoch": manifest["metrics"]["best_epoch"],
        "valid_ndcg@10": manifest["metrics"]["valid_retrieval"].get("ndcg@10"),
        "test_hr@10": test["hr@10"],
        "test_ndcg@10": test["ndcg@10"],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
