"""``streamrec finetune``: fine-tune the serving model on what the stream has seen.

One cycle:

1. drain ``events.clicks``, ``events.searches`` and ``catalog.items`` with the
   consumer group ``<app_id>.finetune`` into an append-only interaction log
   under ``<data_dir>/finetune/`` (fsynced before the offsets are committed,
   bounded to ``finetune_max_interactions``, oldest dropped);
   and the newest upsert of every catalogue item into ``catalogue.json``, and
   the image-tower vector of its newest photo into ``photos.npz``
   (``finetune.photos``; photos also come from ``events.images``);
2. build the candidate (``finetune.candidate``): warm-started from the current
   version's ``weights.pt`` with its item vocabulary grown by the window's new
   items, or, while only the rule model serves, trained from scratch on the
   window's items; the item tower trains on the photo vectors of the items
   that have one (the others take the missing-photo path); the ranker is
   refitted with the new towers;
3. evaluate candidate and serving model (trained or rule) through the serving
   contract on the newest interaction of every user (``finetune.heldout``);
   the candidate's ranker is dropped (served in retrieval order) when it does
   not beat retrieval alone there;
4. promote the candidate only if it is not worse than a trained serving model
   by more than ``finetune_margin`` (strictly better than the rule model);
   log the decision with both models' metrics; publish ``ModelUpdate`` on
   ``model.updates`` so that workers hot-swap.

See docs/finetuning.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigError, DecodeError
from core.settings import Settings
from finetune.candidate import FineTuneSettings, finetune_towers  # noqa: F401 (this module's API)
from finetune.catalogue import CatalogueLog
from finetune.files import replace_whole
from finetune.photos import PhotoLog
from model.export.fused import Networks, export_all
from model.serving.artefact import (
    new_version,
    staging_directory,
    utc_now,
    write_manifest,
)
from model.serving.contract import ACTION_CODE
from model.serving.covisit import FILE_NAME as TRANSITIONS_FILE
from model.serving.covisit import build_table
from model.serving.registry import Registry
from model.training.data import InteractionData, leave_one_out

log = logging.getLogger(__name__)
HELD_OUT_METRIC = "ndcg@10"
LOG_FILE = "interactions.jsonl"
DECISIONS_FILE = "decisions.jsonl"
DRAIN_IDLE_POLLS = 2  # empty polls in a row that mean "caught up" (end offsets are not trusted)


# --- the interaction log -----------------------------------------------------------
class InteractionLog:
    """Append-only JSON lines ``{"t": time, "u": user, "i": item, "a": action code}``.

    Appends are fsynced before the consumer commits, so a crash loses nothing
    and a redelivery at most repeats a line (duplicates are dropped by event id).
    """

    def __init__(self, folder: Path, max_interactions: int) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOG_FILE
        self.max_interactions = max_interactions

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write("".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows))
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Unique interactions (by event id), keeping the newest ``max_interactions``."""
        if not self.path.is_file():
            return []
        rows: dict[str, dict[str, Any]] = {}
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash
            rows[row["e"]] = row
        kept = sorted(rows.values(), key=lambda row: row["t"])[-self.max_interactions :]
        return kept

    def compact(self) -> int:
        """Rewrite the log with only what ``read`` keeps (write then rename); returns the count."""
        kept = self.read()
        text = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in kept)
        replace_whole(self.path, lambda handle: handle.write(text.encode()),
                      scratch=self.path.with_suffix(".compacting").name)
        return len(kept)


def interaction_rows(raw_clicks: list[bytes], max_bytes: int) -> tuple[list[dict[str, Any]], int]:
    """Decode click events into log rows; returns (rows, undecodable count).

    Bad messages are the workers' to dead-letter; the fine-tuner only skips them.
    """
    from core.events import ClickEvent, decode

    rows, bad = [], 0
    for raw in raw_clicks:
        try:
            event = decode(ClickEvent, raw, max_bytes=max_bytes)
        except DecodeError:
            bad += 1
            continue
        rows.append({"e": event.event_id, "t": event.event_time, "u": event.user_id, "i": event.item_id,
                     "a": ACTION_CODE[event.action]})
    return rows, bad


