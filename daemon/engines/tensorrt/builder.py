"""Builds a TensorRT engine plan from a lowered ONNX model; runs inside the build worker process.

Networks are always strongly typed: precision comes from the graph (Q/DQ nodes, casts), never
from builder flags, so one lowered ONNX builds the same way on TensorRT 10 and 11.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.config import TensorRTOptions
from daemon.engines.tensorrt import layers
from daemon.engines.tensorrt.platform import check_tensorrt_version
from daemon.errors import ConfigError

if TYPE_CHECKING:  # annotations only: tests/tensorrt_api checks the calls on them against the real bindings
    import tensorrt as trt

log = logging.getLogger("tegrad.engines.tensorrt")

Shape = tuple[int, ...]
_MISSING = "backend 'tensorrt' needs the tensorrt Python package (JetPack: apt install python3-libnvinfer) and a CUDA GPU"


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise ConfigError(f"{_MISSING}: {exc}") from None
    check_tensorrt_version(str(trt.__version__))
    return trt


def require_cuda():
    """pycuda's driver module, initialised, with at least one device."""
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            raise RuntimeError("no CUDA device is visible")
    except Exception as exc:  # ImportError, or pycuda's own errors when the driver or GPU is missing
        raise ConfigError(f"{_MISSING}, with pycuda to reach it (pip install 'tegrad[jetson]'): {exc}") from None
    return cuda


_logger = None


def trt_logger():
    """One process-wide logger: TensorRT warns when builders and runtimes bring different ones."""
    global _logger
    if _logger is None:
        trt = require_tensorrt()

        class _Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                # Only the last few errors are kept: enough to explain a failed build.
                self.errors: deque[str] = deque(maxlen=20)

            def log(self, severity, msg) -> None:
                if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                    self.errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.WARNING:
                    log.warning("TensorRT: %s", msg)

        _logger = _Logger()
    return _logger


def logged_errors() -> str:
    """The TensorRT errors logged lately, without creating a logger (or importing TensorRT)."""
    return " | ".join(_logger.errors) if _logger is not None else ""


def _canonical_options(options: TensorRTOptions) -> str:
    build = {
        "workspace_mb": options.workspace_mb,
        "optimization_level": options.optimization_level,
        # GPU fallback only changes an engine that targets a DLA core.
        "gpu_fallback": options.gpu_fallback if options.dla_core >= 0 else None,
        "min_batch": options.min_batch,
        "opt_batch": options.opt_batch,
        "profile": sorted([p.input, p.min, p.opt, p.max] for p in options.profile),
    }
    if options.dla_core >= 0:  # only there: GPU engines keep the ids they had
        build["dla_batch"] = options.dla_batch
    return json.dumps(build, sort_keys=True, separators=(",", ":"))


def fingerprint(options: TensorRTOptions) -> dict[str, str]:
    """What makes a plan non-portable: TensorRT version, GPU, DLA core and the build options."""
    trt = require_tensorrt()
    cuda = require_cuda()
    device = cuda.Device(0)
    major, minor = device.compute_capability()
    return {
        "backend": "tensorrt",
        "version": trt.__version__,
        "device": device.name(),
        "compute_capability": f"{major}.{minor}",
        "dla_core": str(options.dla_core),
        "options": _canonical_options(options),
    }


