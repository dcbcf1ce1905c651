"""What a worker holds while it runs: store, encoders, model, metrics, trending.

Built once per worker process by ``Services.open``; agents and HTTP views get
it passed in, so there is no state in module globals.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from exporter.drift import DriftMonitor, DriftThresholds
from exporter.metrics import Metrics
from model.serving import ServingModel
from stream.errors import ConfigError, ModelLoadError
from stream.settings import Settings
from stream.store import CollectionSpec, VectorStore, open_store
from stream.item_cache import ItemCache
from stream.covisit import StreamTransitions
from stream.trending import Trending

log = logging.getLogger(__name__)


@dataclass
class Collections:
    items: str
    users: str
    queries: str


@dataclass(frozen=True)
class ServingState:
    """One model version with the collections and item cache built for it.

    Swapped as one reference (``stream.swap``): a request reads it once and so
    never mixes two versions' vectors.
    """

    model: ServingModel
    collections: Collections
    item_cache: ItemCache


@dataclass
class Services:
    settings: Settings
    store: VectorStore
    text_encoder: object  # model.content.TextEncoder
    image_encoder: object  # model.content.ImageEncoder
    metrics: Metrics
    trending: Trending
    serving: ServingState
    covisit: StreamTransitions
    started_at: float = field(default_factory=time.time)
    drift: DriftMonitor = field(default_factory=DriftMonitor)
    # Serialises writes to user and item state between agents (clicks and
    # searches both update users; catalogue and photos both update items).
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

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
        from model.content import ImageEncoder, TextEncoder

        towers_dir = prepare_towers(settings)
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
        )
        from stream.swap import serving_collections

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
        metrics.model_info.info({"version": model.version})
        metrics.model_loaded_timestamp.set(time.time())
        return cls(
            settings=settings,
            store=store,
            text_encoder=TextEncoder.from_dir(towers_dir / "text"),
            image_encoder=ImageEncoder.from_dir(towers_dir / "image"),
            metrics=metrics,
            trending=Trending(settings.trending_half_life_s),
            serving=ServingState(model, collections, new_item_cache(settings, model)),
            covisit=StreamTransitions(settings.covisit_items),
            drift=drift_monitor(settings),
        )

    def close(self) -> None:
        self.store.flush()
        self.store.close()


def collection_specs(collections: Collections, model: ServingModel) -> list[CollectionSpec]:
    """The items, users and queries collections of one model version."""
    # The retrieval space (fused items, users, queries) is scored by dot
    # product, exactly as the model computes it; content vectors by cosine.
    return [
        CollectionSpec(
            collections.items,
            {"text": model.text_dim, "image": model.image_dim, "fused": model.fused_dim},
            dot=frozenset({"fused"}),
            half=frozenset({"text", "image"}),  # content vectors; the retrieval space stays float32
        ),
        CollectionSpec(collections.users, {"user": model.fused_dim}, dot=frozenset({"user"})),
        CollectionSpec(collections.queries, {"fused": model.fused_dim}, dot=frozenset({"fused"})),
    ]


def new_item_cache(settings: Settings, model: ServingModel) -> ItemCache:
    return ItemCache(
        {"text": model.text_dim, "image": model.image_dim, "fused": model.fused_dim},
        # The in-process store has no other writer; a shared server may.
        ttl_s=float("inf") if settings.store_backend == "edge" else settings.item_cache_ttl_s,
        max_items=settings.item_cache_items,
    )


def drift_monitor(settings: Settings) -> DriftMonitor:
    thresholds = DriftThresholds(
        score_psi=settings.drift_score_psi,
        embedding_shift=settings.drift_embedding_shift,
        ctr_ratio_min=settings.drift_ctr_ratio_min,
        popularity_gini=settings.drift_popularity_gini,
    )
    return DriftMonitor(settings.drift_reference_size, settings.drift_window_size, thresholds)


def prepare_towers(settings: Settings, *, check: bool = False) -> Path:
    """Export the frozen text and image towers to ONNX once; reuse afterwards.

    Workers skip the check when both towers are exported (importing torch and
    transformers takes seconds; checksums are verified on load anyway);
    ``streamrec setup`` passes ``check=True`` to re-export when sources changed.
    """
    towers_dir = settings.models_path / "towers"
    exported = all((towers_dir / name / f"{name}_tower.json").exists() for name in ("text", "image"))
    if check or not exported:
        from model.onnx_export import build_towers

        build_towers(towers_dir, text_encoder_path=settings.text_encoder_path,
                     image_weights_path=settings.image_encoder_weights)
    return towers_dir


def check_encoders(model: ServingModel, towers_dir: Path) -> None:
    """Refuse a trained model whose content encoders are not the exported towers.

    Its item tower was trained on one encoder's text and image vectors; served
    over another encoder's vectors it would place every item wrongly without
    any error. Models that record no fingerprints (the rule model) pass.
    """
    recorded = getattr(model, "config", {}).get("encoders", {})
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
    from model.rule_model import RULE_VERSION, RuleModel, build_rule_scorer

    current = settings.models_path / "current"
    if current.exists():
        from model.trained import TrainedModel

        try:
            return TrainedModel(current.resolve(), threads=settings.onnx_threads, int8=settings.onnx_int8)
        except ModelLoadError:
            log.exception("the promoted model cannot be loaded; serving the rule model")
    rule_dir = settings.models_path / "rule"
    config = rule_dir / "config.json"
    if not config.exists() or json.loads(config.read_text()).get("version") != RULE_VERSION:
        build_rule_scorer(rule_dir)
    return RuleModel(rule_dir, threads=settings.onnx_threads)
