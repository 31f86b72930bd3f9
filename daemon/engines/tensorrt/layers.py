"""Per-layer precision and device of a built TensorRT engine, from its engine inspector.

The lowered ONNX says what each layer was asked to run in; the engine says what it runs in
after fusion, DLA fallback and TensorRT's own choices. ``IEngineInspector`` reports it when the
engine was built with ``ProfilingVerbosity.DETAILED``: a JSON document with ``Layers``, each
with ``Name``, ``LayerType``, ``Inputs``/``Outputs`` (``Name``, ``Dimensions``,
``Format/Datatype`` such as "Row major linear FP32" or "Thirty-two wide channel vectorized row
major Int8 format") and, when detailed, ``TacticName``. A layer runs in the type of its first
input (as TensorRT's engine explorer counts it), or of its first output when it has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: tests/tensorrt_api checks the calls on them against the real bindings
    import tensorrt as trt

# Words of "Format/Datatype", in the order they are tried ("BFloat16" before "Float").
_TYPES = (("int8", "int8"), ("fp8", "fp8"), ("bfloat16", "bf16"), ("fp16", "fp16"), ("half", "fp16"),
          ("fp32", "fp32"), ("float", "fp32"), ("int32", "int32"), ("int64", "int64"), ("uint8", "uint8"),
          ("bool", "bool"), ("int4", "int4"))
# Layers that execute nothing.
_SKIP = {"noop", "no op"}


@dataclass(frozen=True)
class EngineLayer:
    name: str
    kind: str
    precision: str
    device: str  # gpu | dla


def _datatype(fmt: str) -> str:
    text = fmt.lower()
    for word, name in _TYPES:
        if word in text:
            return name
    return "unknown"


def _precision(layer: dict) -> str:
    for key in ("Inputs", "Outputs"):
        for tensor in layer.get(key) or []:
            if isinstance(tensor, dict) and tensor.get("Format/Datatype"):
                return _datatype(str(tensor["Format/Datatype"]))
    return "unknown"


def _device(layer: dict) -> str:
    # DLA subgraphs appear as one layer whose type or tactic names the DLA.
    text = " ".join(str(layer.get(k, "")) for k in ("LayerType", "TacticName", "ParameterType")).lower()
    return "dla" if "dla" in text else "gpu"


def parse(info: str) -> list[EngineLayer]:
    """The layers of ``get_engine_information(LayerInformationFormat.JSON)``; an engine built
    without detailed verbosity lists only names, which come back as precision "unknown"."""
    try:
        doc = json.loads(info)
    except ValueError as exc:
        raise ValueError(f"the TensorRT engine inspector returned no JSON: {exc}") from None
    layers = []
    for raw in doc.get("Layers", []) if isinstance(doc, dict) else []:
        if isinstance(raw, str):  # ProfilingVerbosity.LAYER_NAMES_ONLY
            layers.append(EngineLayer(raw, "", "unknown", "gpu"))
            continue
        kind = str(raw.get("LayerType", ""))
        if kind.lower() in _SKIP:
            continue
        layers.append(EngineLayer(str(raw.get("Name", "")), kind, _precision(raw), _device(raw)))
    return layers


def of_engine(trt, engine: trt.ICudaEngine) -> list[EngineLayer]:
    """The engine's layers from its inspector; [] when it names no precisions (an engine built
    without detailed profiling verbosity), so that another count stands."""
    found = parse(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return [] if all(x.precision == "unknown" for x in found) else found


def counts(layers: list[EngineLayer]) -> dict[str, int]:
    """``{"int8@gpu": 40, "fp16@dla": 12, …}``: what tegrad_engine_layers and ``tegrad models`` show."""
    result: dict[str, int] = {}
    for layer in layers:
        key = f"{layer.precision}@{layer.device}"
        result[key] = result.get(key, 0) + 1
    return dict(sorted(result.items()))


def by_precision(layer_counts: dict[str, int]) -> dict[str, int]:
    """Totals per precision of ``counts`` (or of an ONNX count, which has no devices)."""
    result: dict[str, int] = {}
    for key, n in layer_counts.items():
        precision = key.partition("@")[0]
        result[precision] = result.get(precision, 0) + int(n)
    return result


def table(layers: list[dict]) -> str:
    """The per-layer table ``tegrad inspect`` prints."""
    rows = [("LAYER", "TYPE", "PRECISION", "DEVICE")] + [
        (str(r.get("name", "")), str(r.get("kind", "")), str(r.get("precision", "")), str(r.get("device", "")))
        for r in layers]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
