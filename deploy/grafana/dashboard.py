"""Generates deploy/grafana/tegrad.json, the dashboard users import (``python deploy/grafana/dashboard.py``).

Standard library only: panels are plain dicts in Grafana's dashboard JSON model
(schemaVersion 39, Grafana 10/11). tests/telemetry/test_dashboard.py checks that
the committed JSON equals this script's output, and tests/interop/test_prometheus.py
evaluates every expression against a real Prometheus scraping tegrad.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("tegrad.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'instance=~"$instance", model=~"$model"'   # panels about served models
D = 'instance=~"$instance"'                      # panels about the device or the whole daemon
RATE = "$__rate_interval"
RANGE = "$__range"


def q(expr: str, legend: str = "", *, instant: bool = False, fmt: str = "time_series") -> dict:
    target = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "range": not instant,
              "instant": instant, "format": fmt}
    return target


def panel(title: str, description: str, targets: list[dict], *, kind: str = "timeseries", unit: str = "short",
          w: int = 8, h: int = 8, minimum: float | None = None, maximum: float | None = None, **options) -> dict:
    defaults: dict = {"unit": unit}
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    p = {"type": kind, "title": title, "description": description, "datasource": DS,
         "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
         "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options, "gridPos": {"w": w, "h": h}}
    return p


def table(title: str, description: str, targets: list[dict], w: int = 12) -> dict:
    return panel(title, description, [dict(t, instant=True, range=False, format="table") for t in targets],
                 kind="table", w=w, showHeader=True)


def quantiles(metric: str, by: str, selector: str, window: str = RATE) -> list[dict]:
    return [q(f"histogram_quantile({p}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{window}])))",
              f"p{int(p * 100)} " + " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(",")))
            for p in (0.5, 0.95, 0.99)]


def stage_latency(p: float) -> dict:
    return panel(
        f"Stage latency p{int(p * 100)}", f"{int(p * 100)}th percentile of the time spent in each stage "
        "(queue, compute_input, infer, compute_output) per model version.",
        [q(f"histogram_quantile({p}, sum by (le, model, version, stage) "
           f'(rate(tegrad_request_duration_seconds_bucket{{{M}, stage!="total"}}[{RATE}])))',
           "{{model}} v{{version}} {{stage}}")], unit="s")


ROWS: list[tuple[str, list[dict]]] = [
    ("Requests", [
        panel("Request rate by outcome", "Requests per second by model, version and outcome "
              "(success, invalid, rejected = RESOURCE_EXHAUSTED, deadline, unavailable, error).",
              [q(f"sum by (model, version, outcome) (rate(tegrad_requests_total{{{M}}}[{RATE}]))",
                 "{{model}} v{{version}} {{outcome}}")], unit="reqps"),
        panel("Error ratio", "Share of requests that failed on the server side (error, unavailable, deadline); "
              "invalid requests are the client's and not counted.",
              [q(f'sum by (model) (rate(tegrad_requests_total{{{M}, outcome=~"error|unavailable|deadline"}}[{RATE}]))'
                 f" / sum by (model) (rate(tegrad_requests_total{{{M}}}[{RATE}]))", "{{model}}")],
              unit="percentunit", minimum=0),
        panel("Rejected (RESOURCE_EXHAUSTED) ratio", "Share of requests refused because the queue was full "
              "or the message too big: the model needs more instances, a larger max_queue_size, or less traffic.",
              [q(f'sum by (model) (rate(tegrad_requests_total{{{M}, outcome="rejected"}}[{RATE}]))'
                 f" / sum by (model) (rate(tegrad_requests_total{{{M}}}[{RATE}]))", "{{model}}")],
              unit="percentunit", minimum=0),
        panel("Queue depth", "Requests waiting in the scheduler queue (beyond max_queue_size they are rejected).",
              [q(f"sum by (model, version) (tegrad_queue_depth{{{M}}})", "{{model}} v{{version}}")], w=12),
        panel("In-flight requests", "Requests accepted and not yet answered (queued or executing).",
              [q(f"sum by (model, version) (tegrad_inflight_requests{{{M}}})", "{{model}} v{{version}}")], w=12),
    ]),
    ("Latency", [
        panel("Request latency p50 / p95 / p99", "End-to-end time in tegrad per request (stage total), per model version.",
              quantiles("tegrad_request_duration_seconds", "model, version", f'{M}, stage="total"'), unit="s"),
        stage_latency(0.5),
        stage_latency(0.95),
        stage_latency(0.99),
    ]),
    ("Batching", [
        panel("Batch size distribution", "Model executions per batch size bucket (after dynamic batching).",
              [q(f"sum by (le) (rate(tegrad_batch_size_bucket{{{M}}}[{RATE}]))", "{{le}}", fmt="heatmap")],
              kind="heatmap", calculate=False, yAxis={"axisPlacement": "left"}, cellGap=1),
        panel("Mean batch size", "Requests' samples per model execution.",
              [q(f"sum by (model, version) (rate(tegrad_batch_size_sum{{{M}}}[{RATE}])) / "
                 f"sum by (model, version) (rate(tegrad_batch_size_count{{{M}}}[{RATE}]))", "{{model}} v{{version}}")]),
        panel("Executions per second", "Model executions (batches) per second.",
              [q(f"sum by (model, version) (rate(tegrad_batch_size_count{{{M}}}[{RATE}]))", "{{model}} v{{version}}")],
              unit="ops"),
    ]),
    ("Models and engines", [
        panel("Server ready", "1 while the server is ready (gRPC health SERVING): every model it serves has a READY version.",
              [q(f"max by (instance) (tegrad_ready{{{D}}})", "{{instance}}")], kind="stat", w=24, h=4),
        table("Model versions and their state", "Current state of every model version (LOADING, READY, UNAVAILABLE, UNLOADING).",
              [q(f"max by (instance, model, version, state) (tegrad_model_state{{{M}}}) == 1")]),
        table("Engines in use", "Backend, precision, engine id and calibration cache id of each loaded version.",
              [q(f"tegrad_model_info{{{M}}}")]),
        panel("Layers by precision", "Weighted layers (Conv, Gemm, MatMul) of each loaded engine running in int8, fp16, fp32.",
              [q(f"sum by (model, version, precision) (tegrad_engine_layers{{{M}}})", "{{model}} v{{version}} {{precision}}",
                 instant=True)], kind="bargauge", displayMode="basic", orientation="horizontal"),
        panel("Engine build duration p50 / p95 / p99", "Engine builds in the time range, by backend and precision "
              "(lowering included; minutes on a Jetson for TensorRT).",
              quantiles("tegrad_engine_build_duration_seconds", "backend, precision", D, RANGE), unit="s"),
        panel("Engine builds by result", "Builds in the time range: success, failed, timeout, killed (OOM), cancelled.",
              [q(f"sum by (backend, precision, result) (increase(tegrad_engine_builds_total{{{D}}}[{RANGE}]))",
                 "{{backend}} {{precision}} {{result}}", instant=True)], kind="bargauge", displayMode="basic"),
        panel("Engine cache lookups", "Lookups in the time range: hit (no build), miss (built), corrupt (failed its hash, rebuilt).",
              [q(f"sum by (result) (increase(tegrad_engine_cache_lookups_total{{{D}}}[{RANGE}]))", "{{result}}",
                 instant=True)], kind="bargauge", displayMode="basic"),
        panel("Engine cache size and evictions", "Bytes in the engine cache, and entries evicted (least recently used first).",
              [q(f"sum by (instance) (tegrad_engine_cache_bytes{{{D}}})", "{{instance}} bytes"),
               q(f"sum by (instance) (increase(tegrad_engine_cache_evictions_total{{{D}}}[{RATE}]))", "{{instance}} evictions")],
              unit="bytes"),
    ]),
    ("Rollouts", [
        panel("Rollout operations", "Finished operations in the time range by kind (stage, activate, rollback, delete) and result.",
              [q(f"sum by (kind, result) (increase(tegrad_rollout_operations_total{{{D}}}[{RANGE}]))", "{{kind}} {{result}}",
                 instant=True)], kind="bargauge", displayMode="basic"),
        panel("Rollouts in progress", "Operations not finished, by state.",
              [q(f"sum by (state) (tegrad_rollout_operations_in_progress{{{D}}})", "{{state}}")]),
        panel("Rollout stage duration p95", "95th percentile in the time range of each rollout stage "
              "(upload, verify, extract, build, validate, activate).",
              [q(f"histogram_quantile(0.95, sum by (le, stage) (rate(tegrad_rollout_stage_duration_seconds_bucket{{{D}}}[{RANGE}])))",
                 "{{stage}}", instant=True)], kind="bargauge", unit="s", displayMode="basic"),
        panel("Active version", "The version a rollout made active (0 while the version policy chooses).",
              [q(f"max by (instance, model) (tegrad_model_active_version{{{M}}})", "{{instance}} {{model}}")],
              kind="stat", w=12),
        panel("Validation scores", "Scores of staged versions against their bundle's golden FP32 outputs.",
              [q(f"tegrad_validation_score{{{M}}}", "{{model}} v{{version}} {{metric}}", instant=True)],
              kind="bargauge", w=12, displayMode="basic"),
    ]),
    ("Live precision (precision monitor)", [
        panel("Live agreement with FP32", "Sampled requests re-run on the FP32 shadow engine: top-1 agreement, cosine, "
              "detection F1, max relative error.",
              [q(f"tegrad_precision_agreement{{{M}}}", "{{model}} v{{version}} {{metric}}")]),
        panel("Shadow comparisons", "Sampled requests per second: compared, dropped (shadow busy), failed.",
              [q(f"sum by (model, version, result) (rate(tegrad_precision_samples_total{{{M}}}[{RATE}]))",
                 "{{model}} v{{version}} {{result}}")], unit="reqps"),
        panel("Precision rollbacks", "Automatic rollbacks after a precision breach, in the time range.",
              [q(f"sum by (model) (increase(tegrad_precision_rollbacks_total{{{M}}}[{RANGE}]))", "{{model}}", instant=True)],
              kind="stat"),
        panel("Calibration saturation (worst tensor)", "Largest share of activations beyond the calibrated range.",
              [q(f"tegrad_calibration_saturation_max{{{M}}}", "{{model}} v{{version}}")], unit="percentunit"),
        panel("Most saturated tensors", "The ten tensors with the largest share of activations beyond their calibrated amax.",
              [q(f"topk(10, tegrad_calibration_saturation_ratio{{{M}}})", "{{model}} v{{version}} {{tensor}}")],
              unit="percentunit"),
        panel("Input drift", "Distance of live inputs from the calibration set's statistics.",
              [q(f"tegrad_input_drift_score{{{M}}}", "{{model}} v{{version}}")]),
    ]),
    ("Device", [
        panel("GPU load", "Busy fraction of the GPU (Jetson devfreq load; NVML on discrete GPUs).",
              [q(f"tegrad_jetson_gpu_load_ratio{{{D}}} or tegrad_gpu_load_ratio{{{D}}}", "{{instance}} {{gpu}}")],
              unit="percentunit", minimum=0, maximum=1),
        panel("GPU clock", "GPU clock now and the ceiling the governor may reach (nvpmodel and thermal caps lower it).",
              [q(f"tegrad_jetson_gpu_frequency_hertz{{{D}}} or tegrad_gpu_frequency_hertz{{{D}}}", "{{instance}} {{gpu}}"),
               q(f"tegrad_jetson_gpu_frequency_max_hertz{{{D}}} or tegrad_gpu_frequency_max_hertz{{{D}}}",
                 "{{instance}} {{gpu}} max"),
               q(f"tegrad_jetson_gpu_frequency_min_hertz{{{D}}}", "{{instance}} {{gpu}} min")], unit="hertz"),
        panel("EMC load and clock", "Memory controller activity (0-1) and clock; readable only when tegrad runs as root.",
              [q(f"tegrad_jetson_emc_load_ratio{{{D}}}", "{{instance}} load"),
               q(f"tegrad_jetson_emc_frequency_hertz{{{D}}} / on (instance) tegrad_jetson_emc_frequency_max_hertz{{{D}}}",
                 "{{instance}} clock / max")], unit="percentunit", minimum=0),
        panel("CPU clock per core", "Clock of each online CPU core, and the range cpufreq may use "
              "(min = max when jetson_clocks is on).",
              [q(f"tegrad_jetson_cpu_frequency_hertz{{{D}}}", "{{instance}} cpu{{cpu}}"),
               q(f"max by (instance) (tegrad_jetson_cpu_frequency_max_hertz{{{D}}})", "{{instance}} max"),
               q(f"min by (instance) (tegrad_jetson_cpu_frequency_min_hertz{{{D}}})", "{{instance}} min")], unit="hertz"),
        panel("CPU cores online", "Online cores (nvpmodel modes switch cores off).",
              [q(f"sum by (instance) (tegrad_jetson_cpu_online{{{D}}})", "{{instance}}"),
               q(f"count by (instance) (tegrad_jetson_cpu_online{{{D}}})", "{{instance}} present")], kind="stat"),
        panel("Memory", "RAM shared by CPU and GPU: used, available, GPU buffers (nvmap), swap used.",
              [q(f"tegrad_jetson_memory_used_bytes{{{D}}}", "{{instance}} used"),
               q(f"tegrad_jetson_memory_available_bytes{{{D}}}", "{{instance}} available"),
               q(f"tegrad_jetson_nvmap_used_bytes{{{D}}}", "{{instance}} nvmap"),
               q(f"tegrad_jetson_swap_used_bytes{{{D}}}", "{{instance}} swap used"),
               q(f"tegrad_jetson_memory_total_bytes{{{D}}}", "{{instance}} total"),
               q(f"tegrad_jetson_swap_total_bytes{{{D}}}", "{{instance}} swap total"),
               q(f"tegrad_gpu_memory_used_bytes{{{D}}}", "{{instance}} GPU {{gpu}} memory used")], unit="bytes"),
        panel("Temperatures", "Every thermal zone (powered-off engines are absent), and discrete GPUs.",
              [q(f"tegrad_jetson_temperature_celsius{{{D}}}", "{{instance}} {{zone}}"),
               q(f"tegrad_gpu_temperature_celsius{{{D}}}", "{{instance}} GPU {{gpu}}")], unit="celsius"),
        panel("Headroom to thermal throttling", "Degrees left before each zone reaches its lowest passive trip point "
              "(where clocks throttle).",
              [q(f'min by (instance, zone) (tegrad_jetson_thermal_trip_celsius{{{D}, type="passive"}}) - on (instance, zone) '
                 f"max by (instance, zone) (tegrad_jetson_temperature_celsius{{{D}}})", "{{instance}} {{zone}}")],
              unit="celsius"),
        panel("Power", "INA3221 rails and the module's input (VDD_IN, or the rails' sum on AGX Orin); discrete GPU board power.",
              [q(f"tegrad_jetson_rail_power_watts{{{D}}}", "{{instance}} {{rail}}"),
               q(f"tegrad_jetson_power_watts{{{D}}} or tegrad_gpu_power_watts{{{D}}}", "{{instance}} total {{gpu}}")],
              unit="watt"),
        table("Power rails", "Voltage and current of each INA3221 rail.",
              [q(f"tegrad_jetson_rail_voltage_volts{{{D}}}"), q(f"tegrad_jetson_rail_current_amperes{{{D}}}")]),
        panel("Fan", "Fan PWM duty (0-1) and speed (rpm, right axis).",
              [q(f"tegrad_jetson_fan_pwm_ratio{{{D}}}", "{{instance}} fan{{fan}} duty"),
               q(f"tegrad_jetson_fan_rpm{{{D}}}", "{{instance}} fan{{fan}} rpm")], unit="percentunit"),
        panel("Throttling", "Over-current events (oc1 under-voltage, oc2 average, oc3 instantaneous current) and "
              "cooling devices' state relative to their maximum.",
              [q(f"sum by (instance, event) (increase(tegrad_jetson_overcurrent_events_total{{{D}}}[{RATE}]))",
                 "{{instance}} {{event}} events"),
               q(f"tegrad_jetson_cooling_state{{{D}}} / tegrad_jetson_cooling_max_state{{{D}}}", "{{instance}} {{type}}")]),
        table("Power mode and clocks", "nvpmodel mode and whether jetson_clocks pins the clocks (1 = on).",
              [q(f"tegrad_jetson_nvpmodel_mode{{{D}}}"), q(f"tegrad_jetson_clocks_enabled{{{D}}}")]),
        table("Boards", "Board, module, SoC, L4T, JetPack, CUDA and TensorRT of each device; discrete GPUs.",
              [q(f"tegrad_jetson_info{{{D}}}"), q(f"tegrad_gpu_info{{{D}}}")]),
    ]),
]


def variables() -> list[dict]:
    def query_var(name: str, label: str, query: str) -> dict:
        return {"type": "query", "name": name, "label": label, "datasource": DS,
                "query": {"query": query, "refId": f"{name}-values"}, "definition": query, "refresh": 2,
                "multi": True, "includeAll": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"},
                "sort": 1, "options": []}

    return [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
         "current": {}, "hide": 0, "options": [], "refresh": 1},
        query_var("instance", "Device", "label_values(tegrad_model_state, instance)"),
        query_var("model", "Model", 'label_values(tegrad_model_state{instance=~"$instance"}, model)'),
    ]


def build() -> dict:
    panels: list[dict] = []
    y = 0
    next_id = 1
    for title, row_panels in ROWS:
        panels.append({"type": "row", "title": title, "id": next_id, "collapsed": False, "panels": [],
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}})
        next_id += 1
        y += 1
        x, row_h = 0, 0
        for p in row_panels:
            w, h = p["gridPos"]["w"], p["gridPos"]["h"]
            if x + w > 24:
                x, y, row_h = 0, y + row_h, 0
            panels.append(dict(p, id=next_id, gridPos={"x": x, "y": y, "w": w, "h": h}))
            next_id += 1
            x += w
            row_h = max(row_h, h)
        y += row_h
    return {
        "uid": "tegrad", "title": "tegrad", "description": "tegrad inference daemon: requests, latency, batching, "
        "engines, rollouts, live precision, and the Jetson device (deploy/README.md).",
        "tags": ["tegrad", "jetson", "inference"], "timezone": "browser", "editable": True, "graphTooltip": 1,
        "schemaVersion": 39, "version": 1, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables()}, "annotations": {"list": []}, "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
