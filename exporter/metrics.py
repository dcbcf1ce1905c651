"""Every Prometheus metric streamrec exports, declared in one place.

``Metrics(registry)`` takes the registry to register on, so tests build a fresh
``CollectorRegistry`` and read values back with ``get_sample_value``.
"""
from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from exporter.drift import DriftResults

# Request latencies are milliseconds-scale; buckets in seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)
FRESHNESS_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


PROCESS_LABEL = "worker_process"  # which process of a ``streamrec worker --processes N`` a series is from


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.request_latency = Histogram(
            "streamrec_request_latency_seconds",
            "End-to-end recommendation latency, by path (http or kafka).",
            ["path"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.retrieval_latency = Histogram(
            "streamrec_retrieval_latency_seconds",
            "Candidate retrieval from the vector store per request.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.scoring_latency = Histogram(
            "streamrec_scoring_latency_seconds",
            "One batched ONNX ranker call per request.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.events_processed = Counter(
            "streamrec_events_processed_total",
            "Events applied, by topic.", ["topic"], registry=registry,
        )
        self.events_duplicate = Counter(
            "streamrec_events_duplicate_total",
            "Events skipped because they were already applied (replays).",
            ["topic"], registry=registry,
        )
        self.dead_letters = Counter(
            "streamrec_deadletter_total",
            "Messages sent to the dead-letter topic, by source topic and reason.",
            ["topic", "reason"], registry=registry,
        )
        self.batch_size = Histogram(
            "streamrec_batch_size_events", "Events per agent batch, by topic.", ["topic"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000), registry=registry,
        )
        self.freshness = Histogram(
            "streamrec_freshness_seconds",
            "Event time to the user vector reflecting it.",
            buckets=FRESHNESS_BUCKETS, registry=registry,
        )
        self.consumer_lag = Gauge(
            "streamrec_consumer_lag_events",
            "Events behind the log end per topic (-1 when the broker's end offsets "
            "cannot be trusted, as on the embedded broker).",
            ["topic"], registry=registry,
        )
        self.items_total = Gauge(
            "streamrec_catalog_items", "Items in the vector store.", registry=registry,
        )
        self.model_info = Info(
            "streamrec_model", "The serving model version.", registry=registry,
        )
        self.model_loaded_timestamp = Gauge(
            "streamrec_model_loaded_timestamp_seconds",
            "When the serving model was loaded (unix time).", registry=registry,
        )
        self.healthy = Gauge(
            "streamrec_worker_healthy", "1 when the worker can reach broker and store.",
            registry=registry,
        )
        self.blas_threads = Gauge(
            "streamrec_blas_threads", "Threads numpy's BLAS runs with in this worker process "
            "(STREAMREC_BLAS_THREADS).", registry=registry,
        )
        # --- drift against the serving model's reference window (exporter.drift) ---
        self.drift_score_psi = Gauge(
            "streamrec_drift_score_psi", "PSI of ranking scores vs the reference window.", registry=registry,
        )
        self.drift_embedding_shift = Gauge(
            "streamrec_drift_embedding_shift", "Mean per-dimension PSI of user vectors vs the reference window.",
            registry=registry,
        )
        self.drift_ctr_ratio = Gauge(
            "streamrec_drift_ctr_ratio", "Current CTR / reference CTR of served lists.", registry=registry,
        )
        self.drift_popularity_gini = Gauge(
            "streamrec_drift_popularity_gini", "Gini coefficient of how often each item is served.",
            registry=registry,
        )
        # --- fine-tuning (finetune.job) ------------------------------------------
        self.finetune_decisions = Counter(
            "streamrec_finetune_decisions_total",
            "Fine-tuning cycles by outcome (promoted, rejected, skipped).", ["decision"], registry=registry,
        )
        self.finetune_heldout_metric = Gauge(
            "streamrec_finetune_heldout_metric",
            "Held-out metric of the last cycle, by model (candidate or serving) and metric.",
            ["model", "metric"], registry=registry,
        )
        self.training_metric = Gauge(
            "streamrec_training_metric", "Training metrics of the promoted model, by metric.",
            ["metric"], registry=registry,
        )
        self.finetune_cycle_seconds = Gauge(
            "streamrec_finetune_cycle_seconds", "Wall time of the last fine-tuning cycle.", registry=registry,
        )
        self.finetune_interactions = Gauge(
            "streamrec_finetune_interactions", "Interactions kept for fine-tuning.", registry=registry,
        )
        self.model_swaps = Counter(
            "streamrec_model_swaps_total", "Hot swaps of the serving model, by outcome (ok, refused).",
            ["outcome"], registry=registry,
        )
        self.event_loop_lag = Histogram(
            "streamrec_event_loop_lag_seconds",
            "How late the worker's event loop woke from a short sleep: time it was held by other work.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.gc_pause = Histogram(
            "streamrec_gc_pause_seconds",
            "How long each cyclic garbage collection held the process, by generation (2: a full walk).",
            ["generation"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.gc_frozen_objects = Gauge(
            "streamrec_gc_frozen_objects",
            "Objects the garbage collector no longer walks (STREAMREC_GC_FREEZE_S; stream.gc_policy).",
            registry=registry,
        )
        self.peer_user_requests = Counter(
            "streamrec_peer_user_requests_total",
            "HTTP requests for a user another worker process owns: answered here from the owner's shared "
            "user table, or passed on to the owner.",
            ["answered"], registry=registry,
        )
        self.user_table_users = Gauge(
            "streamrec_user_table_users",
            "Users this worker process keeps in its shared user table for the other processes.",
            registry=registry,
        )
        self.user_table_refused = Counter(
            "streamrec_user_table_refused_total",
            "User states not written to the shared user table (their requests are passed on), by reason: "
            "full or oversize (STREAMREC_USER_TABLE_SLOTS, STREAMREC_USER_TABLE_SLOT_BYTES), or error (the "
            "write failed and the table was emptied).",
            ["reason"], registry=registry,
        )
        self.requests_failed = Counter(
            "streamrec_requests_failed_total",
            "Recommendation requests answered with an error, by path.",
            ["path"], registry=registry,
        )

    def set_drift(self, results: DriftResults) -> None:
        """Publish one ``DriftMonitor.results()`` on the ``streamrec_drift_*`` gauges the alert rules read."""
        self.drift_score_psi.set(results.score_psi)
        self.drift_embedding_shift.set(results.embedding_shift)
        self.drift_ctr_ratio.set(results.ctr_ratio)
        self.drift_popularity_gini.set(results.popularity_gini)


class _Families:
    """Parsed metric families, in the form ``generate_latest`` collects from."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merge_expositions(texts: dict[int, str]) -> bytes:
    """One Prometheus text exposition of several processes' own, each series labelled
    ``worker_process`` with its process's index (a family's help and type once)."""
    merged: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            target.samples.extend(
                Sample(sample.name, {**sample.labels, PROCESS_LABEL: str(index)}, sample.value,
                       sample.timestamp, sample.exemplar)
                for sample in family.samples
            )
    return generate_latest(_Families(list(merged.values())))  # type: ignore[arg-type]
