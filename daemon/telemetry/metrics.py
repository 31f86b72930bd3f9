"""Every Prometheus metric tegrad exports is defined here, and nowhere else.

Names follow Prometheus conventions: ``tegrad_`` prefix, base units (seconds),
``_total`` on counters (added by prometheus-client). Labels are bounded: model,
version, and small fixed sets (stage, outcome, state).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# The *_created series double the exposition size and no dashboard uses them.
disable_created_metrics()

# Latencies on a Jetson span tens of microseconds (tiny models) to seconds (queues under load).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("queue", "compute_input", "infer", "compute_output", "total")
OUTCOMES = ("success", "invalid", "rejected", "deadline", "unavailable", "error")
STATES = ("LOADING", "READY", "UNAVAILABLE", "UNLOADING")

REQUESTS = Counter(
    "tegrad_requests",
    "Inference requests by model, version and outcome.",
    ["model", "version", "outcome"],
)
# Refused before the request was parsed, from its model name and the daemon's limits.
ADMISSION_REASONS = ("queue_full", "unloading", "inflight_bytes")
ADMISSION_REJECTIONS = Counter(
    "tegrad_admission_rejections",
    "Inference requests refused from their first bytes, before the full parse: by model, version and reason "
    "(queue_full, unloading, inflight_bytes). Also counted in tegrad_requests_total.",
    ["model", "version", "reason"],
)
REQUEST_DURATION = Histogram(
    "tegrad_request_duration_seconds",
    "Time spent per request in each stage (queue, compute_input, infer, compute_output) and in total.",
    ["model", "version", "stage"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "tegrad_batch_size",
    "Batch size of each model execution (after dynamic batching).",
    ["model", "version"],
    buckets=BATCH_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "tegrad_queue_depth",
    "Requests waiting in the model's scheduler queue.",
    ["model", "version"],
)
INFLIGHT = Gauge(
    "tegrad_inflight_requests",
    "Requests accepted and not yet answered (queued or executing).",
    ["model", "version"],
)
READY = Gauge(
    "tegrad_ready",
    "1 while the server is ready (gRPC health SERVING): started, not draining, every model it serves has a "
    "READY version.",
)
MODEL_STATE = Gauge(
    "tegrad_model_state",
    "1 for the state a model version is in, 0 for the others.",
    ["model", "version", "state"],
)
MODEL_INFO = Gauge(
    "tegrad_model_info",
    "Always 1 for each loaded model version; labels carry backend, precision, engine id and calibration cache id.",
    ["model", "version", "backend", "precision", "engine_id", "calibration_cache_id"],
)
ENGINE_LAYERS = Gauge(
    "tegrad_engine_layers",
    "Layers of a loaded engine by the precision and device they run in: for TensorRT every layer of the "
    "built engine (its inspector), for ONNX Runtime the weighted layers (Conv, ConvTranspose, Gemm, MatMul).",
    ["model", "version", "precision", "device"],
)

# Engine builds take from a second (ONNX Runtime, small models) to tens of minutes (TensorRT on a Nano).
BUILD_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)
BUILD_RESULTS = ("success", "failed", "timeout", "killed", "cancelled")
ENGINE_BUILD_DURATION = Histogram(
    "tegrad_engine_build_duration_seconds",
    "Wall time of engine builds in the build worker (lowering included), by backend and precision.",
    ["backend", "precision"],
    buckets=BUILD_BUCKETS,
)
ENGINE_BUILDS = Counter(
    "tegrad_engine_builds",
    "Engine builds by backend, precision and result (success, failed, timeout, killed, cancelled, no_space).",
    ["backend", "precision", "result"],
)
ENGINE_CACHE_LOOKUPS = Counter(
    "tegrad_engine_cache_lookups",
    "Engine cache lookups by result: hit, miss, or corrupt (an entry that failed its hash check and was deleted).",
    ["result"],
)
ENGINE_CACHE_BYTES = Gauge(
    "tegrad_engine_cache_bytes",
    "Bytes held by the engine cache directory.",
)
ENGINE_CACHE_EVICTIONS = Counter(
    "tegrad_engine_cache_evictions",
    "Engine cache entries removed to stay under the size limit (least recently used first).",
)

# Rollouts: bundles staged on the device, activated and rolled back.
ROLLOUT_STAGES = ("upload", "verify", "extract", "build", "validate", "activate")
ROLLOUT_OPERATIONS = Counter(
    "tegrad_rollout_operations",
    "Finished rollout operations by kind (stage, activate, rollback, delete) and result (succeeded, failed).",
    ["kind", "result"],
)
ROLLOUT_ACTIVE_OPERATIONS = Gauge(
    "tegrad_rollout_operations_in_progress",
    "Rollout operations not finished, by state (QUEUED, VERIFYING, BUILDING, VALIDATING, ACTIVATING).",
    ["state"],
)
ROLLOUT_STAGE_DURATION = Histogram(
    "tegrad_rollout_stage_duration_seconds",
    "Time spent in each stage of a rollout: upload, verify, extract, build, validate, activate.",
    ["stage"],
    buckets=BUILD_BUCKETS,
)
VALIDATION_SCORE = Gauge(
    "tegrad_validation_score",
    "Last validation score of a staged version against its bundle's golden FP32 outputs "
    "(top1_agreement, cosine, f1, max_rel_error).",
    ["model", "version", "metric"],
)
ACTIVE_VERSION = Gauge(
    "tegrad_model_active_version",
    "The version a rollout made active (0 while the version policy chooses); tegrad_model_info has its engine.",
    ["model"],
)

SHARED_MEMORY_REGIONS = Gauge(
    "tegrad_shared_memory_regions",
    "System shared-memory regions registered by clients (Triton's shared-memory extension).",
)
SHARED_MEMORY_BYTES = Gauge(
    "tegrad_shared_memory_bytes",
    "Total byte size of the registered system shared-memory regions.",
)


# Client images: decoded bytes in flight (tegrad serve --max-decode-bytes) and files decoded despite corrupt data.
DECODE_BUDGET_IN_USE = Gauge(
    "tegrad_decode_budget_bytes_in_use",
    "Bytes of the daemon's decode budget held by images being decoded, queued or preprocessed.",
)
IMAGES_CORRUPT = Counter(
    "tegrad_images_corrupt",
    "Images accepted although the decoder recovered from corrupt data (e.g. a truncated JPEG whose missing "
    "rows came back grey), by model.",
    ["model"],
)



# Device telemetry: Jetson (sysfs/procfs, daemon/telemetry/jetson.py) and discrete GPUs (NVML,
# daemon/telemetry/nvml.py). Their label sets change with the hardware (zones, rails, cores), so the
# collector thread publishes whole snapshots of readings and DEVICE renders the latest at scrape time.
@dataclass(frozen=True)
class DeviceMetric:
    name: str
    help: str
    labels: tuple[str, ...] = ()
    counter: bool = False  # exposed with the _total suffix


JETSON_INFO = DeviceMetric(
    "tegrad_jetson_info", "Always 1; labels name the board (device-tree model, module, SoC) and its software "
    "(L4T release, JetPack, CUDA, TensorRT; empty where unknown).",
    # "board", not "model": model is the served model's label on every other tegrad series.
    ("board", "module", "soc", "l4t", "jetpack", "cuda", "tensorrt"))
JETSON_GPU_LOAD = DeviceMetric("tegrad_jetson_gpu_load_ratio", "GPU busy fraction (0-1) from the devfreq device's load.", ("gpu",))
JETSON_GPU_FREQ = DeviceMetric("tegrad_jetson_gpu_frequency_hertz", "GPU clock now.", ("gpu",))
JETSON_GPU_FREQ_MIN = DeviceMetric("tegrad_jetson_gpu_frequency_min_hertz", "Lowest GPU clock the governor may pick.", ("gpu",))
JETSON_GPU_FREQ_MAX = DeviceMetric(
    "tegrad_jetson_gpu_frequency_max_hertz", "Highest GPU clock the governor may pick (lowered by nvpmodel and thermal caps).", ("gpu",))
JETSON_EMC_FREQ = DeviceMetric("tegrad_jetson_emc_frequency_hertz", "External memory controller clock now (debugfs; needs root).")
JETSON_EMC_FREQ_MAX = DeviceMetric(
    "tegrad_jetson_emc_frequency_max_hertz", "Highest EMC clock allowed, with the nvpmodel EMC cap applied (debugfs; needs root).")
JETSON_EMC_LOAD = DeviceMetric(
    "tegrad_jetson_emc_load_ratio", "Memory controller activity relative to its clock (0-1, jtop's scale; needs root).")
JETSON_CPU_ONLINE = DeviceMetric("tegrad_jetson_cpu_online", "1 when the CPU core is online, 0 when it is off.", ("cpu",))
JETSON_CPU_FREQ = DeviceMetric("tegrad_jetson_cpu_frequency_hertz", "CPU core clock now (online cores only).", ("cpu",))
JETSON_CPU_FREQ_MIN = DeviceMetric("tegrad_jetson_cpu_frequency_min_hertz", "Lowest clock cpufreq may pick for the core.", ("cpu",))
JETSON_CPU_FREQ_MAX = DeviceMetric("tegrad_jetson_cpu_frequency_max_hertz", "Highest clock cpufreq may pick for the core.", ("cpu",))
JETSON_MEM_TOTAL = DeviceMetric("tegrad_jetson_memory_total_bytes", "RAM shared by CPU and GPU.")
JETSON_MEM_USED = DeviceMetric(
    "tegrad_jetson_memory_used_bytes", "RAM used (total - free - buffers - cached, as jtop counts it).")
JETSON_MEM_AVAILABLE = DeviceMetric(
    "tegrad_jetson_memory_available_bytes", "RAM the kernel estimates is available without swapping (MemAvailable).")
JETSON_SWAP_TOTAL = DeviceMetric("tegrad_jetson_swap_total_bytes", "Swap space (zram and files).")
JETSON_SWAP_USED = DeviceMetric("tegrad_jetson_swap_used_bytes", "Swap space in use.")
JETSON_NVMAP_USED = DeviceMetric(
    "tegrad_jetson_nvmap_used_bytes", "RAM held by GPU/engine buffers through nvmap (NvMapMemUsed; not on every release).")
JETSON_TEMPERATURE = DeviceMetric(
    "tegrad_jetson_temperature_celsius", "Thermal zone temperature; zones that read -256 (powered off) or fail are absent.", ("zone",))
JETSON_TRIP = DeviceMetric(
    "tegrad_jetson_thermal_trip_celsius", "Thermal zone trip points: passive = clocks throttle, critical/hot = shutdown.",
    ("zone", "trip", "type"))
JETSON_COOLING_STATE = DeviceMetric(
    "tegrad_jetson_cooling_state", "Current state of a cooling device (fan step or throttle level; 0 = idle).", ("device", "type"))
JETSON_COOLING_MAX_STATE = DeviceMetric("tegrad_jetson_cooling_max_state", "Highest state of a cooling device.", ("device", "type"))
JETSON_OVERCURRENT = DeviceMetric(
    "tegrad_jetson_overcurrent_events", "Over-current throttling events since boot (soctherm_oc: oc1 under-voltage, "
    "oc2 average current, oc3 instantaneous current).", ("event",), counter=True)
JETSON_RAIL_VOLTAGE = DeviceMetric("tegrad_jetson_rail_voltage_volts", "INA3221 power rail bus voltage.", ("rail",))
JETSON_RAIL_CURRENT = DeviceMetric("tegrad_jetson_rail_current_amperes", "INA3221 power rail current.", ("rail",))
JETSON_RAIL_POWER = DeviceMetric("tegrad_jetson_rail_power_watts", "INA3221 power rail power (voltage x current).", ("rail",))
JETSON_POWER = DeviceMetric(
    "tegrad_jetson_power_watts", "Module input power: VDD_IN where the module measures it (Orin Nano/NX), "
    "else the sum of the measured rails (AGX Orin).")
JETSON_FAN_PWM = DeviceMetric("tegrad_jetson_fan_pwm_ratio", "Fan PWM duty (0-1).", ("fan",))
JETSON_FAN_RPM = DeviceMetric("tegrad_jetson_fan_rpm", "Fan speed from the tachometer, revolutions per minute.", ("fan",))
JETSON_NVPMODEL = DeviceMetric("tegrad_jetson_nvpmodel_mode", "Always 1; labels carry the active nvpmodel power mode.", ("id", "name"))
JETSON_CLOCKS = DeviceMetric(
    "tegrad_jetson_clocks_enabled", "1 when jetson_clocks pins the clocks (every online CPU and the GPU at min = max).")

GPU_INFO = DeviceMetric("tegrad_gpu_info", "Always 1 per discrete GPU seen through NVML; labels name it.", ("gpu", "name", "driver"))
GPU_LOAD = DeviceMetric("tegrad_gpu_load_ratio", "GPU busy fraction (0-1) over NVML's last sample period.", ("gpu",))
GPU_FREQ = DeviceMetric("tegrad_gpu_frequency_hertz", "Graphics clock now.", ("gpu",))
GPU_FREQ_MAX = DeviceMetric("tegrad_gpu_frequency_max_hertz", "Highest graphics clock of the GPU.", ("gpu",))
GPU_MEM_USED = DeviceMetric("tegrad_gpu_memory_used_bytes", "GPU memory in use.", ("gpu",))
GPU_MEM_TOTAL = DeviceMetric("tegrad_gpu_memory_total_bytes", "GPU memory installed.", ("gpu",))
GPU_TEMPERATURE = DeviceMetric("tegrad_gpu_temperature_celsius", "GPU die temperature.", ("gpu",))
GPU_POWER = DeviceMetric("tegrad_gpu_power_watts", "GPU board power draw.", ("gpu",))

DEVICE_METRICS = tuple(v for v in list(globals().values()) if isinstance(v, DeviceMetric))

Reading = tuple[DeviceMetric, tuple[str, ...], float]


class DeviceSnapshot:
    """The collector thread's latest readings, rendered at scrape time (a scrape never reads sysfs)."""

    def __init__(self) -> None:
        self._readings: tuple[Reading, ...] = ()

    def publish(self, readings: Iterable[Reading]) -> None:
        self._readings = tuple(readings)  # one reference swap: a scrape sees one whole snapshot

    def clear(self) -> None:
        self._readings = ()

    def describe(self):
        return []

    def collect(self):
        families: dict[DeviceMetric, GaugeMetricFamily | CounterMetricFamily] = {}
        for metric, labels, value in self._readings:
            family = families.get(metric)
            if family is None:
                kind = CounterMetricFamily if metric.counter else GaugeMetricFamily
                family = families[metric] = kind(metric.name, metric.help, labels=metric.labels)
            family.add_metric(labels, value)
        return list(families.values())


