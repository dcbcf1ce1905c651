"""Observability: Prometheus config and alert rules, Grafana dashboards, compose and image files.

No Grafana server can run in the test environment, so dashboards are checked
two ways: statically (importable Grafana JSON naming the provisioned
datasource and only metrics the code declares), and live, by running every
panel's PromQL through a real Prometheus that scrapes a real worker under
traffic. The static checks need no broker and are not marked integration.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import BinaryIO

import pytest
import yaml
from prometheus_client import CollectorRegistry

from bench import movielens
from bench.stack import LocalStack, free_port
from core.events import ClickEvent, SearchEvent
from core.settings import Settings
from exporter.metrics import Metrics
from exporter.promql import (
    SCRAPE_SERIES,
    AlertRule,
    PanelQuery,
    alert_rules,
    dashboard_queries,
    exported_series_names,
    metric_names,
)
from tests.integration.helpers import (
    ask_http,
    ask_kafka,
    processed,
    publish,
    publish_raw,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = REPO / "infra" / "prometheus" / "prometheus.yml"
ALERTS = REPO / "infra" / "prometheus" / "alerts.yml"
GRAFANA = REPO / "infra" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
COMPOSE = REPO / "docker-compose.yml"
WORKER_JOB = "streamrec-worker"
DATASOURCE_UID = "streamrec-prometheus"
# The drift gauges a worker exports; each needs an alert rule and a panel.
DRIFT_GAUGES = frozenset({
    "streamrec_drift_score_psi", "streamrec_drift_embedding_shift",
    "streamrec_drift_ctr_ratio", "streamrec_drift_popularity_gini",
})


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (bash infra/scripts/system-deps.sh installs it)")
    return path


def _declared_series() -> set[str]:
    return exported_series_names(Metrics(CollectorRegistry()).registry) | SCRAPE_SERIES


def _all_panel_queries() -> list[PanelQuery]:
    return [query for path in DASHBOARDS for query in dashboard_queries(path)]


# --- Prometheus config and rules ---------------------------------------------

def test_promtool_accepts_the_config_and_the_rules() -> None:
    promtool = _tool("promtool")
    for args in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(ALERTS)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_config_scrapes_workers_and_the_finetuner() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs[WORKER_JOB]["dns_sd_configs"][0]["names"] == ["worker"]
    assert jobs["streamrec-finetuner"]["static_configs"][0]["targets"] == ["finetuner:9108"]
    assert config["rule_files"] == [ALERTS.name]


def test_alert_rules_name_only_declared_metrics() -> None:
    known = _declared_series()
    assert DRIFT_GAUGES <= known
    rules = alert_rules(ALERTS)
    for rule in rules:
        unknown = metric_names(rule.expr) - known
        assert not unknown, f"{rule.name} names undeclared series {unknown}"
    named = set().union(*(metric_names(rule.expr) for rule in rules))
    assert DRIFT_GAUGES <= named, "every drift gauge has an alert rule"
    assert {"StreamrecRequestLatencyP99Above10ms", "StreamrecRequestLatencyP99Above30ms"} <= {r.name for r in rules}


# Synthetic series, one minute apart, and the alerts each must (or must not) raise.
# promtool compares annotations too, so the rules are tested from a copy without them.
_RULE_SERIES = [
    # http: every request in (30, 50] ms -> p99 ~49.9 ms; kafka: in (10, 30] ms -> p99 ~29.8 ms.
    *({"series": f'streamrec_request_latency_seconds_bucket{{path="http",le="{le}"}}', "values": v}
      for le, v in (("0.01", "0x30"), ("0.03", "0x30"), ("0.05", "0+60x30"), ("+Inf", "0+60x30"))),
    *({"series": f'streamrec_request_latency_seconds_bucket{{path="kafka",le="{le}"}}', "values": v}
      for le, v in (("0.01", "0x30"), ("0.03", "0+60x30"), ("0.05", "0+60x30"), ("+Inf", "0+60x30"))),
    {"series": 'streamrec_request_latency_seconds_count{path="http"}', "values": "0+60x30"},
    {"series": 'streamrec_request_latency_seconds_count{path="kafka"}', "values": "0+60x30"},
    {"series": 'streamrec_requests_failed_total{path="http"}', "values": "0+60x30"},
    # 2 bad_json/s from clicks (alert), 0.5/s from catalog (no alert), processing errors on images.
    {"series": 'streamrec_deadletter_total{topic="events.clicks",reason="bad_json"}', "values": "0+120x30"},
    {"series": 'streamrec_deadletter_total{topic="catalog.items",reason="wrong_type"}', "values": "0+30x30"},
    {"series": 'streamrec_deadletter_total{topic="events.images",reason="processing_error"}', "values": "0+1x30"},
    # A series born at its first increment (5m) and never increasing again.
    {"series": 'streamrec_deadletter_total{topic="events.searches",reason="processing_error"}', "values": "_x5 1x25"},
    # -1 is "unknown" and must never alert; 20k is real lag.
    {"series": 'streamrec_consumer_lag_events{topic="events.clicks"}', "values": "-1x30"},
    {"series": 'streamrec_consumer_lag_events{topic="events.images"}', "values": "20000x30"},
    # Freshness: every observation in (30, 60] s.
    *({"series": f'streamrec_freshness_seconds_bucket{{le="{le}"}}', "values": v}
      for le, v in (("5", "0x30"), ("30", "0x30"), ("60", "0+10x30"), ("+Inf", "0+10x30"))),
    {"series": 'streamrec_worker_healthy{instance="w1"}', "values": "0x30"},
    {"series": 'up{job="streamrec-worker",instance="w1"}', "values": "0x30"},
    {"series": 'streamrec_model_info{instance="w1",version="v1"}', "values": "1x30"},
    {"series": 'streamrec_model_info{instance="w2",version="v2"}', "values": "1x30"},
    {"series": "streamrec_drift_score_psi", "values": "0.3x30"},
    {"series": "streamrec_drift_embedding_shift", "values": "0.5x30"},
    {"series": "streamrec_drift_ctr_ratio", "values": "0.5x30"},
    {"series": "streamrec_drift_popularity_gini", "values": "0.95x30"},
]
_EXPECTED_AT_30M = {
    "StreamrecRequestLatencyP99Above10ms": [{"path": "http"}, {"path": "kafka"}],
    "StreamrecRequestLatencyP99Above30ms": [{"path": "http"}],
    "StreamrecRequestsFailing": [{"path": "http"}],
    "StreamrecDeadLettersHigh": [{"topic": "events.clicks", "reason": "bad_json"}],
    "StreamrecProcessingErrors": [{"topic": "events.images"}],
    "StreamrecConsumerLagHigh": [{"topic": "events.images"}],
    "StreamrecFreshnessP99High": [{}],
    "StreamrecFreshnessP99Critical": [{}],
    "StreamrecWorkerUnhealthy": [{"instance": "w1"}],
    "StreamrecWorkerDown": [{"instance": "w1", "job": "streamrec-worker"}],
    "StreamrecNoWorkers": [{}],
    "StreamrecModelVersionSkew": [{}],
    "StreamrecScoreDrift": [{}],
    "StreamrecEmbeddingShift": [{}],
    "StreamrecCtrDrop": [{}],
    "StreamrecPopularityConcentration": [{}],
}


def _minutes(duration: str) -> int:
    value, unit = int(duration[:-1]), duration[-1]
    return value * {"m": 1, "h": 60}[unit]


def test_alert_rules_fire_on_synthetic_series(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    document = yaml.safe_load(ALERTS.read_text())
    rules = {rule["alert"]: rule for group in document["groups"] for rule in group["rules"]}
    for rule in rules.values():
        rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(document))

    def firing(name: str, at: str, series_labels: list[dict[str, str]]) -> dict[str, object]:
        return {"eval_time": at, "alertname": name,
                "exp_alerts": [{"exp_labels": {**rules[name]["labels"], **labels}} for labels in series_labels]}

    # One evaluation before each `for` has elapsed: nothing fires yet.
    early = [{"eval_time": f"{_minutes(rules[name]['for']) - 1}m", "alertname": name, "exp_alerts": []}
             for name in _EXPECTED_AT_30M if "for" in rules[name]]
    staleness = {  # time() starts at 0 in promtool: a model loaded at t=0 turns 6 h old at 6 h.
        "interval": "1m",
        "input_series": [{"series": 'streamrec_model_loaded_timestamp_seconds{instance="w1"}',
                          "values": "0x420"}],
        "alert_rule_test": [
            {"eval_time": "6h10m", "alertname": "StreamrecModelStale", "exp_alerts": []},
            firing("StreamrecModelStale", "6h30m", [{"instance": "w1"}]),
        ],
    }
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": _RULE_SERIES,
             "alert_rule_test": early + [firing(n, "30m", labels) for n, labels in _EXPECTED_AT_30M.items()]
             + [firing("StreamrecProcessingErrors", "10m", [{"topic": "events.images"}, {"topic": "events.searches"}])]},
            staleness,
        ],
    }
    assert set(_EXPECTED_AT_30M) | {"StreamrecModelStale"} == set(rules), "every rule has a case"
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", "rules_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ---------------------------------------------------------------

def test_dashboards_are_importable_grafana_json() -> None:
    assert [p.name for p in DASHBOARDS] == ["latency-throughput.json", "model-drift.json"]
    uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
        assert dashboard["title"] and 0 < len(dashboard["uid"]) <= 40 and dashboard["uid"] not in uids
        uids.add(dashboard["uid"])
        assert "id" not in dashboard or dashboard["id"] is None, "provisioned dashboards carry no id"
        panels = dashboard["panels"]
        assert len({p["id"] for p in panels}) == len(panels), f"{path.name}: panel ids repeat"
        cells: set[tuple[int, int]] = set()
        for panel in panels:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["w"] > 0 and grid["h"] > 0
            covered = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                       for y in range(grid["y"], grid["y"] + grid["h"])}
            assert not covered & cells, f"{path.name}: panel {panel['title']!r} overlaps another"
            cells |= covered
            if panel["type"] in ("row", "text"):
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
            assert panel["targets"], f"{panel['title']!r} has no query"
            for target in panel["targets"]:
                assert target["expr"].strip() and target["refId"]
                assert target["datasource"]["uid"] == DATASOURCE_UID
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(set(ref_ids)) == len(ref_ids)


def test_every_panel_names_only_exported_metrics() -> None:
    declared = _declared_series()
    queries = _all_panel_queries()
    assert len(queries) >= 20
    for query in queries:
        names = metric_names(query.expr)
        assert names, f"{query.panel}: no metric in {query.expr!r}"
        assert names <= declared, f"{query.dashboard}/{query.panel} names undeclared {names - declared}"
    on_panels = set().union(*(metric_names(q.expr) for q in queries))
    assert DRIFT_GAUGES <= on_panels, f"drift gauges without a panel: {DRIFT_GAUGES - on_panels}"


def test_provisioning_wires_datasource_and_dashboards_as_compose_mounts_them() -> None:
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())["providers"]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./infra/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./infra/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == provider["options"]["path"]
    assert (GRAFANA / "dashboards" / Path(home).name).exists()


# --- compose and image ---------------------------------------------------------

def test_compose_file_is_valid_and_complete() -> None:
    docker_compose = _tool("docker-compose")
    result = subprocess.run([docker_compose, "-f", str(COMPOSE), "config", "-q"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert {"kafka-1", "kafka-init", "qdrant", "worker", "finetuner", "prometheus", "grafana"} <= set(services)
    for name, service in services.items():
        if name != "kafka-init":  # a one-shot; others wait for it to complete
            assert service["healthcheck"]["test"], f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] in ("service_healthy", "service_completed_successfully")
            assert dependency in services
    worker = services["worker"]["environment"]
    assert worker["STREAMREC_EMBEDDED_BROKER"] == "false"
    assert worker["STREAMREC_STORE_BACKEND"] == "qdrant"
    assert worker["STREAMREC_QDRANT_URL"] == "http://qdrant:6333"
    assert all(host.split(":")[0] in services for host in worker["STREAMREC_BOOTSTRAP_SERVERS"].split(","))
    assert services["finetuner"]["command"][-3:] == ["finetune", "--every", "1h"]
    prometheus_mounts = [v.split(":")[0] for v in services["prometheus"]["volumes"]]
    assert "./infra/prometheus/prometheus.yml" in prometheus_mounts
    assert "./infra/prometheus/alerts.yml" in prometheus_mounts


def test_dockerfile_installs_cpu_torch_first_then_the_project_then_runs_setup() -> None:
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    text = "\n".join(lines)
    torch_at = text.index("torch==2.13.0")
    project_at = text.index("pip install -c infra/constraints.txt .")
    setup_at = text.index("RUN streamrec setup")
    assert torch_at < project_at < setup_at
    assert "download.pytorch.org/whl/cpu" in text[:project_at]
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for line in lines:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (REPO / source).exists(), f"Dockerfile copies missing {source}"
                assert source not in ignored, f".dockerignore hides {source}"


# --- live: a real Prometheus scraping a real worker under traffic ----------------

class Prometheus:
    """The Prometheus binary on a free loopback port, with its data and log in ``folder``."""

    def __init__(self, binary: str, config: dict, folder: Path) -> None:
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None
        self.log: BinaryIO | None = None

    def __enter__(self) -> "Prometheus":
        self.log = open(self.folder / "prometheus.log", "ab")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.folder / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, 60, "Prometheus ready")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log:
            self.log.close()

    def _ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, "Prometheus exited; see its log"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                return reply.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error as JSON
            with exc:
                return json.loads(exc.read())

    def query(self, expr: str) -> list[dict]:
        answer = self.api("query", query=expr)
        assert answer["status"] == "success", f"{expr!r}: {answer.get('error')}"
        return answer["data"]["result"]


def _test_prometheus_config(settings: Settings) -> dict:
    """The repository's config, with the worker job pointed at the test worker and 1 s intervals."""
    config = copy.deepcopy(yaml.safe_load(PROMETHEUS_CONFIG.read_text()))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == WORKER_JOB]
    job.pop("dns_sd_configs")
    job["static_configs"] = [{"targets": [f"{settings.http_host}:{settings.http_port}"]}]
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    config["scrape_configs"] = [job]  # the fine-tuner, Qdrant and self jobs are not running here
    return config


