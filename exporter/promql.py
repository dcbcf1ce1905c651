"""The PromQL an operator sees: every dashboard panel query and every alert rule.

Dashboards and alert rules are data files (``infra/grafana/dashboards/*.json``,
``infra/prometheus/alerts.yml``); this module reads the queries out of them so
tests can run each one against a real Prometheus, and names the series each
query reads so a test can check it against what ``exporter.metrics`` declares.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

# Series Prometheus itself attaches to every scrape target.
SCRAPE_SERIES = frozenset(
    {"up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added",
     "scrape_samples_post_metric_relabeling"}
)
# Sample-name suffixes per metric type, as the text exposition format writes them.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
     "unless", "offset", "inf", "nan", "atan2"}
)
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENTIFIER = re.compile(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?")


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # the dashboard's uid
    panel: str  # the panel's title
    ref_id: str
    expr: str


@dataclass(frozen=True)
class AlertRule:
    group: str
    name: str
    expr: str
    duration: str | None  # the rule's ``for``
    severity: str | None


def _panels(panels: list[dict]) -> Iterator[dict]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(path: Path) -> list[PanelQuery]:
    """The PromQL of every target of every panel of one Grafana dashboard file."""
    dashboard = json.loads(path.read_text())
    return [
        PanelQuery(dashboard["uid"], panel.get("title", ""), target.get("refId", ""), target["expr"])
        for panel in _panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def alert_rules(path: Path) -> list[AlertRule]:
    """Every alerting rule of a Prometheus rule file (recording rules are skipped)."""
    document = yaml.safe_load(path.read_text())
    return [
        AlertRule(group["name"], rule["alert"], str(rule["expr"]), rule.get("for"),
                  rule.get("labels", {}).get("severity"))
        for group in document.get("groups", [])
        for rule in group.get("rules", [])
        if "alert" in rule
    ]


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression selects (functions, keywords and labels left out).

    A small scanner, not a parser: it removes strings, label matchers, range
    and subquery brackets and ``by (...)``-style label lists, then keeps the
    identifiers that are not calls or keywords. Enough for the queries we write.
    """
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def exported_series_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the collectors of ``registry`` can expose, labelled or not."""
    names: set[str] = set()
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names