async def drain_topics(settings: Settings, interactions: InteractionLog, max_seconds: float = 300.0,
                       catalogue: CatalogueLog | None = None, photos: PhotoLog | None = None) -> dict[str, int]:
    """Read new clicks, searches, catalogue events and photos until caught up; returns counts per topic.

    Clicks become training interactions; catalogue events update ``catalogue``
    (the text and categories of items a model has not learnt yet); catalogue
    photos (in upserts and on ``events.images``) update ``photos``. Searches and
    visual searches are read (and their offsets committed) so the group stays
    current; training does not use them yet.
    """
    from stream import kafka

    topics = {settings.topic(key): key for key in ("clicks", "searches", "catalog", "images")}
    consumer = kafka.consumer(settings, *topics, group_id=f"{settings.app_id}.finetune", fetch_max_wait_ms=200,
                              max_partition_fetch_bytes=8 << 20)
    counts = {key: 0 for key in topics.values()} | {"undecodable": 0, "unusable_photos": 0}
    await consumer.start()
    try:
        deadline, idle = time.monotonic() + max_seconds, 0
        while idle < DRAIN_IDLE_POLLS and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=20_000)
            records = [record for batch in batches.values() for record in batch]
            if not records:
                idle += 1 if consumer.assignment() else 0
                continue
            idle = 0
            clicks = [r.value for r in records if topics.get(r.topic) == "clicks"]
            rows, bad = interaction_rows(clicks, settings.max_event_bytes)
            interactions.append(rows)
            listed = [r.value for r in records if topics.get(r.topic) == "catalog"]
            if catalogue is not None:
                catalogue.apply(listed, settings.max_event_bytes)
            if photos is not None:
                pictured = [r.value for r in records if topics.get(r.topic) == "images"]
                counts["unusable_photos"] += photos.apply(photo_events(listed, pictured, settings.max_event_bytes))
            await consumer.commit()
            counts["undecodable"] += bad
            for record in records:
                counts[topics[record.topic]] += 1
    finally:
        await consumer.stop()
    return counts


def photo_events(listed: list[bytes], pictured: list[bytes], max_bytes: int) -> list[Any]:
    """Decoded catalogue events, then catalogue-photo events (undecodable ones are the workers'
    to dead-letter)."""
    from core.events import CatalogItem, ImageEvent, decode

    events: list[Any] = []
    for kind, raws in ((CatalogItem, listed), (ImageEvent, pictured)):
        for raw in raws:
            try:
                events.append(decode(kind, raw, max_bytes=max_bytes))
            except DecodeError:
                continue
    return events


# --- training ----------------------------------------------------------------------
def write_candidate(networks: Networks, parent: Any, staging: Path, manifest: dict[str, Any],
                    data: InteractionData | None = None) -> dict[str, float]:
    """Export the networks, copy the parent's vocabulary and features into ``staging``
    and extend its item-to-item transitions with the window's newer interactions."""
    parity = export_all(networks, staging)
    torch.save(networks.state_dicts(), staging / "weights.pt")
    for name in ("id_maps.json", "item_features.npz"):
        shutil.copy2(parent.directory / name, staging / name)
    config = dict(parent.config)
    if data is not None and data.timestamps is not None and (parent.transitions is not None or data.sequences):
        covisit = dict(config.get("covisit", {}))
        # Interactions the parent's table already holds are not counted twice.
        through = float(covisit.get("through", float("-inf")))
        fresh = [times > through for times in data.timestamps]
        table = build_table(data.sequences, parent.n_items, base=parent.transitions, fresh=fresh)
        table.save(staging / TRANSITIONS_FILE)
        newest = max((float(times.max()) for times in data.timestamps if len(times)), default=through)
        covisit.update(through=max(through, newest))
        covisit.setdefault("weight", parent.covisit_weight)
        config["covisit"] = covisit
    elif (parent.directory / TRANSITIONS_FILE).is_file():
        shutil.copy2(parent.directory / TRANSITIONS_FILE, staging / TRANSITIONS_FILE)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_manifest(staging, manifest)
    return parity


# --- one cycle -----------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    decision: str  # "promoted", "rejected" or "skipped"
    reason: str
    candidate_version: str | None
    serving_version: str | None
    candidate_metrics: dict[str, float]
    serving_metrics: dict[str, float]
    training: dict[str, Any]
    interactions: int
    users: int
    seconds: float
    timings: dict[str, float]  # seconds per step: drain, prepare, train, export, evaluate
    start: str = ""  # "parent" (warm start from the serving version's weights) or "scratch" (no weights)
    vocabulary: dict[str, int] = field(default_factory=dict)  # items, new_items, attributes, new_attributes
    ranker: dict[str, Any] = field(default_factory=dict)  # kept or dropped, and the held-out figures behind it


