"""One exposition for the processes of a worker: every series once per process, labelled with it."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.metrics import PROCESS_LABEL, Metrics, merge_expositions


def _exposition(clicks: float, latency: float, version: str) -> str:
    metrics = Metrics(CollectorRegistry())
    metrics.events_processed.labels("clicks").inc(clicks)
    metrics.request_latency.labels("http").observe(latency)
    metrics.model_info.info({"version": version})
    return generate_latest(metrics.registry).decode()


def test_each_process_series_is_kept_and_labelled_with_its_process() -> None:
    merged = merge_expositions({1: _exposition(5, 0.2, "b"), 0: _exposition(3, 0.004, "a")}).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(merged) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("streamrec_events_processed_total", topic="clicks", **{PROCESS_LABEL: "0"}) == 3
    assert value("streamrec_events_processed_total", topic="clicks", **{PROCESS_LABEL: "1"}) == 5
    assert value("streamrec_request_latency_seconds_bucket", path="http", le="0.005", **{PROCESS_LABEL: "0"}) == 1
    assert value("streamrec_request_latency_seconds_bucket", path="http", le="0.005", **{PROCESS_LABEL: "1"}) == 0
    assert value("streamrec_model_info", version="b", **{PROCESS_LABEL: "1"}) == 1
    # A valid exposition: each family's HELP and TYPE once, whatever the number of processes.
    assert merged.count("# TYPE streamrec_request_latency_seconds histogram") == 1
    assert merged.count("# HELP streamrec_events_processed_total ") == 1


def test_one_process_merged_has_the_series_of_its_own_exposition() -> None:
    own = _exposition(2, 0.01, "a")
    merged = merge_expositions({0: own}).decode()
    names = {s.name for family in text_string_to_metric_families(own) for s in family.samples}
    assert names == {s.name for family in text_string_to_metric_families(merged) for s in family.samples}
