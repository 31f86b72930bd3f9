"""Tensor specs clients see: read from the model graph, checked against and refined by config.toml.

Lowering keeps the model's inputs and outputs (FP32 I/O, Casts and Q/DQ inside), so the
specs of any engine are those of its source ONNX.
"""

from __future__ import annotations

from pathlib import Path

from daemon.config import ModelConfig, TensorConfig
from daemon.errors import ConfigError
from daemon.tensor_spec import TensorSpec

_ONNX_TYPES = {
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


def from_ort(args, model: str, kind: str) -> list[TensorSpec]:
    """Specs of ONNX Runtime NodeArgs (session.get_inputs() / get_outputs())."""
    specs = []
    for arg in args:
        if arg.type not in _ONNX_TYPES:
            raise ConfigError(f"model {model!r}: {kind} {arg.name!r} has type {arg.type}, which KServe cannot carry")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
        specs.append(TensorSpec(arg.name, _ONNX_TYPES[arg.type], shape))
    return specs


def from_onnx(path: Path, model: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs read from the ONNX file's graph (weights are not loaded)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def specs(values, kind):
        out = []
        for v in values:
            if v.name in initializers:
                continue
            t = v.type.tensor_type
            name = "tensor(" + helper.tensor_dtype_to_string(t.elem_type).removeprefix("TensorProto.").lower() + ")"
            if name not in _ONNX_TYPES:
                raise ConfigError(f"model {model!r}: {kind} {v.name!r} has type {name}, which KServe cannot carry")
            shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.shape.dim)
            out.append(TensorSpec(v.name, _ONNX_TYPES[name], shape))
        return out

    return specs(graph.input, "input"), specs(graph.output, "output")


def merge(graph: list[TensorSpec], configured: list[TensorConfig], config: ModelConfig, model_dir: Path, kind: str) -> list[TensorSpec]:
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


def resolve(graph_inputs: list[TensorSpec], graph_outputs: list[TensorSpec], config: ModelConfig,
            model_dir: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    return (merge(graph_inputs, config.input, config, model_dir, "input"),
            merge(graph_outputs, config.output, config, model_dir, "output"))
