"""Precision lowering: one ONNX in, a graph whose precision is explicit in Q/DQ and Cast nodes.

The result builds on TensorRT 10 (``STRONGLY_TYPED``) and 11 without precision flags and runs on
ONNX Runtime, so INT8 accuracy can be checked on any CPU before a device sees the model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import onnx
from onnx import TensorProto

from . import explicit as _explicit
from . import fp16 as _fp16
from . import glue as _glue
from . import qdq as _qdq
from .graph import (
    WEIGHTED_OPS,
    Graph,
    ensure_node_names,
    ensure_opset,
    fold_constants,
    load,
    match_nodes,
    save_atomic,
    tensor_types,
)
from .ort_exact import FUSION_KEY

PRECISIONS = ("fp32", "fp16", "int8", "mixed", "explicit")
TARGETS = _qdq.TARGETS
GLUES = ("fp16", "fp32")

log = logging.getLogger("tegrad.calib.lower")


def lower(
    model: onnx.ModelProto | str | os.PathLike,
    precision: str,
    amax: Mapping[str, float] | None = None,
    exclude: Iterable[str] = (),
    exclude_precision: str = "fp16",
    target: str = "tensorrt",
    glue: str | None = None,
) -> onnx.ModelProto:
    """Lower ``model`` to ``precision`` and return a new ModelProto (the input is not modified).

    - ``"fp32"``: an unchanged copy.
    - ``"fp16"``: FP16 weights and compute with FP32 I/O; ``exclude`` names nodes kept in FP32.
    - ``"int8"``: Q/DQ on every weighted layer (see :mod:`calib.qdq`); needs ``amax``
      (tensor name → amax). ``exclude`` leaves the matching layers unquantized in FP32.
    - ``"mixed"``: INT8 except the layers matching ``exclude`` (exact node names or fnmatch
      patterns), which run in ``exclude_precision`` ("fp16" or "fp32").
    - ``"explicit"``: the model already carries Q/DQ (QAT or PTQ export, see
      :mod:`calib.explicit`): validated, taken as it is; ``exclude`` removes the Q/DQ pairs in
      front of the matching layers. A model with Q/DQ is lowered this way whatever
      ``precision`` says (with a log line); ``amax`` is not used.

    ``target="cpu"`` emits the ONNX Runtime x86 variant of the INT8 graph (uint8 activations,
    zero point 128, same grid). ONNX Runtime's CPU provider has no fast FP16 kernels, so
    excluded layers of a CPU-target mixed graph stay FP32.

    ``glue``: the type of everything outside Q/DQ in an INT8 / mixed graph for the TensorRT
    target, ``"fp16"`` (the default there, see :mod:`calib.glue`) or ``"fp32"``; the CPU
    target has FP32 glue only. The TensorRT target also folds zero Pads into their Conv.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    if exclude_precision not in ("fp16", "fp32"):
        raise ValueError(f"exclude_precision must be 'fp16' or 'fp32', got {exclude_precision!r}")
    glue = glue or ("fp16" if target == "tensorrt" else "fp32")
    if glue not in GLUES:
        raise ValueError(f"unknown glue {glue!r}; expected one of {GLUES}")
    if glue == "fp16" and target != "tensorrt":
        raise ValueError("FP16 glue is for the TensorRT target; ONNX Runtime's CPU kernels are FP32")
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    m = load(model)
    if precision != "explicit" and _explicit.has_qdq(m):
        log.warning("the model already carries Q/DQ (%d DequantizeLinear nodes): lowering it as precision "
                    "'explicit' instead of %r (its own quantization, no calibration cache)", _explicit.count_pairs(m),
                    precision)
        precision = "explicit"
    if precision == "fp32":
        return m
    ensure_node_names(m)
    if precision == "explicit":
        out = _lower_explicit(m, exclude, target, glue)
        onnx.checker.check_model(out, full_check=True)
        return out
    excluded = match_nodes(m, exclude) if exclude else set()

    if precision == "fp16":
        m = fold_constants(m)
        out = _fp16.convert_fp16(m, node_block_list=excluded)
    else:
        if amax is None:
            raise ValueError(f"precision {precision!r} needs amax values from a calibration cache")
        if precision == "mixed" and not excluded:
            raise ValueError("precision 'mixed' needs at least one layer in exclude")
        m = fold_constants(m)
        excluded &= {n.name for n in m.graph.node}  # folded Constant nodes are gone
        out = _qdq.insert_qdq(m, amax, exclude=sorted(excluded), target=target)
        if target == "tensorrt":
            _glue.fold_zero_pads(out)
        if glue == "fp16":
            keep = excluded if precision == "mixed" and exclude_precision == "fp32" else ()
            out = _glue.to_fp16_glue(out, keep_fp32=keep)
        elif precision == "mixed" and exclude_precision == "fp16" and target == "tensorrt":
            weighted = {n.name for n in out.graph.node if n.name in excluded and n.op_type in WEIGHTED_OPS}
            # Only the excluded weighted layers go FP16 (not every node a broad pattern touched),
            # so Q/DQ and integer plumbing keep their types.
            out = _fp16.nodes_to_fp16(out, weighted or excluded)
    onnx.checker.check_model(out, full_check=True)
    return out