def profile_shapes(
    input_shapes: dict[str, Shape], max_batch: int, options: TensorRTOptions
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """min/opt/max shape of every network input for the one optimization profile.

    ``input_shapes`` holds the shapes as the ONNX declares them, -1 for a variable dimension.
    On a DLA core every shape is static (DLA takes min = opt = max only): the batch dimension is
    ``dla_batch`` (or ``opt_batch``, else ``max_batch``); the runner splits and pads batches to it.
    """
    explicit = {p.input: p for p in options.profile}
    unknown = sorted(set(explicit) - set(input_shapes))
    if unknown:
        raise ConfigError(
            f"[[tensorrt.profile]] names {', '.join(map(repr, unknown))}, which the model does not have as "
            f"input; its inputs are {', '.join(map(repr, input_shapes))}"
        )
    result: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name, declared in input_shapes.items():
        shape = tuple(int(d) for d in declared)
        p = explicit.get(name)
        if p is not None:
            result[name] = _explicit(name, shape, p, max_batch, dla=options.dla_core >= 0)
            continue
        lo, opt, hi = list(shape), list(shape), list(shape)
        first_free = 0
        if max_batch > 0:
            if not shape or shape[0] >= 0:
                raise ConfigError(
                    f"max_batch is {max_batch} but input {name!r} has shape {list(shape)} with no variable first "
                    "(batch) dimension; set max_batch = 0 or export the model with a dynamic batch axis"
                )
            opt_batch = options.opt_batch or max_batch
            if options.dla_core >= 0:
                static = options.dla_batch or opt_batch
                if static > max_batch:
                    raise ConfigError(f"tensorrt.dla_batch {static} is above max_batch {max_batch}")
                lo[0] = opt[0] = hi[0] = static
            elif not options.min_batch <= opt_batch <= max_batch:
                raise ConfigError(
                    f"tensorrt batch sizes need min_batch <= opt_batch <= max_batch; got {options.min_batch}, "
                    f"{opt_batch}, {max_batch}"
                )
            else:
                lo[0], opt[0], hi[0] = options.min_batch, opt_batch, max_batch
            first_free = 1
        for i in range(first_free, len(shape)):
            if shape[i] < 0:
                raise ConfigError(
                    f"input {name!r} dimension {i} is variable (shape {list(shape)}) and TensorRT needs its range: "
                    f"add a [[tensorrt.profile]] entry with input = {name!r} and full min/opt/max shapes"
                )
        result[name] = (tuple(lo), tuple(opt), tuple(hi))
    return result


def _explicit(name: str, shape: Shape, p, max_batch: int, dla: bool = False) -> tuple[Shape, Shape, Shape]:
    where = f"[[tensorrt.profile]] for input {name!r}"
    if len(p.min) != len(shape):
        raise ConfigError(f"{where} has rank {len(p.min)} but the model's input has shape {list(shape)}")
    for i, d in enumerate(shape):
        if d >= 0 and not p.min[i] == p.opt[i] == p.max[i] == d:
            raise ConfigError(f"{where}: dimension {i} is fixed at {d} in the model, but the profile gives "
                              f"min/opt/max {p.min[i]}/{p.opt[i]}/{p.max[i]}")
    if dla:
        if not list(p.min) == list(p.opt) == list(p.max):
            raise ConfigError(f"{where}: a DLA core takes one static shape; give the same min, opt and max "
                              f"(got {list(p.min)}, {list(p.opt)}, {list(p.max)})")
        return tuple(p.min), tuple(p.opt), tuple(p.max)  # the runner splits larger batches
    if max_batch > 0 and p.max[0] < max_batch:
        # The scheduler would form batches the engine cannot take.
        raise ConfigError(f"{where}: max shape batch {p.max[0]} is below max_batch {max_batch}")
    return tuple(p.min), tuple(p.opt), tuple(p.max)


def _progress_monitor(trt, progress: Callable[[str], None]):
    class _Monitor(trt.IProgressMonitor):
        # TensorRT calls these from its own threads, often thousands of times: report at most ~2/s.
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._steps: dict[str, int] = {}
            self._last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            with self._lock:
                self._steps[phase_name] = num_steps

        def step_complete(self, phase_name, step) -> bool:
            now = time.monotonic()
            with self._lock:
                if now - self._last < 0.5:
                    return True
                self._last = now
                n = self._steps.get(phase_name, 0)
            try:
                progress(f"building: {phase_name} {step + 1}/{n}")
            except Exception:  # a broken reporter must not cancel or crash the build
                log.debug("progress callback failed", exc_info=True)
            return True  # False would cancel the build

        def phase_finish(self, phase_name) -> None:
            with self._lock:
                self._steps.pop(phase_name, None)

    return _Monitor()


def _atomic_write(path: Path, data) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    view = memoryview(data)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(view)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return view.nbytes


def _use_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> None:
    cache = None
    data = path.read_bytes() if path is not None and path.is_file() else b""
    if data:
        try:
            cache = config.create_timing_cache(data)  # a corrupt blob gives None or raises, by version
        except Exception:
            log.debug("create_timing_cache failed", exc_info=True)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            log.warning("ignoring TensorRT timing cache %s: corrupt, or made by another TensorRT version or GPU", path)
            cache = None
    if cache is None:
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    options: TensorRTOptions,
    max_batch: int,
    timing_cache_path: Path | None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Parse ``onnx_path``, build a strongly typed engine and write its plan to ``plan_path``."""
    trt = require_tensorrt()
    report = progress or (lambda _msg: None)
    logger = trt_logger()
    logger.errors.clear()

    report("parsing")
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as exc:  # the binding's answer to a null builder (no usable GPU)
        raise ConfigError(f"{_MISSING}: TensorRT could not create a builder: {exc}; {_last_errors(logger)}") from None
    # TensorRT 11 is always strongly typed and may drop the flag; on 10 it must be asked for.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise ConfigError(f"{onnx_path}: TensorRT cannot parse the model: {errors or _last_errors(logger)}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    config.builder_optimization_level = options.optimization_level
    if hasattr(trt.BuilderFlag, "TF32"):
        # TF32 (10-bit mantissa, like FP16) for what stays FP32; off keeps ONNX Runtime's FP32 numbers.
        (config.set_flag if options.tf32 else config.clear_flag)(trt.BuilderFlag.TF32)
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(inputs, max_batch, options).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if options.dla_core >= 0:
        if options.dla_core >= builder.num_DLA_cores:
            raise ConfigError(f"tensorrt.dla_core is {options.dla_core} but this device has "
                              f"{builder.num_DLA_cores} DLA core(s); use -1 for the GPU")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        if options.gpu_fallback and hasattr(trt.BuilderFlag, "GPU_FALLBACK"):
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        dla_plan = _dla_placement(trt, network, config, options, onnx_path)
    else:
        dla_plan = None
    # Per-layer precision and device of the built engine, for tegrad_engine_layers and `tegrad inspect`.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    _use_timing_cache(config, timing_cache_path)
    logger.errors.clear()  # a rejected timing cache is not why a build fails
    monitor = None
    if progress is not None and hasattr(trt, "IProgressMonitor"):
        monitor = _progress_monitor(trt, progress)  # must outlive the build: TensorRT holds a raw pointer
        config.progress_monitor = monitor

    report("building")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ConfigError(f"{onnx_path}: TensorRT could not build an engine: {_last_errors(logger)}")

    report("serializing")
    size = _atomic_write(plan_path, plan)
    if timing_cache_path is not None:
        try:
            _atomic_write(timing_cache_path, config.get_timing_cache().serialize())
        except OSError as exc:  # a lost cache only slows the next build down
            log.warning("could not save TensorRT timing cache %s: %s", timing_cache_path, exc)
    info = {"layers": network.num_layers, "plan_bytes": size, "tensorrt": trt.__version__}
    if dla_plan is not None:
        info["dla_placement"] = dla_plan
    del parser, network, config, builder  # the builder's memory goes before the engine is loaded to inspect it
    report("inspecting")
    info.update(inspect_plan(trt, logger, plan))
    return info


def _dla_placement(trt, network: trt.INetworkDefinition, config: trt.IBuilderConfig, options: TensorRTOptions,
                   onnx_path: Path) -> dict[str, int]:
    """How many layers the DLA core can take, before building; FP32 layers never can (DLA runs
    FP16 and INT8 only), and without GPU fallback they are refused rather than built to fail."""
    on_gpu, fp32 = [], []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHUFFLE):
            continue  # folded or free: nothing to place
        if layer.num_outputs and layer.get_output(0).dtype == trt.DataType.FLOAT:
            fp32.append(layer.name)
            on_gpu.append(layer.name)
        elif not config.can_run_on_DLA(layer):
            on_gpu.append(layer.name)
    counted = sum(1 for i in range(network.num_layers)
                  if network.get_layer(i).type not in (trt.LayerType.CONSTANT, trt.LayerType.SHUFFLE))
    placement = {"dla": counted - len(on_gpu), "gpu": len(on_gpu), "fp32": len(fp32)}
    some = ", ".join(on_gpu[:5]) + (", …" if len(on_gpu) > 5 else "")
    if on_gpu and not options.gpu_fallback:
        why = (f"{len(fp32)} of them compute in FP32, which DLA cannot run; lower the model with FP16 glue "
               "(the TensorRT target's default for fp16, int8 and mixed)" if fp32 else "DLA does not support them")
        raise ConfigError(f"{onnx_path}: tensorrt.dla_core {options.dla_core} with gpu_fallback = false, but "
                          f"{len(on_gpu)} of {counted} layers cannot run on DLA ({some}): {why}; or set "
                          "tensorrt.gpu_fallback = true to run them on the GPU")
    if on_gpu:
        log.warning("DLA core %d: %d of %d layers fall back to the GPU (%d in FP32): %s", options.dla_core,
                    len(on_gpu), counted, len(fp32), some)
    else:
        log.info("DLA core %d: all %d layers can run on DLA", options.dla_core, counted)
    return placement


def inspect_plan(trt, logger, plan) -> dict:
    """Per-layer precision and device of the engine in ``plan`` (from its inspector); empty when
    TensorRT cannot say, so that the ONNX count stands."""
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        found = layers.of_engine(trt, engine) if engine is not None else []
    except Exception as exc:  # a missing layer table must not fail a good build
        log.warning("TensorRT engine inspector: %s", exc)
        return {}
    if not found:
        return {}
    return {"engine_layers": [asdict(layer) for layer in found], "layer_counts": layers.counts(found)}


def _parser_error(err: trt.ParserError) -> str:
    node = err.node_name() if hasattr(err, "node_name") else ""  # node_name is new in TensorRT 10
    return f"node {node!r}: {err.desc()}" if node else err.desc()


def _last_errors(logger) -> str:
    return " | ".join(logger.errors) or "no error was reported (see the TensorRT log above)"
