"""``streamrec status``: histogram maths, the summary, and the command against a real HTTP server."""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from exporter.metrics import LATENCY_BUCKETS, Metrics
from exporter.status import (
    Scrape,
    bucket_delta,
    bucket_quantile,
    counter_rates,
    histogram_buckets,
    main,
    parse_metrics,
    summarize,
)


def _scrape(registry: CollectorRegistry, at: float) -> Scrape:
    return parse_metrics(generate_latest(registry).decode(), at)


def _rows(rows: list[tuple[str, str]]) -> dict[str, str]:
    return {heading.strip(): text for heading, text in rows}


@pytest.fixture
def metrics() -> Metrics:
    metrics = Metrics(CollectorRegistry())
    metrics.model_info.info({"version": "rule-7"})
    metrics.model_loaded_timestamp.set(time.time() - 125)
    metrics.healthy.set(1)
    return metrics


# --- histogram maths ---------------------------------------------------------

def test_quantile_interpolates_inside_the_bucket_like_prometheus() -> None:
    # 100 observations: 40 in (0, 1], 60 in (1, 2].
    buckets = [(1.0, 40.0), (2.0, 100.0), (float("inf"), 100.0)]
    assert bucket_quantile(0.2, buckets) == pytest.approx(0.5)  # rank 20 of 40 in the first bucket
    assert bucket_quantile(0.7, buckets) == pytest.approx(1.5)  # rank 70: 30 of 60 into (1, 2]
    assert bucket_quantile(1.0, buckets) == pytest.approx(2.0)


def test_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    buckets = [(0.01, 10.0), (0.1, 10.0), (float("inf"), 20.0)]
    assert bucket_quantile(0.99, buckets) == 0.1


def test_quantile_without_observations_is_none() -> None:
    assert bucket_quantile(0.5, []) is None
    assert bucket_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