def _lower_explicit(m: onnx.ModelProto, exclude: list[str], target: str, glue: str) -> onnx.ModelProto:
    if not _explicit.has_qdq(m):
        raise ValueError("precision 'explicit' needs a model that carries Q/DQ nodes (a QAT or PTQ export); "
                         "for a float model use 'int8' with a calibration cache")
    _explicit.validate(m)
    m = _explicit.normalize(ensure_opset(m))
    m = fold_constants(m, keep_ops=_explicit.QDQ_OPS)
    if exclude:
        _explicit.remove_pairs(m, exclude)
    if target == "cpu":
        # Placed for TensorRT (no Q on Conv outputs), the graph gives ONNX Runtime few integer
        # kernels to fuse: on ModelOpt's EfficientNet-Lite0, 7 of 49 Convs, slower fused than
        # unfused (bench/modelopt_interop.py), and the fused ones round off the graph's own
        # arithmetic (top-1 agreement 0.986 with the file); unfused it computes what the file does.
        out = _explicit.to_u8_grid(_explicit.to_fp32_glue(m))
        onnx.helper.set_model_props(out, {**{p.key: p.value for p in out.metadata_props}, FUSION_KEY: "off"})
        return out
    _glue.fold_zero_pads(m)
    return _glue.to_fp16_glue(m) if glue == "fp16" else _explicit.to_fp32_glue(m)


def lower_file(src: str | os.PathLike, dst: str | os.PathLike, precision: str, **kwargs) -> Path:
    """Lower ``src`` and write the result to ``dst`` atomically (temp file, fsync, rename)."""
    return save_atomic(lower(src, precision, **kwargs), dst)


def layer_precisions(model: onnx.ModelProto | str | os.PathLike) -> dict[str, str]:
    """Weighted layer name → "int8" | "fp16" | "fp32" in a lowered graph."""
    m = load(model)
    ensure_node_names(m)
    g = Graph(m)
    types = tensor_types(m)
    result: dict[str, str] = {}
    for node in g.weighted_nodes():
        producers = [g.producer.get(i) for i in node.input[:2] if i]
        if any(p is not None and p.op_type == "DequantizeLinear" for p in producers):
            result[node.name] = "int8"
        elif types.get(node.input[0]) in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            result[node.name] = "fp16"
        else:
            result[node.name] = "fp32"
    return result


def count_precisions(model: onnx.ModelProto | str | os.PathLike) -> dict[str, int]:
    """How many weighted layers (Conv, ConvTranspose, Gemm, MatMul) run int8 / fp16 / fp32."""
    counts = {"int8": 0, "fp16": 0, "fp32": 0}
    for precision in layer_precisions(model).values():
        counts[precision] += 1
    return counts