def evaluate_on_newest(model: Any, data: InteractionData) -> dict[str, float]:
    from model.training.evaluate import evaluate_trained

    evaluation = evaluate_trained(model, data, leave_one_out(data), "test", "full")
    return {key: round(float(value), 6) for key, value in {**evaluation.metrics, **evaluation.extra}.items()}


def serving_model(settings: Settings, registry: Registry) -> tuple[Any, Any | None]:
    """(what serves, its trained artefact or None when the rule model serves)."""
    from stream.services import load_serving_model

    version = registry.current_version()
    if version is None:
        return load_serving_model(settings), None
    model = registry.load(version, threads=settings.onnx_threads)
    return model, model


def ranker_choice(candidate: dict[str, float]) -> str:
    """"kept" when the ranker's order beats retrieval alone on the held-out window, else "dropped"
    (both before any co-visit fusion)."""
    ranked, alone = candidate[f"ranked_{HELD_OUT_METRIC}"], candidate[f"retrieval_{HELD_OUT_METRIC}"]
    return "kept" if ranked > alone else "dropped"


def heldout_tables(question: Any, data: InteractionData, parent: Any | None) -> dict[str, Any]:
    """Co-visit tables for the held-out evaluation, none holding a held-out interaction.

    ``stream``: the transitions of the window's inputs, what a worker learns from the
    same clicks (all the rule model has); ``trained``: those on top of the parent's
    table (what the parent and the candidate both bring), counting only inputs newer
    than the parent's table."""
    stream = build_table(question.histories, question.n_items)
    if parent is None or parent.transitions is None:
        return {"stream": stream, "trained": stream}
    through = float(parent.config.get("covisit", {}).get("through", float("-inf")))
    times = data.timestamps or []
    users = leave_one_out(data).users.tolist()
    fresh = [times[user][: len(history)] > through for user, history in zip(users, question.histories)]
    return {"stream": stream,
            "trained": build_table(question.histories, question.n_items, base=parent.transitions, fresh=fresh)}