DEVICE = DeviceSnapshot()
REGISTRY.register(DEVICE)


def count_unattributed_request(outcome: str) -> None:
    """A request refused before it named a loaded model (unparsable, bad or unknown name):
    model and version stay "", so clients cannot add label values at will."""
    REQUESTS.labels("", "", outcome).inc()


def set_validation_scores(model: str, version: str, scores: dict[str, float]) -> None:
    for metric, value in scores.items():
        VALIDATION_SCORE.labels(model, version, metric).set(value)


def set_active_version(model: str, version: int) -> None:
    ACTIVE_VERSION.labels(model).set(version)


def forget_validation_scores(model: str, version: str) -> None:
    for labels in list(VALIDATION_SCORE._metrics):
        if labels[:2] == (model, version):
            VALIDATION_SCORE.remove(*labels)


def set_model_state(model: str, version: str, state: str) -> None:
    for s in STATES:
        MODEL_STATE.labels(model, version, s).set(1 if s == state else 0)


# Live precision (daemon/monitor): the FP32 shadow comparison of sampled live requests.
PRECISION_METRICS = ("top1_agreement", "cosine", "f1", "max_rel_error")
PRECISION_AGREEMENT = Gauge(
    "tegrad_precision_agreement",
    "Agreement of the served engine with the FP32 reference over the monitor's window of live samples "
    "(metric: top1_agreement, cosine, f1 higher is better; max_rel_error lower is better).",
    ["model", "version", "metric"],
)
PRECISION_SAMPLES = Counter(
    "tegrad_precision_samples",
    "Live samples taken for the precision monitor by result (compared; dropped: the shadow worker was busy; failed).",
    ["model", "version", "result"],
)
CALIBRATION_SATURATION_RATIO = Gauge(
    "tegrad_calibration_saturation_ratio",
    "Fraction of a calibrated tensor's values beyond its calibrated amax in the FP32 reference run, over the "
    "window (at most [monitor] max_tensors tensors, the highest).",
    ["model", "version", "tensor"],
)
CALIBRATION_SATURATION_MAX = Gauge(
    "tegrad_calibration_saturation_max",
    "Highest saturation ratio over all monitored calibrated tensors.",
    ["model", "version"],
)
INPUT_DRIFT_SCORE = Gauge(
    "tegrad_input_drift_score",
    "Population stability index of the live model input against the calibration set "
    "(< 0.1 small, 0.1-0.25 moderate, >= 0.25 large drift).",
    ["model", "version"],
)
PRECISION_ROLLBACKS = Counter(
    "tegrad_precision_rollbacks",
    "Rollbacks the precision monitor triggered ([monitor] rollback_below).",
    ["model"],
)


