"""The dashboard and the alert rules against a real Prometheus scraping real tegrad processes.

Prometheus (Debian's ``prometheus`` package: ``prometheus`` and ``promtool``) listens on
loopback only, keeps its data in a temporary directory, scrapes every second and is stopped
in teardown. Every PromQL expression of deploy/grafana/tegrad.json and
deploy/prometheus/tegrad-rules.yml goes through its HTTP API.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from daemon.telemetry.jetson import not_jetson_reason
from tests.interop.conftest import ROOT
from tests.interop.rollout_support import (
    digits_source,
    heldout_digits,
    make_bundle,
    make_keys,
    op_state,
    push,
    start_device,
)
from tests.waiting import wait_until

DASHBOARD = ROOT / "deploy/grafana/tegrad.json"
RULES = ROOT / "deploy/prometheus/tegrad-rules.yml"
FIXTURES = ROOT / "tests/telemetry/fixtures"
# Grafana's variables as a user who picks "All" devices and the digits model would have them.
VARIABLES = {"$__rate_interval": "30s", "$__range": "10m", "$instance": ".*", "$model": "digits"}
DEVICE_ROW = "Device"
ALERTS = {"TegradDown", "TegradNotReady", "TegradHighErrorRatio", "TegradHighP99Latency", "TegradQueueNearFull",
          "TegradResourceExhausted", "TegradEngineBuildFailed", "TegradRolloutFailed", "TegradPrecisionAgreementLow",
          "TegradInputDriftHigh", "JetsonThermalThrottling", "JetsonOverCurrentThrottling", "DeviceMemoryPressure"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: these checks need a real Prometheus (apt-get install prometheus)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, binary: str, workdir: Path, targets: list[str]) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # File-based service discovery, as deploy/README.md sets up a fleet.
        (workdir / "targets.json").write_text(json.dumps([{"targets": targets, "labels": {"fleet": "test"}}]))
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{json.dumps(str(RULES))}]\n"
            "scrape_configs:\n"
            "  - job_name: tegrad\n"
            f"    file_sd_configs: [{{files: [{json.dumps(str(workdir / 'targets.json'))}]}}]\n")
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, 60, f"Prometheus ready on {self.url}")
        except BaseException:
            self.stop()
            raise

    def _log(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"Prometheus exited with {self.proc.returncode}:\n{self._log()}")
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=5).status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = urllib.request.urlopen(url, timeout=30).read()
        except urllib.error.HTTPError as exc:  # PromQL errors come back as 400/422 with a JSON body
            body = exc.read()
        return json.loads(body)

    def query(self, expr: str) -> list[dict]:
        reply = self.api("query", query=expr)
        assert reply["status"] == "success", f"{expr}\n  -> {reply.get('errorType')}: {reply.get('error')}"
        return reply["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def prometheus_binary() -> str:
    return _tool("prometheus")


def _expand(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unexpanded Grafana variable in {expr}"
    return expr


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(row, panel title, expression) for every target of every panel."""
    out, row = [], ""
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        if p["type"] == "row":
            row = p["title"]
            continue
        out.extend((row, p["title"], _expand(t["expr"])) for t in p["targets"])
    return out


def _rules(prom: Prometheus) -> list[dict]:
    return [r for g in prom.api("rules")["data"]["groups"] for r in g["rules"]]


def _alerts(prom: Prometheus) -> dict[str, str]:
    return {a["labels"]["alertname"]: a["state"] for a in prom.api("alerts")["data"]["alerts"]}