def run_cycle(settings: Settings, metrics: Any | None = None, *, drain: bool = True,
              publish: bool = True) -> Decision:
    """Drain, train (from the serving version's weights, or from nothing while the rule model
    serves), evaluate and maybe promote; every outcome is logged and returned."""
    from finetune import heldout
    from finetune.candidate import (
        build_window,
        first_config,
        fresh_staging,
        retrieval_order,
        train_first,
        train_warm,
        training_action,
        write_version,
    )
    from model.serving.content import TextEncoder
    from model.serving.trained import TrainedModel
    from stream.covisit import fusion_weight
    from stream.services import exported_towers

    started = time.monotonic()
    timings: dict[str, float] = {}

    def lap(step: str, since: float) -> float:
        now = time.monotonic()
        timings[step] = round(now - since, 2)
        return now

    folder = settings.data_dir / "finetune"
    interactions = InteractionLog(folder, settings.finetune_max_interactions)
    catalogue_log = CatalogueLog(folder)
    photo_log = PhotoLog(folder, settings)
    mark = started
    if drain:
        counts = asyncio.run(drain_topics(settings, interactions, catalogue=catalogue_log, photos=photo_log))
        log.info("fine-tune: read %s", counts)
        mark = lap("drain", mark)
    rows = interactions.read()
    catalogue = catalogue_log.read()
    registry = Registry(settings.models_path)
    serving, parent = serving_model(settings, registry)
    serving_version = serving.version
    towers_dir = exported_towers(settings)
    encoder = TextEncoder.from_dir(towers_dir / "text", intra_op_threads=settings.onnx_threads)
    dataset = str(parent.manifest.get("data", {}).get("dataset", "stream")) if parent is not None else "stream"
    window = build_window(rows, catalogue, parent, encoder, dataset, photo_log.read(), serving.image_dim)
    split = window.split
    users = len(split.users)
    vocabulary = {"items": window.data.n_items, "new_items": len(window.new_items),
                  "attributes": window.data.n_attributes, "new_attributes": len(window.new_attributes),
                  "items_with_photo": int(window.has_image.sum()) if window.has_image is not None else 0}
    start = "parent" if parent is not None else "scratch"

    def finish(decision: str, reason: str, candidate: str | None = None, candidate_metrics: dict | None = None,
               serving_metrics: dict | None = None, training: dict | None = None,
               ranker: dict | None = None) -> Decision:
        outcome = Decision(decision, reason, candidate, serving_version, candidate_metrics or {},
                           serving_metrics or {}, training or {}, len(rows), users,
                           round(time.monotonic() - started, 2), timings, start, vocabulary, ranker or {})
        record_decision(folder, outcome, metrics)
        return outcome

    if users < settings.finetune_min_users:
        return finish("skipped", f"{users} users with >= 3 interactions; need {settings.finetune_min_users}")

    mark = lap("prepare", mark)
    tune = FineTuneSettings(settings.finetune_epochs, settings.finetune_minutes, settings.finetune_learning_rate)
    train_action = parent.train_action if parent is not None else training_action(window)
    if parent is not None:
        networks, training = train_warm(parent.directory, window, tune, train_action)
        config = {key: value for key, value in parent.config.items() if key not in ("tower", "retrieval")}
    else:
        networks, training, covisit_weight = train_first(window, encoder.dim, tune, train_action)
        config = first_config(towers_dir, window.fields)
        config["covisit"]["weight"] = covisit_weight
    mark = lap("train", mark)
    version = new_version(f"{dataset}-ft")
    while registry.path(version).exists():
        version = f"{version}-{os.getpid() % 1000}"
    times = [row["t"] for row in rows]
    manifest: dict[str, Any] = {
        "version": version, "parent": parent.version if parent is not None else None,
        "served_before": serving_version, "created_at": utc_now(),
        "data": {"dataset": dataset, "source": "stream", "interactions": len(rows), "users": users,
                 "items": window.data.n_items, "new_items": len(window.new_items),
                 "window": {"first_event_time": min(times), "last_event_time": max(times)},
                 "held_out": "newest interaction of each user with >= 3"},
        "finetune": {**asdict(tune), "start": start}, "metrics": {"training": training},
    }
    staging = staging_directory(settings.models_path / "staging" / version)
    fields_seen: dict[tuple[str, ...], Any] = {}

    def content(model: Any) -> dict[tuple[str, ...], Any]:
        fields = tuple(model.text_fields)
        if fields not in fields_seen:
            fields_seen[fields] = window.content(encoder, fields, catalogue, model.image_dim)
        return fields_seen

    question = heldout.Window.newest(split, window.actions, window.data.timestamps or [], window.data.n_items)
    try:
        manifest["metrics"]["onnx_parity_max_abs_diff"] = write_version(
            networks, window, staging, manifest, config, parent, train_action)
        mark = lap("export", mark)
        candidate = TrainedModel(staging, threads=settings.onnx_threads)
        tables = heldout_tables(question, window.data, parent)
        candidate_metrics = heldout.evaluate(candidate, content(candidate), question, tables["trained"],
                                             fusion_weight(settings.covisit_weight, candidate))
        blend = float(networks.ranker.blend)
        ranker = {"decision": ranker_choice(candidate_metrics), "fitted_blend": blend,
                  f"heldout_{HELD_OUT_METRIC}_ranked": candidate_metrics[f"ranked_{HELD_OUT_METRIC}"],
                  f"heldout_{HELD_OUT_METRIC}_retrieval_alone": candidate_metrics[f"retrieval_{HELD_OUT_METRIC}"]}
        if ranker["decision"] == "dropped":
            # Served in retrieval order: the correction is switched off in the exported ranker.
            retrieval_order(networks.ranker)
            fresh_staging(staging)
            manifest["metrics"]["onnx_parity_max_abs_diff"] = write_version(
                networks, window, staging, manifest, config, parent, train_action)
            candidate = TrainedModel(staging, threads=settings.onnx_threads)
            candidate_metrics = heldout.evaluate(candidate, content(candidate), question, tables["trained"],
                                                 fusion_weight(settings.covisit_weight, candidate))
        serving_metrics = heldout.evaluate(serving, content(serving), question,
                                           tables["trained" if parent is not None else "stream"],
                                           fusion_weight(settings.covisit_weight, serving))
        manifest["metrics"].update(heldout=candidate_metrics, parent_heldout=serving_metrics, ranker=ranker)
        mark = lap("evaluate", mark)
        write_manifest(staging, manifest)
        log.warning("fine-tune: ranker %s (held-out %s %.4f ranked, %.4f retrieval alone)", ranker["decision"],
                    HELD_OUT_METRIC, ranker[f"heldout_{HELD_OUT_METRIC}_ranked"],
                    ranker[f"heldout_{HELD_OUT_METRIC}_retrieval_alone"])
        better = candidate_metrics[HELD_OUT_METRIC] >= serving_metrics[HELD_OUT_METRIC] - settings.finetune_margin
        if parent is None:
            # A first model replaces the rule model only when strictly better.
            better = candidate_metrics[HELD_OUT_METRIC] > serving_metrics[HELD_OUT_METRIC]
        if not better:
            return finish("rejected", f"{HELD_OUT_METRIC} {candidate_metrics[HELD_OUT_METRIC]:.4f} < serving "
                          f"{serving_version} {serving_metrics[HELD_OUT_METRIC]:.4f}"
                          + (f" - margin {settings.finetune_margin}" if parent is not None else ""),
                          version, candidate_metrics, serving_metrics, training, ranker)
        registry.add(staging, move=True)
        registry.promote(version, details={"heldout": candidate_metrics, "parent_heldout": serving_metrics})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if publish:
        try:
            asyncio.run(asyncio.wait_for(publish_update(settings, version, registry.path(version)), 30))
        except Exception as error:  # noqa: BLE001 - promoted already; workers also check the registry at start
            log.warning("promoted %s but could not publish on model.updates: %s", version, error)
    interactions.compact()
    return finish("promoted", f"{HELD_OUT_METRIC} {candidate_metrics[HELD_OUT_METRIC]:.4f} >= serving "
                  f"{serving_version} {serving_metrics[HELD_OUT_METRIC]:.4f}"
                  + (f" - margin {settings.finetune_margin}" if parent is not None else " (first model: strictly)"),
                  version, candidate_metrics, serving_metrics, training, ranker)


