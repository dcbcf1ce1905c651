"""What a worker holds while it runs: store, encoders, model, metrics, trending, co-visits.

Built once per worker process by ``Services.open``; agents and HTTP views get
it passed in, so there is no state in module globals.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

from prometheus_client import CollectorRegistry

from core.errors import ConfigError, ModelLoadError
from core.settings import Settings
from exporter.drift import DriftMonitor, DriftThresholds
from exporter.metrics import Metrics
from model.serving.contract import ServingModel
from stream.covisit import StreamTransitions
from stream.item_cache import ItemCache
from stream.rwlock import ReadWriteLock
from stream.signals import SignalLog
from stream.store import VectorStore, open_store
from stream.trending import Trending
from stream.user_table import OwnTable
from stream.versions import (
    Collections,
    ServingState,
    collection_specs,
    new_item_cache,
    serving_collections,
)

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class Services:
    settings: Settings
    store: VectorStore
    text_encoder: object  # model.serving.content.TextEncoder
    image_encoder: object  # model.serving.content.ImageEncoder
    metrics: Metrics
    trending: Trending
    serving: ServingState
    covisit: StreamTransitions
    signals: SignalLog  # logs every change to trending and co-visits, which it restored at start-up
    started_at: float = field(default_factory=time.time)
    drift: DriftMonitor = field(default_factory=DriftMonitor)
    # Serialises writes to user and item state between agents (clicks and
    # searches both update users; catalogue and photos both update items).
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Requests read user state, trending and co-visits under its read side; a
    # click batch publishes its trending and co-visits under its write side.
    visibility: ReadWriteLock = field(default_factory=ReadWriteLock)
    # Where requests are answered (``serving_threads``; None: on the event loop).
    serving_pool: ThreadPoolExecutor | None = None
    # With N processes: the users this process applied, for the other processes to read (stream.user_table).
    user_table: OwnTable | None = None

    async def answer(self, work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a request's work on the serving threads, or on the event loop with ``serving_threads`` 0."""
        if self.serving_pool is None:
            return work(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.serving_pool, functools.partial(work, *args, **kwargs))

    @property
    def model(self) -> ServingModel:
        return self.serving.model

    @property
    def collections(self) -> Collections:
        return self.serving.collections

    @property
    def item_cache(self) -> ItemCache:
        return self.serving.item_cache

    @classmethod
    def open(cls, settings: Settings, registry: CollectorRegistry | None = None) -> "Services":
        from model.serving.content import ImageEncoder, TextEncoder

        towers_dir = exported_towers(settings)
        model = load_serving_model(settings)
        try:
            check_encoders(model, towers_dir)
        except ModelLoadError as error:
            raise ConfigError(str(error)) from error
        store = open_store(
            settings.store_backend,
            data_dir=settings.store_path,
            url=settings.qdrant_url,
            api_key=settings.qdrant_api_key,
            hnsw_ef=settings.hnsw_ef,
            quantization=settings.quantization,
        )
        # The collections a hot swap built for this version, else the plain names.
        collections = serving_collections(settings, model.version)
        for spec in collection_specs(collections, model):
            store.ensure_collection(spec)
        metrics = Metrics(registry or CollectorRegistry())
        # Labelled series exist from the start, so rate() sees the first burst.
        for label in ("catalog", "clicks", "searches", "images", "requests"):
            metrics.events_processed.labels(label)
        for path in ("http", "kafka"):
            metrics.request_latency.labels(path)
            metrics.requests_failed.labels(path)
        for answered in ("here", "passed_on"):
            metrics.peer_user_requests.labels(answered)
        for reason in ("full", "oversize", "error"):
            metrics.user_table_refused.labels(reason)
        metrics.model_info.info({"version": model.version})
        metrics.model_loaded_timestamp.set(time.time())
        trending = Trending(settings.trending_half_life_s)
        covisit = StreamTransitions(settings.covisit_items)
        visibility = ReadWriteLock()
        return cls(
            settings=settings,
            store=store,
            text_encoder=TextEncoder.from_dir(towers_dir / "text"),
            image_encoder=ImageEncoder.from_dir(towers_dir / "image"),
            metrics=metrics,
            trending=trending,
            serving=ServingState(model, collections, new_item_cache(settings, model)),
            covisit=covisit,
            signals=SignalLog.open(store, settings, trending, covisit, visibility),
            drift=drift_monitor(settings),
            visibility=visibility,
            serving_pool=ThreadPoolExecutor(settings.serving_threads, thread_name_prefix="serving")
            if settings.serving_threads else None,
        )

    def close(self) -> None:
        if self.user_table is not None:
            self.user_table.close()
        if self.serving_pool is not None:
            self.serving_pool.shutdown(wait=True)
        self.store.flush()
        self.store.close()