@given(st.lists(st.sampled_from(LATENCY_BUCKETS), min_size=1, max_size=200),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_quantile_is_monotone_and_bounded(observations: list[float], q1: float, q2: float) -> None:
    metrics = Metrics(CollectorRegistry())
    for value in observations:
        metrics.request_latency.labels("http").observe(value)
    buckets = histogram_buckets(_scrape(metrics.registry, 0.0), "streamrec_request_latency_seconds")
    low, high = sorted((q1, q2))
    v_low, v_high = bucket_quantile(low, buckets), bucket_quantile(high, buckets)
    assert v_low is not None and v_high is not None
    assert 0.0 <= v_low <= v_high <= max(observations)


def test_window_buckets_and_rates_come_from_the_difference_of_two_scrapes(metrics: Metrics) -> None:
    metrics.events_processed.labels("clicks").inc(100)
    metrics.request_latency.labels("http").observe(0.5)
    first = _scrape(metrics.registry, 10.0)
    metrics.events_processed.labels("clicks").inc(50)
    metrics.request_latency.labels("kafka").observe(0.002)
    second = _scrape(metrics.registry, 12.0)
    assert counter_rates(first, second, "streamrec_events_processed_total", "topic") == {("clicks",): 25.0}
    window = bucket_delta(histogram_buckets(second, "streamrec_request_latency_seconds"),
                          histogram_buckets(first, "streamrec_request_latency_seconds"))
    # Only the 2 ms kafka request happened in between: the 0.5 s one is gone.
    assert window[-1][1] == 1
    assert bucket_quantile(0.99, window) <= 0.002


def test_a_restarted_worker_counts_from_zero() -> None:
    earlier = [(0.01, 50.0), (float("inf"), 60.0)]
    later = [(0.01, 3.0), (float("inf"), 4.0)]
    assert bucket_delta(later, earlier) == later


# --- summary -----------------------------------------------------------------

def test_summary_reports_a_busy_worker(metrics: Metrics) -> None:
    first = _scrape(metrics.registry, 0.0)
    for _ in range(99):
        metrics.request_latency.labels("http").observe(0.0015)
    metrics.request_latency.labels("http").observe(0.2)
    metrics.retrieval_latency.observe(0.0008)
    metrics.scoring_latency.observe(0.0012)
    metrics.events_processed.labels("clicks").inc(400)
    metrics.events_duplicate.labels("clicks").inc(2)
    metrics.dead_letters.labels("events.clicks", "bad_json").inc(6)
    metrics.freshness.observe(0.03)
    metrics.items_total.set(1682)
    metrics.consumer_lag.labels("events.clicks").set(-1)
    rows, healthy = summarize(first, _scrape(metrics.registry, 2.0), None)
    summary = _rows(rows)
    assert healthy
    assert summary["model"].startswith("rule-7 (loaded 2m")
    assert summary["catalogue"] == "1,682 items"
    assert summary["events/s"] == "clicks 200.0"
    assert summary["duplicates/s"] == "clicks 1.0"
    assert summary["requests"].startswith("p50 1.5 ms  p99 ")
    assert "100 observed between scrapes; http 50.0/s" in summary["requests"]
    # One observation each: p50 is the middle of its bucket, (0.5, 1] ms and (1, 2] ms.
    assert summary["retrieval"].startswith("p50 0.8 ms") and summary["scoring"].startswith("p50 1.5 ms")
    assert summary["lag"] == "unavailable on the embedded broker"
    assert summary["dead letters"] == "events.clicks bad_json 3.0/s (6 total)"
    assert summary["freshness"].startswith("p99 49.7 ms")
    # Gauges declared but not yet computed read 0.
    assert summary["drift"] == "ctr_ratio 0  embedding_shift 0  popularity_gini 0  score_psi 0"


def test_summary_falls_back_to_lifetime_quantiles_when_idle(metrics: Metrics) -> None:
    metrics.request_latency.labels("kafka").observe(0.004)
    scrape = _scrape(metrics.registry, 0.0)
    summary = _rows(summarize(scrape, scrape, None)[0])
    assert "1 observed since start" in summary["requests"]
    assert summary["freshness"].endswith("(none observed yet)")


def test_summary_shows_real_lag_and_drift_gauges(metrics: Metrics) -> None:
    metrics.consumer_lag.labels("events.clicks").set(1200)
    metrics.consumer_lag.labels("events.images").set(-1)
    metrics.drift_score_psi.set(0.31)
    scrape = _scrape(metrics.registry, 0.0)
    summary = _rows(summarize(scrape, scrape, None)[0])
    assert summary["lag"] == "events.clicks 1,200  events.images n/a"
    assert summary["drift"].split("  ")[-1] == "score_psi 0.31"


def test_unhealthy_worker_names_the_failing_dependency(metrics: Metrics) -> None:
    metrics.healthy.set(0)
    scrape = _scrape(metrics.registry, 0.0)
    health = {"healthy": False, "broker": True, "store": False, "ready": True,
              "detail": "store: ConnectionError: refused"}
    rows, healthy = summarize(scrape, scrape, health)
    assert not healthy
    assert _rows(rows)["health"] == (
        "UNHEALTHY: broker ok, store DOWN, agents ready (store: ConnectionError: refused)"
    )


# --- the command -------------------------------------------------------------

class _Worker:
    """A real HTTP server exposing a registry on /metrics and a status on /health."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.health: dict[str, object] = {"healthy": True, "broker": True, "store": True, "ready": True}
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/metrics":
                    body, status = generate_latest(worker.metrics.registry), 200
                elif self.path == "/health":
                    body = json.dumps(worker.health).encode()
                    status = 200 if worker.health["healthy"] else 503
                else:
                    body, status = b"", 404
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/metrics"

    def __enter__(self) -> "_Worker":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def worker(metrics: Metrics) -> Iterator[_Worker]:
    metrics.events_processed.labels("catalog").inc(10)
    with _Worker(metrics) as running:
        yield running


def test_status_prints_a_summary_of_a_healthy_worker(worker: _Worker, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", worker.url, "--interval", "0.05"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"streamrec worker {worker.url}"
    assert "healthy: broker ok, store ok, agents ready" in out
    assert "rule-7" in out and "catalog 0.0" in out


def test_status_exits_1_for_an_unhealthy_worker(worker: _Worker, capsys: pytest.CaptureFixture[str]) -> None:
    worker.health = {"healthy": False, "broker": False, "store": True, "ready": False, "detail": "broker: timeout"}
    assert main(["--url", worker.url, "--interval", "0"]) == 1
    assert "UNHEALTHY: broker DOWN" in capsys.readouterr().out


def test_status_defaults_to_the_configured_port(worker: _Worker, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STREAMREC_HTTP_HOST", "0.0.0.0")
    monkeypatch.setenv("STREAMREC_HTTP_PORT", str(worker.port))
    assert main(["--interval", "0"]) == 0
    assert f"127.0.0.1:{worker.port}/metrics" in capsys.readouterr().out


def test_status_reports_an_unreachable_worker(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.stack import free_port

    url = f"http://127.0.0.1:{free_port()}/metrics"
    assert main(["--url", url, "--interval", "0", "--timeout", "1"]) == 1
    assert f"cannot read {url}" in capsys.readouterr().err


def test_status_reports_bad_configuration(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STREAMREC_HTTP_PORT", "not-a-port")
    assert main(["--interval", "0"]) == 2
    assert "STREAMREC_HTTP_PORT" in capsys.readouterr().err
