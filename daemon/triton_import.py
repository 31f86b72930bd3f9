"""``tegrad import-triton``: a Triton model folder's ``config.pbtxt`` as tegrad's ``config.toml``.

The text is parsed by protobuf's ``text_format`` into Triton's ``ModelConfig`` message (the
committed ``daemon.protogen.model_config_pb2``, which carries Triton's field numbers and names), so a
key tegrad does not know is a parse error naming its line, never a silent skip. Every key that
has a tegrad equivalent is converted; keys that are only hints with none (priority, CUDA graphs,
pinned memory, instance kinds...) are listed as not converted; keys that change what the model
is (ensembles, the python backend, sequence batching, TensorRT plans, ...) refuse the conversion
with a sentence naming the key.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from calib.files import fsync_dir
from daemon.config import CONFIG_FILENAME, parse_model_config
from daemon.errors import ConfigError
from daemon.protogen import model_config_pb2 as mc

PBTXT = "config.pbtxt"

_TYPES = {
    mc.TYPE_BOOL: "BOOL", mc.TYPE_UINT8: "UINT8", mc.TYPE_UINT16: "UINT16", mc.TYPE_UINT32: "UINT32",
    mc.TYPE_UINT64: "UINT64", mc.TYPE_INT8: "INT8", mc.TYPE_INT16: "INT16", mc.TYPE_INT32: "INT32",
    mc.TYPE_INT64: "INT64", mc.TYPE_FP16: "FP16", mc.TYPE_FP32: "FP32", mc.TYPE_FP64: "FP64",
    mc.TYPE_STRING: "BYTES",
}
_FORMATS = {mc.ModelInput.FORMAT_NCHW: "NCHW", mc.ModelInput.FORMAT_NHWC: "NHWC"}
_ONNX = ("onnxruntime_onnx", "onnxruntime")
# Keys of Triton's ModelConfig absent from the committed message, with why tegrad cannot take them.
_NO_EQUIVALENT = {
    "ensemble_scheduling": "ensembles (pipelines of models) are not served by tegrad; serve each step as "
                           "its own model and chain them in the client, or use [preprocess]/[postprocess]",
    "sequence_batching": "tegrad serves stateless models only (no sequence batcher)",
    "model_warmup": "tegrad warms up on zeros by itself ([build] warmup_runs)",
    "batch_input": "ragged batching is not supported",
    "batch_output": "ragged batching is not supported",
    "reshape": "tegrad serves the model's own shapes; reshape in the client or re-export the ONNX",
    "response_cache": "tegrad has no response cache",
    "model_transaction_policy": "decoupled (streaming) models are not supported",
    "model_repository_agents": "repository agents are not supported",
    "priority_levels": "tegrad's queue has no priority levels",
}


@dataclass
class Conversion:
    config: dict
    converted: list[str] = field(default_factory=list)
    not_converted: list[str] = field(default_factory=list)


def _refuse(path: Path, key: str, why: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {why}; nothing was written")


def _parse(path: Path) -> mc.ModelConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; is this a Triton config.pbtxt?") from None
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        where = f"{exc.GetLine()}:{exc.GetColumn()}" if exc.GetLine() else ""
        unknown = re.search(r'has no field named "(\w+)"', str(exc))
        if unknown is None:
            raise ConfigError(f"{path}:{where}: not valid Triton model configuration text: {exc}; "
                              "nothing was written") from None
        key = unknown.group(1)
        why = _NO_EQUIVALENT.get(key, "not a key tegrad can convert (a typo, or a Triton feature tegrad does "
                                      "not serve); remove it or convert it by hand")
        raise ConfigError(f"{path}:{where}: {key}: {why}; nothing was written") from None


def _tensor(t, kind: str, path: Path, out: Conversion) -> dict:
    if t.data_type not in _TYPES:
        raise _refuse(path, f"{kind} {t.name!r} data_type", f"{mc.DataType.Name(t.data_type)} has no KServe type tegrad carries")
    entry: dict = {"name": t.name, "datatype": _TYPES[t.data_type], "dims": [int(d) for d in t.dims]}
    if kind == "input":
        if t.format in _FORMATS:
            entry["format"] = _FORMATS[t.format]
        if t.optional:
            out.not_converted.append(f"input {t.name!r} optional: every input is required in tegrad")
    elif t.label_filename:
        entry["labels"] = t.label_filename
    return entry


def _accelerators(cfg: mc.ModelConfig, out: Conversion, config: dict) -> None:
    accel = cfg.optimization.execution_accelerators
    for a in accel.gpu_execution_accelerator:
        if a.name != "tensorrt":
            out.not_converted.append(f"optimization gpu_execution_accelerator {a.name!r}: no tegrad equivalent")
            continue
        config["backend"] = "tensorrt"
        out.converted.append("optimization gpu_execution_accelerator tensorrt -> backend = \"tensorrt\"")
        for key, value in sorted(a.parameters.items()):
            if key == "precision_mode" and value.upper() in ("FP32", "FP16"):
                config["precision"] = value.lower()
                out.converted.append(f"  precision_mode {value} -> precision = {value.lower()!r}")
            elif key == "precision_mode" and value.upper() == "INT8":
                out.not_converted.append("  precision_mode INT8: tegrad's int8 needs a portable calibration cache; "
                                         "make one with `tegrad calibrate`, then set precision = \"int8\" and calibration_cache")
            elif key == "max_workspace_size_bytes" and value.isdigit():
                config.setdefault("tensorrt", {})["workspace_mb"] = max(16, int(value) >> 20)
                out.converted.append(f"  max_workspace_size_bytes {value} -> [tensorrt] workspace_mb")
            else:
                out.not_converted.append(f"  tensorrt parameter {key}: no tegrad equivalent")
    for a in accel.cpu_execution_accelerator:
        out.not_converted.append(f"optimization cpu_execution_accelerator {a.name!r}: no tegrad equivalent "
                                 "(ONNX Runtime's default CPU provider runs)")


def _optimization(cfg: mc.ModelConfig, out: Conversion, config: dict) -> None:
    opt = cfg.optimization
    if opt.HasField("graph"):
        # Triton's onnxruntime backend: -1 basic, 1 extended, anything else all.
        level = {-1: "basic", 1: "extended"}.get(opt.graph.level, "all")
        config.setdefault("onnxruntime", {})["graph_optimization"] = level
        out.converted.append(f"optimization graph level {opt.graph.level} -> [onnxruntime] graph_optimization = {level!r}")
    if opt.HasField("execution_accelerators"):
        _accelerators(cfg, out, config)
    hints = {field.name for field, _ in opt.ListFields()} - {"graph", "execution_accelerators"}
    for key in sorted(hints):
        out.not_converted.append(f"optimization {key}: a hint with no tegrad equivalent")


def convert(pbtxt: Path) -> Conversion:
    """The config.toml content (a dict) for ``pbtxt``; raises ConfigError on what tegrad cannot serve."""
    cfg = _parse(pbtxt)
    out = Conversion({})
    config = out.config
    platform, backend = cfg.platform, cfg.backend
    if platform == "ensemble":
        raise _refuse(pbtxt, "platform", f"'ensemble': {_NO_EQUIVALENT['ensemble_scheduling']}")
    if backend and backend not in _ONNX:
        raise _refuse(pbtxt, "backend", f"{backend!r}: tegrad serves ONNX models only (the onnxruntime backend); "
                      f"export the model to ONNX{' and move the Python code to the client' if backend == 'python' else ''}")
    if platform and platform not in _ONNX:
        why = ("tegrad builds its TensorRT engines from ONNX on the device; put the ONNX model at "
               "<version>/model.onnx and set backend = \"tensorrt\"" if platform == "tensorrt_plan"
               else "tegrad serves ONNX models only; export the model to ONNX")
        raise _refuse(pbtxt, "platform", f"{platform!r}: {why}")
    if cfg.name:
        if cfg.name != pbtxt.parent.name:
            out.not_converted.append(f"name {cfg.name!r}: differs from the folder name; tegrad names the model "
                                     f"after its folder ({pbtxt.parent.name!r})")
    if platform or backend:
        out.converted.append(f"{'platform' if platform else 'backend'} {platform or backend!r}: an ONNX model "
                             "(served by onnxruntime unless an accelerator below says tensorrt)")
    if cfg.max_batch_size:
        config["max_batch"] = cfg.max_batch_size
        out.converted.append(f"max_batch_size {cfg.max_batch_size} -> max_batch")
    groups = list(cfg.instance_group)
    if groups:
        config["instances"] = sum(max(1, g.count) for g in groups)
        out.converted.append(f"instance_group count -> instances = {config['instances']}")
        kinds = sorted({mc.ModelInstanceGroup.Kind.Name(g.kind) for g in groups} - {"KIND_AUTO"})
        if kinds or any(g.gpus for g in groups):
            out.not_converted.append(f"instance_group kind/gpus ({', '.join(kinds) or 'gpus'}): tegrad places "
                                     "instances by backend (onnxruntime: CPU, tensorrt: the GPU or [tensorrt] dla_core)")
    if cfg.default_model_filename and cfg.default_model_filename != "model.onnx":
        config["default_model_filename"] = cfg.default_model_filename
        out.converted.append("default_model_filename")
    if cfg.HasField("version_policy"):
        which = cfg.version_policy.WhichOneof("policy_choice")
        if which == "latest":
            config["version_policy"] = {"latest": max(1, cfg.version_policy.latest.num_versions)}
        elif which == "all":
            config["version_policy"] = {"all": True}
        elif which == "specific":
            config["version_policy"] = {"specific": [int(v) for v in cfg.version_policy.specific.versions]}
        if which:
            out.converted.append(f"version_policy {which}")
    if cfg.HasField("dynamic_batching"):
        _dynamic_batching(cfg.dynamic_batching, cfg, out, config)
    elif cfg.max_batch_size:
        out.not_converted.append("no dynamic_batching: Triton runs each request alone; tegrad batches requests "
                                 "already waiting when a slot frees (max_queue_delay_us = 0 waits for none)")
    for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
        if tensors:
            config[kind] = [_tensor(t, kind, pbtxt, out) for t in tensors]
            out.converted.append(f"{kind}s: {', '.join(t.name for t in tensors)}")
    if cfg.HasField("optimization"):
        _optimization(cfg, out, config)
    for key in sorted(cfg.parameters):
        value = cfg.parameters[key].string_value
        if key == "intra_op_thread_count" and value.isdigit():
            config.setdefault("onnxruntime", {})["intra_op_threads"] = int(value)
            out.converted.append(f"parameters intra_op_thread_count {value} -> [onnxruntime] intra_op_threads")
        else:
            out.not_converted.append(f"parameters {key!r}: no tegrad equivalent")
    return out


def _dynamic_batching(db, cfg: mc.ModelConfig, out: Conversion, config: dict) -> None:
    table: dict = {"max_queue_delay_us": int(db.max_queue_delay_microseconds)}
    if db.preferred_batch_size:
        table["preferred_batch_sizes"] = sorted({int(s) for s in db.preferred_batch_size})
    out.converted.append("dynamic_batching max_queue_delay_microseconds, preferred_batch_size")
    if db.preserve_ordering:
        out.not_converted.append("dynamic_batching preserve_ordering: tegrad answers in completion order")
    if db.HasField("default_queue_policy"):
        policy = db.default_queue_policy
        if policy.max_queue_size:
            table["max_queue_size"] = int(policy.max_queue_size)
        elif cfg.max_batch_size:
            out.not_converted.append("default_queue_policy max_queue_size 0 (unbounded): tegrad's queue is "
                                     "always bounded (default 256)")
        if policy.default_timeout_microseconds:
            table["default_timeout_us"] = int(policy.default_timeout_microseconds)
        out.converted.append("dynamic_batching default_queue_policy max_queue_size, default_timeout_microseconds")
        if policy.timeout_action == mc.ModelQueuePolicy.DELAY:
            out.not_converted.append("default_queue_policy timeout_action DELAY: tegrad rejects timed-out requests "
                                     "(DEADLINE_EXCEEDED), as REJECT does")
        if policy.allow_timeout_override:
            out.converted.append("  allow_timeout_override: tegrad always honours a request's own deadline")
    config["dynamic_batching"] = table


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON's escapes are valid in TOML basic strings
    return "[" + ", ".join(_value(x) for x in v) + "]"


def to_toml(config: dict, source: Path) -> str:
    """Top-level keys first, then tables, then arrays of tables (TOML's order rules)."""
    lines = [f"# Converted from {source.name} by `tegrad import-triton`; see the README's configuration reference."]
    scalars = {k: v for k, v in config.items() if not isinstance(v, dict) and not (isinstance(v, list) and v and isinstance(v[0], dict))}
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in config.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    lines += [f"{k} = {_value(v)}" for k, v in scalars.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]", *(f"{k} = {_value(v)}" for k, v in table.items())]
    for name, rows in arrays.items():
        for row in rows:
            lines += ["", f"[[{name}]]", *(f"{k} = {_value(v)}" for k, v in row.items())]
    return "\n".join(lines) + "\n"


def import_model(model_dir: Path, *, force: bool = False) -> tuple[Path, Conversion]:
    """Write ``<model_dir>/config.toml`` from its ``config.pbtxt``; the text is validated as a tegrad
    config before anything is written, and an existing config.toml is kept unless ``force``."""
    pbtxt = model_dir / PBTXT if model_dir.is_dir() else model_dir
    if not pbtxt.is_file():
        raise ConfigError(f"{pbtxt} does not exist; give a Triton model folder (the one holding config.pbtxt)")
    target = pbtxt.parent / CONFIG_FILENAME
    if target.exists() and not force:
        raise ConfigError(f"{target} already exists; pass --force to overwrite it")
    conversion = convert(pbtxt)
    text = to_toml(conversion.config, pbtxt)
    try:
        parse_model_config(text, target, pbtxt.parent.name)  # what is written must load
    except ConfigError as exc:
        raise ConfigError(f"{pbtxt}: the converted config would not load ({exc}); nothing was written") from None
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(target)
    fsync_dir(target.parent)
    return target, conversion


def run(args) -> int:
    """The command: one report per folder; exit 1 when any was refused."""
    import sys

    status = 0
    for folder in args.model_dir:
        try:
            target, conversion = import_model(folder, force=args.force)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"wrote {target}")
        for line in conversion.converted:
            print(f"  converted: {line}")
        for line in conversion.not_converted:
            print(f"  not converted: {line}")
    return status