def drift_monitor(settings: Settings) -> DriftMonitor:
    thresholds = DriftThresholds(
        score_psi=settings.drift_score_psi,
        embedding_shift=settings.drift_embedding_shift,
        ctr_ratio_min=settings.drift_ctr_ratio_min,
        popularity_gini=settings.drift_popularity_gini,
    )
    return DriftMonitor(settings.drift_reference_size, settings.drift_window_size, thresholds)


def exported_towers(settings: Settings) -> Path:
    """The folder of the exported text and image towers; ``streamrec setup`` writes it.

    A worker never exports them itself: that needs torch and transformers, which
    the serving path does not load (``streamrec worker`` exports them first when
    they are missing).
    """
    towers_dir = settings.models_path / "towers"
    missing = [name for name in ("text", "image") if not (towers_dir / name / f"{name}_tower.json").exists()]
    if missing:
        raise ConfigError(f"the {' and '.join(missing)} tower is not exported in {towers_dir}: run `streamrec setup`")
    return towers_dir


def check_encoders(model: ServingModel, towers_dir: Path) -> None:
    """Refuse a trained model whose content encoders are not the exported towers.

    Its item tower was trained on one encoder's text and image vectors; served
    over another encoder's vectors it would place every item wrongly without
    any error. Models that record no fingerprints (the rule model) pass.
    """
    recorded = model.config.get("encoders", {})
    for kind in ("text", "image"):
        wanted = recorded.get(kind)
        if not isinstance(wanted, dict) or "source_fingerprint" not in wanted:
            continue
        sidecar_path = towers_dir / kind / f"{kind}_tower.json"
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot read {sidecar_path}: {error}; run `streamrec setup`") from error
        if sidecar.get("source_fingerprint") != wanted["source_fingerprint"]:
            variable = "STREAMREC_TEXT_ENCODER_PATH" if kind == "text" else "STREAMREC_IMAGE_ENCODER_WEIGHTS"
            raise ModelLoadError(
                f"model {model.version} was trained with the {kind} encoder {wanted.get('encoder')!r} "
                f"(fingerprint {wanted['source_fingerprint'][:12]}), but the exported {kind} tower in "
                f"{sidecar_path.parent} is {sidecar.get('encoder')!r} (fingerprint "
                f"{str(sidecar.get('source_fingerprint'))[:12]}): set {variable} to the model's encoder and "
                "run `streamrec setup`, or promote a model trained with this encoder"
            )


def load_serving_model(settings: Settings) -> ServingModel:
    """The promoted trained model if the registry has one, else the rule model."""
    from model.serving.rule_model import RULE_VERSION, RuleModel

    current = settings.models_path / "current"
    if current.exists():
        from model.serving.trained import TrainedModel

        try:
            return TrainedModel(current.resolve(), threads=settings.onnx_threads, int8=settings.onnx_int8)
        except ModelLoadError:
            log.exception("the promoted model cannot be loaded; serving the rule model")
    rule_dir = settings.models_path / "rule"
    config = rule_dir / "config.json"
    if not config.exists() or json.loads(config.read_text()).get("version") != RULE_VERSION:
        raise ConfigError(f"the rule model {RULE_VERSION} is not exported in {rule_dir}: run `streamrec setup`")
    return RuleModel(rule_dir, threads=settings.onnx_threads)