def record_decision(folder: Path, decision: Decision, metrics: Any | None) -> None:
    """Log line, append-only decisions file, and gauges/counters when ``metrics`` is given."""
    entry = {"at": time.time(), **asdict(decision)}
    log.warning("fine-tune decision: %s", json.dumps(entry, sort_keys=True))
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / DECISIONS_FILE).open("a") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
    if metrics is None:
        return
    metrics.finetune_decisions.labels(decision.decision).inc()
    metrics.finetune_cycle_seconds.set(decision.seconds)
    metrics.finetune_interactions.set(decision.interactions)
    for model, values in (("candidate", decision.candidate_metrics), ("serving", decision.serving_metrics)):
        for name, value in values.items():
            metrics.finetune_heldout_metric.labels(model, name).set(value)
    if decision.decision == "promoted":
        for name, value in {**decision.training, **decision.candidate_metrics}.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):  # not the nested reports
                metrics.training_metric.labels(name).set(value)


async def publish_update(settings: Settings, version: str, path: Path) -> None:
    from core.events import ModelUpdate
    from stream import kafka

    update = ModelUpdate(version=version, path=str(path), promoted_at=time.time())
    producer = kafka.producer(settings)
    try:
        await producer.start()
        await producer.send_and_wait(settings.topic("model_updates"), update.to_bytes(), key=b"model")
    finally:
        await producer.stop()


# --- command line ----------------------------------------------------------------------
def parse_duration(text: str) -> float:
    """'90s', '30m', '1h', '1.5h' or plain seconds -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    try:
        if text and text[-1] in units:
            seconds = float(text[:-1]) * units[text[-1]]
        else:
            seconds = float(text)
    except ValueError:
        raise ConfigError(f"not a duration: {text!r} (e.g. 30m, 1h, 90s)") from None
    if seconds <= 0:
        raise ConfigError(f"duration must be positive: {text!r}")
    return seconds


def main(settings: Settings, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamrec finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", help="run forever, one cycle per DURATION (e.g. 1h, 30m)")
    parser.add_argument("--no-drain", action="store_true", help="train on the stored log only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from prometheus_client import CollectorRegistry, start_http_server

    from exporter.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    if args.every is None:
        decision = run_cycle(settings, metrics, drain=not args.no_drain)
        print(json.dumps(asdict(decision)))
        return 0
    period = parse_duration(args.every)
    start_http_server(settings.metrics_port, registry=metrics.registry)
    while True:
        began = time.monotonic()
        try:
            decision = run_cycle(settings, metrics, drain=not args.no_drain)
            print(json.dumps(asdict(decision)), flush=True)
        except Exception as error:  # noqa: BLE001 - one failed cycle (broker down, corrupt parent) must not end the loop
            log.exception("fine-tuning cycle failed")
            print(f"streamrec finetune: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        time.sleep(max(0.0, period - (time.monotonic() - began)))