def set_model_info(model: str, version: str, backend: str, precision: str, engine_id: str,
                   calibration_cache_id: str = "", layers: dict[str, int] | None = None) -> None:
    MODEL_INFO.labels(model, version, backend, precision, engine_id, calibration_cache_id).set(1)
    for key, n in (layers or {}).items():
        # "int8@dla" from a TensorRT engine's inspector; a bare precision is an ONNX count.
        p, _, device = key.partition("@")
        ENGINE_LAYERS.labels(model, version, p, device or ("gpu" if backend == "tensorrt" else "cpu")).set(n)


def forget_model_version(model: str, version: str) -> None:
    """Drop the per-version series of a version that is gone, keeping its final state."""
    for metric in (MODEL_INFO, ENGINE_LAYERS):
        for labels in list(metric._metrics):  # prometheus-client keeps children keyed by label tuples
            if labels[:2] == (model, version):
                metric.remove(*labels)
    for gauge in (QUEUE_DEPTH, INFLIGHT):
        gauge.labels(model, version).set(0)


def forget_monitor(model: str, version: str) -> None:
    """Drop the precision monitor's series of a version that stopped serving."""
    for metric in (PRECISION_AGREEMENT, CALIBRATION_SATURATION_RATIO, CALIBRATION_SATURATION_MAX, INPUT_DRIFT_SCORE):
        for labels in list(metric._metrics):
            if labels[:2] == (model, version):
                metric.remove(*labels)


def exposition() -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(REGISTRY)
