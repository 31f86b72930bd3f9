"""Builds an ``OrtEngine`` from an ONNX file and the model's config.

The tensor specs that clients see come from the ONNX graph, refined by the
config's ``input``/``output`` sections, which must agree with the graph.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from daemon.config import ModelConfig, TensorConfig
from daemon.engines.base import TensorSpec
from daemon.engines.onnxruntime.runner import OrtEngine
from daemon.errors import ConfigError

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_slot(config: ModelConfig) -> int:
    if config.onnxruntime.intra_op_threads:
        return config.onnxruntime.intra_op_threads
    return max(1, usable_cores() // config.instances)


def _graph_specs(args, model: str, kind: str) -> list[TensorSpec]:
    specs = []
    for arg in args:
        if arg.type not in _ORT_TYPES:
            raise ConfigError(f"model {model!r}: {kind} {arg.name!r} has type {arg.type}, which KServe cannot carry")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        specs.append(TensorSpec(arg.name, _ORT_TYPES[arg.type], shape))
    return specs


def _merge(graph: list[TensorSpec], configured: list[TensorConfig], config: ModelConfig, model_dir: Path, kind: str) -> list[TensorSpec]:
    """Check the config against the graph; the config may narrow variable dims."""
    where = f"{model_dir / 'config.toml'}: {kind}"
    by_name = {s.name: s for s in graph}
    for t in configured:
        if t.name not in by_name:
            raise ConfigError(f"{where}: {t.name!r} is not a model {kind}; the model has {', '.join(by_name)}")
    batch = config.max_batch > 0
    result = []
    for spec in graph:
        if batch and (not spec.shape or spec.shape[0] != -1):
            raise ConfigError(
                f"{where}: max_batch is {config.max_batch} but {kind} {spec.name!r} has shape {list(spec.shape)} "
                "with no variable first (batch) dimension; set max_batch = 0 or export with a dynamic batch axis"
            )
        tc = next((t for t in configured if t.name == spec.name), None)
        shape = spec.shape
        labels: tuple[str, ...] = ()
        if tc is not None:
            if tc.datatype != spec.datatype:
                raise ConfigError(f"{where}: {tc.name!r} datatype {tc.datatype} does not match the model's {spec.datatype}")
            want = ((-1,) if batch else ()) + tuple(tc.dims)
            if len(want) != len(shape) or any(g >= 0 and w != g for w, g in zip(want, shape)):
                shown = list(tc.dims)
                model_dims = list(shape[1:] if batch else shape)
                raise ConfigError(f"{where}: {tc.name!r} dims {shown} do not match the model's {model_dims}")
            shape = want
            if tc.labels:
                labels_path = model_dir / tc.labels
                if not labels_path.is_file():
                    raise ConfigError(f"{where}: {tc.name!r} labels file {labels_path} does not exist")
                labels = tuple(line.strip() for line in labels_path.read_text(encoding="utf-8").splitlines())
        result.append(TensorSpec(spec.name, spec.datatype, shape, labels))
    return result


def engine_id(model_path: Path, config: ModelConfig, ort_version: str) -> str:
    digest = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(f"|onnxruntime-{ort_version}|cpu|{config.precision}|{config.onnxruntime.graph_optimization}".encode())
    return digest.hexdigest()[:16]


def build(model_path: Path, config: ModelConfig) -> OrtEngine:
    import onnxruntime as ort

    model_dir = model_path.parent.parent
    threads = threads_per_slot(config)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[config.onnxruntime.graph_optimization])
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if config.onnxruntime.allow_spinning else "0"
    )
    try:
        sessions = [
            ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
            for _ in range(config.instances)
        ]
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid models
        raise ConfigError(f"{model_path}: ONNX Runtime cannot load the model: {exc}") from None
    first = sessions[0]
    inputs = _merge(_graph_specs(first.get_inputs(), config.name, "input"), config.input, config, model_dir, "input")
    outputs = _merge(_graph_specs(first.get_outputs(), config.name, "output"), config.output, config, model_dir, "output")
    return OrtEngine(
        sessions,
        inputs,
        outputs,
        precision=config.precision,
        engine_id=engine_id(model_path, config, ort.__version__),
        threads_per_slot=threads,
    )
