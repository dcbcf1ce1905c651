"""``streamrec status``: a one-screen summary of a running worker, read from its /metrics.

Two scrapes a couple of seconds apart give rates (events/s, dead letters/s) and
a latency window; quantiles come from the histogram buckets exactly as
Prometheus's ``histogram_quantile`` computes them. /health adds which
dependency is failing. Exit status: 0 healthy, 1 unhealthy or unreachable,
2 bad configuration.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from core.errors import ConfigError

Labels = dict[str, str]


@dataclass(frozen=True)
class Scrape:
    """One read of a /metrics page: sample name -> [(labels, value)]."""

    taken_at: float
    samples: dict[str, list[tuple[Labels, float]]] = field(default_factory=dict)

    def values(self, name: str, **match: str) -> list[tuple[Labels, float]]:
        return [(labels, value) for labels, value in self.samples.get(name, [])
                if all(labels.get(k) == v for k, v in match.items())]

    def total(self, name: str, **match: str) -> float:
        return sum(value for _, value in self.values(name, **match))

    def by_label(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Sum of ``name`` grouped by the values of ``keys``."""
        grouped: dict[tuple[str, ...], float] = defaultdict(float)
        for labels, value in self.values(name):
            grouped[tuple(labels.get(k, "") for k in keys)] += value
        return dict(grouped)

    def has(self, name: str) -> bool:
        return bool(self.samples.get(name))


