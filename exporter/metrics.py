"""Every Prometheus metric streamrec exports, declared in one place.

``Metrics(registry)`` takes the registry to register on, so tests build a fresh
``CollectorRegistry`` and read values back with ``get_sample_value``.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Request latencies are milliseconds-scale; buckets in seconds.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)
FRESHNESS_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


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
        self.requests_failed = Counter(
            "streamrec_requests_failed_total",
            "Recommendation requests answered with an error, by path.",
            ["path"], registry=registry,
        )