def _send_traffic(settings: Settings, stack: LocalStack) -> None:
    catalogue = movielens.catalog_events()[:60]
    publish(settings, catalogue)
    wait_until(lambda: processed(stack, "catalog") >= len(catalogue), 120, "catalogue applied")
    now = time.time()
    clicks = [ClickEvent(event_id=uuid.uuid4().hex, event_time=now, user_id=f"obs-user{u}",
                         item_id=catalogue[(u * 7 + i) % len(catalogue)].item_id)
              for u in range(3) for i in range(5)]
    search = SearchEvent(event_id=uuid.uuid4().hex, event_time=now, user_id="obs-user0", query="space", k=3)
    publish(settings, [*clicks, search])
    publish(settings, clicks[:2])  # a producer retry: two duplicates
    publish_raw(settings, [(settings.topic("clicks"), b"obs-user9", b'{"event_id": "x", '),
                           (settings.topic("catalog"), b"bad", b"[1, 2, 3]")])
    wait_until(lambda: processed(stack, "clicks") >= len(clicks) + 2, 60, "clicks applied")
    wait_until(lambda: stack.worker.metric("streamrec_deadletter_total") >= 2, 60, "dead letters counted")
    for user in ("obs-user0", "obs-user1", "obs-user2"):
        ask_kafka(settings, user, k=5)
        ask_http(settings, user, k=5)
    request = urllib.request.Request(
        f"http://{settings.http_host}:{settings.http_port}/recommend", data=b"{not json",
        headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as rejected:
        urllib.request.urlopen(request, timeout=5)
    rejected.value.close()
    assert rejected.value.code == 400


def _empty_panels(prometheus: Prometheus, queries: list[PanelQuery]) -> list[PanelQuery]:
    return [q for q in queries if not prometheus.query(q.expr)]


@pytest.fixture
def prometheus_binary() -> str:
    return _tool("prometheus")


@pytest.mark.integration
def test_live_worker_feeds_every_panel_rule_and_the_status_command(
    prometheus_binary: str, settings: Settings, stack: LocalStack, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queries = _all_panel_queries()
    rules: list[AlertRule] = alert_rules(ALERTS)
    with Prometheus(prometheus_binary, _test_prometheus_config(settings), tmp_path / "prometheus") as prometheus:
        wait_until(lambda: bool(prometheus.query(f'up{{job="{WORKER_JOB}"}} == 1')), 60, "worker scraped")
        _send_traffic(settings, stack)

        # Every panel of both dashboards returns series once Prometheus has scraped the traffic.
        pending = queries
        deadline = time.monotonic() + 90
        while pending and time.monotonic() < deadline:
            pending = _empty_panels(prometheus, pending)
            if pending:
                time.sleep(0.5)
        assert not pending, "panels without data: " + "; ".join(
            f"{q.dashboard}/{q.panel}: {q.expr}" for q in pending)

        # Every alert rule parses and evaluates: ad hoc, and in Prometheus's own rule manager.
        for rule in rules:
            prometheus.query(rule.expr)

        def evaluated() -> list[dict]:
            groups = prometheus.api("rules", type="alert")["data"]["groups"]
            return [r for g in groups for r in g["rules"]]

        wait_until(lambda: all(not r["lastEvaluation"].startswith("0001") for r in evaluated()),
                   60, "every alert rule evaluated")
        loaded = evaluated()
        assert sorted(r["name"] for r in loaded) == sorted(r.name for r in rules)
        assert all(r["health"] == "ok" for r in loaded), [(r["name"], r["lastError"]) for r in loaded]

        # Behaviour of the rules on this healthy worker on the embedded broker.
        by_name = {r.name: r for r in rules}
        lag = prometheus.query("streamrec_consumer_lag_events")
        assert lag and all(float(s["value"][1]) == -1 for s in lag)
        assert prometheus.query(by_name["StreamrecConsumerLagHigh"].expr) == [], "-1 lag must not alert"
        assert prometheus.query(by_name["StreamrecWorkerUnhealthy"].expr) == []
        assert prometheus.query(by_name["StreamrecWorkerDown"].expr) == []
        failed = prometheus.query('streamrec_requests_failed_total{path="http"}')
        assert failed and float(failed[0]["value"][1]) >= 1
        reasons = {s["metric"]["reason"] for s in prometheus.query("streamrec_deadletter_total")}
        assert {"bad_json", "not_object"} <= reasons

    # `streamrec status` reads the same worker.
    from exporter.status import main as status_main

    url = f"http://{settings.http_host}:{settings.http_port}/metrics"
    assert status_main(["--url", url, "--interval", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "lag" in out and "unavailable on the embedded broker" in out
    assert re.search(r"requests\s+p50 \d+\.\d ms  p99 \d+\.\d ms", out), out
    assert "bad_json" in out and "not_object" in out
    health = stack.worker.health()
    assert health is not None
    assert re.search(rf"model\s+{re.escape(str(health['model_version']))} \(loaded ", out), out