def test_promtool_accepts_the_rules_and_the_config():
    promtool = _tool("promtool")
    rules = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in rules.stdout
    config = subprocess.run([promtool, "check", "config", str(ROOT / "deploy/prometheus.yml")],
                            capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


def _load(url: str) -> None:
    """Some traffic of every kind the request panels count: batches of 1 and 4 of held-out digits (what the
    precision monitor should find in agreement and without drift), and bad requests."""
    held, _ = heldout_digits()
    with grpcclient.InferenceServerClient(url) as client:
        start = 0
        for batch in (1, 4) * 10:
            x = grpcclient.InferInput("input", [batch, 1, 8, 8], "FP32")
            x.set_data_from_numpy(held[start:start + batch])
            start += batch
            client.infer("digits", [x])
        for _ in range(3):
            bad = grpcclient.InferInput("input", [1, 1, 7, 7], "FP32")
            bad.set_data_from_numpy(np.zeros((1, 1, 7, 7), np.float32))
            with pytest.raises(Exception, match="(?i)shape|dim"):
                client.infer("digits", [bad])


def test_dashboard_and_rules_against_a_served_model(tmp_path, prometheus_binary):
    keys = make_keys(tmp_path / "keys")
    source = digits_source(tmp_path / "src", "int8")  # int8 with the live precision monitor: its panels too
    with open(source / "config.toml", "a") as f:
        f.write("\n[monitor]\nshadow_rate = 1.0\nshadow_max_cpu = 1.0\n")
    bundle = make_bundle(source, tmp_path / "digits-2.tegrad", 2, keys.signer)
    device = start_device(tmp_path / "device", keys.trust_dir)
    prom = None
    try:
        with device.admin() as admin:
            op = push(admin, bundle, activate=True)  # rollout, validation and active-version series
            assert op_state(op) == "SUCCEEDED", op.error
        _load(device.server.url)
        on_jetson = not_jetson_reason("/") is None
        log = device.server.log()
        assert log.count("Jetson telemetry every" if on_jetson else "no tegrad_jetson_* metrics:") == 1, log

        prom = Prometheus(prometheus_binary, tmp_path / "prometheus", [f"127.0.0.1:{device.server.metrics_port}"])
        wait_until(lambda: prom.query('up{job="tegrad"} == 1'), 60, "tegrad scraped")
        targets = dashboard_targets()
        required = [(row, title, expr) for row, title, expr in targets
                    if row != DEVICE_ROW]
        assert len(required) >= 35

        def empty() -> list[tuple[str, str]]:
            return [(title, expr) for _, title, expr in required if not prom.query(expr)]

        # Rates need two scrapes after the load: poll until every panel about the model has data.
        try:
            wait_until(lambda: not empty(), 90, "every model panel returns a series")
        except AssertionError:
            missing = "\n".join(f"  {t}: {e}" for t, e in empty())
            raise AssertionError(f"dashboard panels without a series:\n{missing}") from None
        for _, _, expr in targets:  # device panels: valid PromQL, empty off a Jetson
            prom.query(expr)
        assert bool(prom.query('{__name__=~"tegrad_jetson_.*"}')) == on_jetson

        # The rules: every one loaded, evaluated without error, and its expression valid through the API.
        assert {r["name"] for r in _rules(prom)} == ALERTS
        wait_until(lambda: all(not r["lastEvaluation"].startswith("0001") for r in _rules(prom)), 60, "rules evaluated")
        for rule in _rules(prom):
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            prom.query(rule["query"])
        assert _alerts(prom) == {}, "a healthy device under light load raised alerts"

        device.server.stop()
        wait_until(lambda: _alerts(prom).get("TegradDown") == "pending", 60, "TegradDown pending after tegrad stopped")
    finally:
        if device.server.proc.poll() is None:
            device.server.stop()
        if prom is not None:
            prom.stop()


def test_device_panels_against_fixture_jetsons(tmp_path, server_factory, prometheus_binary):
    """Two tegrads reading recorded Jetson trees (Orin Nano JP6, AGX Orin JP5): a fleet of two."""
    boards = ("orin-nano-jp6", "agx-orin-jp5")
    servers = [server_factory(args=("--admin-socket", "", "--telemetry-root", str(FIXTURES / b),
                                    "--telemetry-period", "0.5")) for b in boards]
    for server in servers:
        assert "Jetson telemetry every 0.5 s" in server.log()
    prom = Prometheus(prometheus_binary, tmp_path / "prometheus", [f"127.0.0.1:{s.metrics_port}" for s in servers])
    try:
        wait_until(lambda: len(prom.query('up{job="tegrad"} == 1')) == 2, 60, "both devices scraped")
        device = [(title, expr) for row, title, expr in dashboard_targets() if row == DEVICE_ROW]
        # Targets that read only NVML series are empty without a discrete GPU.
        required = [(t, e) for t, e in device if re.search(r"tegrad_jetson_", e)]
        assert len(device) > 20 and len(required) >= len(device) - 3

        def empty() -> list[tuple[str, str]]:
            return [(t, e) for t, e in required if not prom.query(e)]

        try:
            wait_until(lambda: not empty(), 90, "every Jetson panel returns a series")
        except AssertionError:
            missing = "\n".join(f"  {t}: {e}" for t, e in empty())
            raise AssertionError(f"device panels without a series:\n{missing}") from None
        for _, expr in device:
            prom.query(expr)

        boards_seen = prom.query("tegrad_jetson_info")
        assert sorted(r["metric"]["jetpack"] for r in boards_seen) == ["5.1.2", "6.2"]
        assert {r["metric"]["instance"] for r in boards_seen} == {f"127.0.0.1:{s.metrics_port}" for s in servers}
        power = {r["metric"]["instance"]: float(r["value"][1]) for r in prom.query("tegrad_jetson_power_watts")}
        assert power[f"127.0.0.1:{servers[0].metrics_port}"] == pytest.approx(5.056 * 1.728)
        modes = {r["metric"]["name"] for r in prom.query("tegrad_jetson_nvpmodel_mode")}
        assert modes == {"MAXN_SUPER", "MODE_15W"}

        wait_until(lambda: all(not r["lastEvaluation"].startswith("0001") for r in _rules(prom)), 60, "rules evaluated")
        for rule in _rules(prom):
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
        # Cool boards with plenty of memory: the device alerts stay quiet. (The Nano fixture's two
        # over-current events are old: the counter does not move, so no throttling alert.)
        assert not {"JetsonThermalThrottling", "DeviceMemoryPressure", "JetsonOverCurrentThrottling"} & set(_alerts(prom))
    finally:
        prom.stop()