def parse_metrics(text: str, taken_at: float) -> Scrape:
    samples: dict[str, list[tuple[Labels, float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return Scrape(taken_at, dict(samples))


# --- histogram maths --------------------------------------------------------

def histogram_buckets(scrape: Scrape, name: str, **match: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of ``name``, summed over other labels, by bound."""
    counts: dict[float, float] = defaultdict(float)
    for labels, value in scrape.values(f"{name}_bucket", **match):
        counts[float(labels["le"])] += value
    return sorted(counts.items())


def bucket_delta(later: list[tuple[float, float]], earlier: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Buckets of the observations made between two scrapes (a reset restarts from zero)."""
    before = dict(earlier)
    if any(count < before.get(bound, 0.0) for bound, count in later):
        return later  # the worker restarted: its counters began again
    return [(bound, count - before.get(bound, 0.0)) for bound, count in later]


def bucket_quantile(quantile: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile over cumulative buckets; None without observations.

    Linear interpolation inside the bucket holding the rank; the first bucket
    starts at 0; a rank in the +Inf bucket returns the highest finite bound.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = quantile * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def counter_rates(first: Scrape, second: Scrape, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """Per-second increase of a counter between two scrapes, grouped by ``keys``."""
    elapsed = max(second.taken_at - first.taken_at, 1e-9)
    before = first.by_label(name, *keys)
    rates = {}
    for group, value in second.by_label(name, *keys).items():
        increase = value - before.get(group, 0.0)
        rates[group] = (value if increase < 0 else increase) / elapsed
    return rates


# --- summary ----------------------------------------------------------------

def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _window_quantiles(first: Scrape, second: Scrape, name: str) -> tuple[float | None, float | None, str]:
    """p50 and p99 over the observations between the scrapes, else since the worker started."""
    lifetime = histogram_buckets(second, name)
    window = bucket_delta(lifetime, histogram_buckets(first, name))
    if window and window[-1][1] > 0:
        count, buckets, scope = window[-1][1], window, "between scrapes"
    elif lifetime and lifetime[-1][1] > 0:
        count, buckets, scope = lifetime[-1][1], lifetime, "since start"
    else:
        return None, None, "none observed yet"
    return (bucket_quantile(0.5, buckets), bucket_quantile(0.99, buckets),
            f"{int(count)} observed {scope}")


def _health_line(health: dict[str, object] | None, second: Scrape) -> tuple[str, bool]:
    if health is not None:
        healthy = bool(health.get("healthy"))
        parts = [f"broker {'ok' if health.get('broker') else 'DOWN'}",
                 f"store {'ok' if health.get('store') else 'DOWN'}",
                 "agents ready" if health.get("ready") else "agents not assigned yet"]
        detail = str(health.get("detail") or "")
        text = ("healthy: " if healthy else "UNHEALTHY: ") + ", ".join(parts)
        if not healthy and detail:
            text += f" ({detail})"
        return text, healthy
    if second.has("streamrec_worker_healthy"):
        healthy = second.total("streamrec_worker_healthy") >= 1
        return ("healthy" if healthy else "UNHEALTHY") + " (from the gauge; /health unreachable)", healthy
    return "unknown (no /health, no streamrec_worker_healthy gauge)", False


def summarize(first: Scrape, second: Scrape, health: dict[str, object] | None) -> tuple[list[tuple[str, str]], bool]:
    """Rows of (heading, text) describing the worker, and whether it is healthy."""
    health_text, healthy = _health_line(health, second)
    rows = [("health", health_text), *_model_rows(second), *_throughput_rows(first, second),
            *_latency_rows(first, second), _lag_row(second), _dead_letter_row(first, second)]
    f50, f99, scope = _window_quantiles(first, second, "streamrec_freshness_seconds")
    rows.append(("freshness", f"p99 {_ms(f99)}  p50 {_ms(f50)}  ({scope})"))
    rows.append(_drift_row(second))
    rows.append(("window", f"{second.taken_at - first.taken_at:.1f} s between scrapes"))
    return rows, healthy


def _model_rows(second: Scrape) -> list[tuple[str, str]]:
    versions = [labels.get("version", "?") for labels, _ in second.values("streamrec_model_info")]
    model = ", ".join(versions) or "unknown"
    if second.has("streamrec_model_loaded_timestamp_seconds"):
        loaded = second.total("streamrec_model_loaded_timestamp_seconds")
        model += f" (loaded {_duration(time.time() - loaded)} ago)"
    rows = [("model", model)]
    if second.has("streamrec_catalog_items"):
        rows.append(("catalogue", f"{int(second.total('streamrec_catalog_items')):,} items"))
    return rows


def _throughput_rows(first: Scrape, second: Scrape) -> list[tuple[str, str]]:
    events = counter_rates(first, second, "streamrec_events_processed_total", "topic")
    rows = [("events/s", "  ".join(f"{t} {r:,.1f}" for (t,), r in sorted(events.items()))
             or "no events applied yet")]
    duplicates = counter_rates(first, second, "streamrec_events_duplicate_total", "topic")
    if duplicates:
        rows.append(("duplicates/s", "  ".join(f"{t} {r:,.1f}" for (t,), r in sorted(duplicates.items()))))
    return rows


def _latency_rows(first: Scrape, second: Scrape) -> list[tuple[str, str]]:
    p50, p99, scope = _window_quantiles(first, second, "streamrec_request_latency_seconds")
    per_path = counter_rates(first, second, "streamrec_request_latency_seconds_count", "path")
    paths = ", ".join(f"{p} {r:.1f}/s" for (p,), r in sorted(per_path.items()))
    rows = [("requests", f"p50 {_ms(p50)}  p99 {_ms(p99)}  ({scope}{'; ' + paths if paths else ''})")]
    for stage in ("retrieval", "scoring"):
        s50, s99, _ = _window_quantiles(first, second, f"streamrec_{stage}_latency_seconds")
        if s50 is not None:
            rows.append((f"  {stage}", f"p50 {_ms(s50)}  p99 {_ms(s99)}"))
    failed = second.by_label("streamrec_requests_failed_total", "path")
    if failed:
        rates = counter_rates(first, second, "streamrec_requests_failed_total", "path")
        rows.append(("failed", "  ".join(f"{p} {rates.get((p,), 0.0):.1f}/s ({int(n)} total)"
                                         for (p,), n in sorted(failed.items()))))
    return rows


def _lag_row(second: Scrape) -> tuple[str, str]:
    lag = second.by_label("streamrec_consumer_lag_events", "topic")
    if not lag:
        return "lag", "not reported"
    if all(value < 0 for value in lag.values()):
        return "lag", "unavailable on the embedded broker"
    return "lag", "  ".join(f"{t} {'n/a' if v < 0 else f'{int(v):,}'}" for (t,), v in sorted(lag.items()))


def _dead_letter_row(first: Scrape, second: Scrape) -> tuple[str, str]:
    letters = second.by_label("streamrec_deadletter_total", "topic", "reason")
    rates = counter_rates(first, second, "streamrec_deadletter_total", "topic", "reason")
    return "dead letters", "  ".join(
        f"{t} {r} {rates.get((t, r), 0.0):.1f}/s ({int(n)} total)"
        for (t, r), n in sorted(letters.items())) or "none"


def _drift_row(second: Scrape) -> tuple[str, str]:
    drift = [(name.removeprefix("streamrec_drift_"), labels, value)
             for name, series in sorted(second.samples.items()) if name.startswith("streamrec_drift_")
             for labels, value in series]
    text = "  ".join(f"{name}{_label_text(labels)} {value:.3g}" for name, labels, value in drift)
    return "drift", text or "no drift gauges exported"


def _label_text(labels: Labels) -> str:
    shown = {k: v for k, v in labels.items() if k not in ("instance", "job")}
    return "{" + ",".join(f"{k}={v}" for k, v in sorted(shown.items())) + "}" if shown else ""


def render(url: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(heading) for heading, _ in rows)
    lines = [f"streamrec worker {url}"]
    lines += [f"  {heading.ljust(width)}  {text}" for heading, text in rows]
    return "\n".join(lines)


# --- command ----------------------------------------------------------------

def scrape(url: str, timeout_s: float) -> Scrape:
    with urllib.request.urlopen(url, timeout=timeout_s) as reply:
        text = reply.read().decode()
    return parse_metrics(text, time.monotonic())


def fetch_health(url: str, timeout_s: float) -> dict[str, object] | None:
    """/health's JSON (its 503 body included), or None when it cannot be read."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as exc:  # a 503 still says which dependency is down
        try:
            return json.loads(exc.read())
        except ValueError:
            return None
        finally:
            exc.close()
    except (OSError, ValueError):
        return None


def default_metrics_url() -> str:
    from core.settings import load_settings

    settings = load_settings()
    # A worker listening on every interface is reached on loopback.
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::", "") else settings.http_host
    return f"http://{host}:{settings.http_port}/metrics"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamrec status", description="A one-screen summary of a running worker, from its /metrics.")
    parser.add_argument("--url", help="the worker's /metrics URL (default: from STREAMREC_HTTP_HOST/PORT)")
    parser.add_argument("--health-url", help="the worker's /health URL (default: beside --url)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between the two scrapes")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per HTTP request")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        url = args.url or default_metrics_url()
    except ConfigError as exc:
        print(f"streamrec status: configuration error: {exc}", file=sys.stderr)
        return 2
    health_url = args.health_url or url.rsplit("/metrics", 1)[0] + "/health"
    try:
        first = scrape(url, args.timeout)
        time.sleep(max(0.0, args.interval))
        second = scrape(url, args.timeout)
    except (OSError, ValueError) as exc:
        print(f"streamrec status: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    rows, healthy = summarize(first, second, fetch_health(health_url, args.timeout))
    print(render(url, rows))
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
