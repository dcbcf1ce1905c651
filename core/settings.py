"""The one settings object of a streamrec deployable.

Every value comes from the environment with the ``STREAMREC_`` prefix (or a
``.env`` file), is validated when the process starts, and a bad value stops the
process with a message that names the variable and says what to fix.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError

TOPIC_KEYS = (
    "clicks",
    "searches",
    "images",
    "catalog",
    "requests",
    "responses",
    "deadletter",
    "model_updates",
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_", env_file=".env", extra="ignore", frozen=True
    )

    # --- broker -----------------------------------------------------------
    bootstrap_servers: str = Field(
        "127.0.0.1:9092",
        description="Kafka bootstrap servers, comma separated host:port. "
        "With embedded_broker=true this is where `streamrec broker` listens.",
    )
    embedded_broker: bool = Field(
        True, description="Use the embedded tansu broker (in-memory); false for Apache Kafka."
    )
    topic_prefix: str = Field("", description="Prefix for every topic name (isolation).")
    partitions: int = Field(4, ge=1, le=1024)
    replication_factor: int = Field(
        1, ge=1, le=16, description="Replicas per topic (3 on a production Kafka cluster)."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: Path | None = None

    # Consumer-group timings. The embedded broker makes a joining member wait
    # about session_timeout/2, so short values keep starts and restarts quick.
    session_timeout_s: float = Field(6.0, gt=0)
    heartbeat_interval_s: float = Field(2.0, gt=0)
    rebalance_timeout_s: float = Field(10.0, gt=0)

    # The embedded broker answers a fetch when its wait runs out, not when data
    # arrives, so these waits are latency, and every idle fetch costs CPU in the
    # worker and the broker (docs/performance.md, fetch waits). Apache Kafka
    # answers as soon as data arrives: there, raise all three to a few hundred ms.
    fetch_max_wait_ms: int = Field(
        5, ge=1, le=10_000,
        description="Longest wait of a fetch with no data on rec.requests (request latency).",
    )
    ingest_fetch_max_wait_ms: int = Field(
        10, ge=1, le=10_000,
        description="Longest wait of a fetch with no data on events.clicks: adds up to this much to freshness.",
    )
    catalog_fetch_max_wait_ms: int = Field(
        50, ge=1, le=10_000,
        description="Longest wait of a fetch with no data on catalog.items, events.images and events.searches "
                    "(one consumer): adds up to this much before a new item, a photo or a search is applied. "
                    "Each wait is a fetch of every partition of the three topics, the embedded broker's "
                    "costliest: at 10 ms the broker took 0.34-0.38 of a core beside 2 idle-but-for-HTTP "
                    "worker processes, at 50 ms 0.24 (docs/performance.md, \"Idle fetches of the catalogue\").",
    )

    app_id: str = Field("streamrec", min_length=1, description="Consumer group / app id.")

    # --- worker -----------------------------------------------------------
    batch_size: int = Field(500, ge=1, le=100_000, description="Events per agent batch.")
    batch_within_s: float = Field(0.005, gt=0, le=10, description="Max wait to fill a batch.")
    user_sequence_length: int = Field(50, ge=1, le=1000)
    dedup_window: int = Field(256, ge=0, description="Recent event ids kept per user.")
    max_event_bytes: int = Field(1_048_576, ge=256, description="Bigger events are dead-lettered.")
    max_image_bytes: int = Field(8_388_608, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    image_root: Path | None = Field(
        None, description="Only file:// image URIs under this folder may be read."
    )
    image_allow_http: bool = Field(False, description="Allow http(s) image URIs.")
    trending_half_life_s: float = Field(3600.0, gt=0)

    # --- store ------------------------------------------------------------
    data_dir: Path = Field(Path(".streamrec"), description="Local state: vector store, models.")
    store_backend: Literal["edge", "qdrant"] = "edge"
    qdrant_url: str | None = None
    qdrant_api_key: str | None = None
    hnsw_ef: int = Field(256, ge=8, le=4096)
    quantization: Literal["auto", "int8", "none"] = Field(
        "auto", description="int8: the items' retrieval vectors also get an int8 copy in RAM that the "
        "ANN search walks, rescoring its best with the stored floats (twice as fast at 100k x 384-d, same "
        "recall; docs/performance.md); none: search the floats; auto: the copy for a retrieval space of "
        "256 dimensions or more (the rule model's 384), the floats below (a trained model's 64 or 128: "
        "there the copy lost recall@100, 0.79-0.84 against 1.00 at 300k items). "
        "Applies to collections created from now "
        "on: an existing one keeps how it was built until it is rebuilt (a model swap builds new "
        "collections; or a fresh store loaded with load-catalogue).",
    )
    collection_prefix: str = ""
    replica: int | None = Field(
        None, ge=0, description="This worker's number among the workers of one app that share a Qdrant "
        "server (docs/scaling.md): its trending/co-visit log is its own and its lessons are shared; unset "
        "for a single worker.",
    )
    item_cache_ttl_s: float = Field(
        30.0, gt=0, description="With a shared Qdrant server: how long cached item vectors are trusted."
    )
    item_cache_items: int = Field(
        1_000_000, ge=1024,
        description="Items whose vectors a worker keeps in memory (about 1.5 KB each per 384-d vector it "
                    "has); the least recently used are evicted beyond it.",
    )

    # --- models -----------------------------------------------------------
    model_dir: Path | None = Field(
        None, description="Model registry folder; default <data_dir>/models."
    )
    text_encoder_path: Path | None = Field(
        None, description="Local Hugging Face encoder folder; default all-MiniLM-L6-v2."
    )
    image_encoder_weights: Path | None = Field(
        None, description="EfficientNet-Lite0 state dict for the image tower; default the packaged ImageNet weights."
    )
    onnx_threads: int = Field(1, ge=1, le=256)
    blas_threads: int = Field(
        1, ge=1, le=256, description="Threads of numpy's BLAS in a worker process. A request multiplies "
        "a few hundred candidate rows at a time, where a second thread gains nothing, and an idle BLAS "
        "thread spins on a core: with its default of one per core, two worker processes on 2 cores "
        "answered 100-104 requests/s instead of 304 (docs/performance.md, \"BLAS threads\").",
    )
    onnx_int8: bool = Field(
        False, description="Serve a trained model's int8 copies (*.int8.onnx) where the artefact has them."
    )

    # --- serving ----------------------------------------------------------
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    http_max_body_bytes: int = Field(
        4_194_304, ge=1024, description="Largest accepted HTTP body (inline photos for visual search)."
    )
    metrics_port: int = Field(
        9108, ge=0, le=65535, description="/metrics of jobs without the HTTP endpoint (fine-tuner)."
    )
    serving_threads: int = Field(
        0, ge=0, le=64,
        description="Threads of a worker process that answer recommendation requests; 0: on the event loop "
                    "itself. A request holds the GIL for most of its time (the engine's search does), so "
                    "threads add hand-offs and contention, not speed (docs/performance.md, serving threads).",
    )
    loop_stall_dump_ms: int = Field(
        0, ge=0, le=600_000,
        description="When the worker's event loop is held this long, write every thread's stack to stderr "
                    "(what held it; 0: off). streamrec_event_loop_lag_seconds is measured either way.",
    )
    gc_freeze_s: float = Field(
        10.0, ge=0.0, le=86_400.0,
        description="Every this many seconds a worker process freezes the objects that survived since the "
                    "last time, so the garbage collector's walks (which hold the event loop) skip them; "
                    "0: the interpreter's own policy, whose full walks over a worker took 59 ms on average "
                    "and up to 140 ms (docs/performance.md, \"Garbage collector pauses\").",
    )
    gc_full_s: float = Field(
        3600.0, ge=0.0, le=604_800.0,
        description="Every this many seconds, one full collection over everything, frozen objects too: a "
                    "reference cycle among frozen objects is freed only then (0: never).",
    )
    user_table_slots: int = Field(
        65_536, ge=0, le=16_777_216,
        description="With --processes N, users each process keeps in a table in shared memory (/dev/shm) that "
                    "the other processes read, so a request is answered where it lands instead of being passed "
                    "to the user's owner (at most 3/4 of the slots are used; beyond, users are passed on). "
                    "0: every request for another process's user is passed on.",
    )
    user_table_slot_bytes: int = Field(
        4096, ge=256, le=1_048_576,
        description="Bytes of one user in the shared user table: its sequence of item ids, its vector and a "
                    "few fields. A user who needs more is passed on to its owner.",
    )
    candidates: int = Field(
        200, ge=1, le=10_000,
        description="Items the ANN search retrieves per request. The engine searches with "
                    "max(hnsw_ef, candidates), so an hnsw_ef below this changes nothing "
                    "(docs/performance.md, candidate sizing).",
    )
    default_k: int = Field(10, ge=1, le=1000)
    max_k: int = Field(100, ge=1, le=10_000)
    diversity: float = Field(
        0.8, ge=0.0, le=1.0, description="MMR trade-off: 1.0 = relevance only."
    )
    covisit_weight: float | None = Field(
        None, ge=0.0, le=100.0,
        description="Weight of the co-visit ranking in the fused order; unset: the served model's "
                    "(chosen in training); 0 turns co-visits off.",
    )
    covisit_items: int = Field(
        200_000, ge=1024,
        description="Items whose stream-learnt successors a worker keeps (at most 200 each); the least "
                    "recently updated are forgotten beyond it.",
    )
    signals_snapshot_every: int = Field(
        1000, ge=1, le=1_000_000,
        description="Entries of the signal log (one per click batch that teaches trending or co-visits, "
                    "catalogue deletion or co-visit reset) between two snapshots of trending and co-visits; "
                    "a restart replays at most this many after the last snapshot.",
    )

    # --- fine-tuning and drift (docs/finetuning.md) --------------------------
    finetune_epochs: int = Field(3, ge=1, le=1000, description="Most passes over the recent data per cycle.")
    finetune_minutes: float = Field(0.5, gt=0, description="Training time budget of one cycle.")
    finetune_learning_rate: float = Field(3e-4, gt=0, le=1.0)
    finetune_margin: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Promote when candidate NDCG@10 >= serving NDCG@10 - margin on the held-out window.",
    )
    finetune_max_interactions: int = Field(
        1_000_000, ge=1000, description="Interactions kept between cycles (oldest dropped)."
    )
    finetune_min_users: int = Field(20, ge=1, description="Fewer evaluable users: the cycle is skipped.")
    drift_reference_size: int = Field(5000, ge=10, description="Scores in a model's reference window.")
    drift_window_size: int = Field(5000, ge=10, description="Scores in the current drift window.")
    drift_score_psi: float = Field(0.25, gt=0, description="Alert above this score PSI.")
    drift_embedding_shift: float = Field(0.2, gt=0, description="Alert above this user-vector shift.")
    drift_ctr_ratio_min: float = Field(0.8, gt=0, description="Alert below this CTR ratio.")
    drift_popularity_gini: float = Field(0.9, gt=0, le=1.0, description="Alert above this Gini.")

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        hosts = [h.strip() for h in value.removeprefix("kafka://").split(",") if h.strip()]
        if not hosts:
            raise ValueError("give at least one host:port, e.g. 127.0.0.1:9092")
        for host in hosts:
            name, _, port = host.rpartition(":")
            if not name or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{host!r} is not host:port (e.g. kafka:9092)")
        return ",".join(hosts)

    @field_validator("topic_prefix", "collection_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        if not set(value) <= allowed:
            raise ValueError("use only letters, digits, '.', '_' and '-'")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> "Settings":
        if self.store_backend == "qdrant" and not self.qdrant_url:
            raise ValueError(
                "STREAMREC_STORE_BACKEND=qdrant needs STREAMREC_QDRANT_URL "
                "(e.g. http://qdrant:6333)"
            )
        if self.heartbeat_interval_s >= self.session_timeout_s:
            raise ValueError(
                "STREAMREC_HEARTBEAT_INTERVAL_S must be below STREAMREC_SESSION_TIMEOUT_S"
            )
        if self.sasl_mechanism and not (self.sasl_username and self.sasl_password):
            raise ValueError(
                "STREAMREC_SASL_MECHANISM needs STREAMREC_SASL_USERNAME and "
                "STREAMREC_SASL_PASSWORD"
            )
        if self.default_k > self.max_k:
            raise ValueError("STREAMREC_DEFAULT_K must not exceed STREAMREC_MAX_K")
        return self

    # --- derived ------------------------------------------------------------
    def topic(self, key: str) -> str:
        """Full topic name for a logical topic key (see ``TOPIC_KEYS``)."""
        names = {
            "clicks": "events.clicks",
            "searches": "events.searches",
            "images": "events.images",
            "catalog": "catalog.items",
            "requests": "rec.requests",
            "responses": "rec.responses",
            "deadletter": "events.deadletter",
            "model_updates": "model.updates",
        }
        return self.topic_prefix + names[key]

    @cached_property
    def bootstrap_list(self) -> list[str]:
        return self.bootstrap_servers.split(",")

    @property
    def models_path(self) -> Path:
        return self.model_dir or self.data_dir / "models"

    @property
    def store_path(self) -> Path:
        return self.data_dir / "store"

    def kafka_client_options(self) -> dict[str, object]:
        """Security options passed through to every aiokafka client."""
        options: dict[str, object] = {"security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            options.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.security_protocol in ("SSL", "SASL_SSL"):
            import ssl

            context = ssl.create_default_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None
            )
            options["ssl_context"] = context
        return options


SECRET_FIELDS = frozenset({"sasl_password", "qdrant_api_key"})


def load_settings(**overrides: object) -> Settings:
    """Read and validate settings; a bad value raises ``ConfigError`` naming it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            if error["loc"]:
                field = ".".join(str(part) for part in error["loc"])
                shown = "***" if field in SECRET_FIELDS else repr(error.get("input"))
                lines.append(f"  STREAMREC_{field.upper()}: {error['msg']} (got {shown})")
            else:
                # A rule across fields: its message names the variables; the
                # input (every setting, secrets included) is left out.
                lines.append(f"  {error['msg'].removeprefix('Value error, ')}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
