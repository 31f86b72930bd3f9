"""The Grafana dashboard and the alert rules, checked without Prometheus: the committed JSON is the
generator's output, panels are well formed and templated, and every tegrad series they name exists.
(tests/interop/test_prometheus.py evaluates the same expressions in a real Prometheus.)"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from daemon.telemetry import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/tegrad.json"
RULES = ROOT / "deploy/prometheus/tegrad-rules.yml"
# Issue 13 (the live precision monitor) defines these; the dashboard and rules use them already.
PRECISION_MONITOR_SERIES = {
    "tegrad_precision_agreement", "tegrad_precision_samples_total", "tegrad_calibration_saturation_ratio",
    "tegrad_calibration_saturation_max", "tegrad_input_drift_score", "tegrad_precision_rollbacks_total",
}


def generator():
    spec = importlib.util.spec_from_file_location("tegrad_dashboard", ROOT / "deploy/grafana/dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exported_series() -> set[str]:
    names = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}[obj._type]
            names.update(obj._name + s for s in suffixes)
    names.update(d.name + ("_total" if d.counter else "") for d in metrics.DEVICE_METRICS)
    return names


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def test_committed_dashboard_is_the_generators_output():
    assert DASHBOARD.read_text() == generator().render(), \
        "deploy/grafana/tegrad.json is stale: run python deploy/grafana/dashboard.py and commit the result"


def test_panels_are_templated_and_laid_out():
    d = json.loads(DASHBOARD.read_text())
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "instance", "model"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["h"] > 0
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["description"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert '$instance' in t["expr"], f"{p['title']}: not filtered by instance"
            if "model=" in t["expr"]:
                assert 'model=~"$model"' in t["expr"], p["title"]
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == ["Requests", "Latency", "Batching", "Models and engines", "Rollouts",
                    "Live precision (precision monitor)", "Device"]


def test_every_series_named_exists():
    known = exported_series() | PRECISION_MONITOR_SERIES
    used = set()
    for _, expr in expressions(json.loads(DASHBOARD.read_text())):
        used.update(re.findall(r"\btegrad_\w+", expr))
    used.update(re.findall(r"\btegrad_\w+", RULES.read_text()))
    assert used - known == set()
    # Every Jetson family is on the dashboard.
    device = {d.name + ("_total" if d.counter else "") for d in metrics.DEVICE_METRICS}
    assert device - used == set()


def test_every_alert_explains_itself():
    text = RULES.read_text()
    alerts = re.findall(r"- alert: (\w+)", text)
    assert len(alerts) == len(set(alerts)) == 13
    blocks = re.split(r"\n      - alert: ", text)[1:]
    for block in blocks:
        assert "summary:" in block and "description:" in block, block.splitlines()[0]
        assert "severity:" in block
