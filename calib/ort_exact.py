"""ONNX Runtime session settings that keep int8 graphs on TensorRT's numbers.

ONNX Runtime fuses DQ→op→Q into its integer kernels. On x86 without VNNI its U8S8 kernels
(uint8 activations × int8 weights, which is also how it runs S8×S8) add pairs of products in
int16 (``vpmaddubsw``) and saturate on full-range inputs: a digits INT8 graph fell to cosine
0.56 against FP32. TensorRT accumulates in int32, exactly. So a graph that would reach those
kernels runs with the QDQ fusion off: DQ → float op → Q is TensorRT's arithmetic up to float
rounding. Graphs whose Q/DQ are all uint8 (tegrad's CPU target) keep the fusion: the U8U8
kernels widen before they add and are exact on every x86. A graph whose metadata sets
``FUSION_KEY`` to "off" runs unfused whatever its types: pre-quantized models lowered for the CPU
(placed for TensorRT, they leave ONNX Runtime little to fuse, and the fused kernels round off the
graph's own arithmetic).
"""

from __future__ import annotations

import os
from typing import Any

import onnx
from onnx import TensorProto

_QDQ = ("QuantizeLinear", "DequantizeLinear")
#: Model metadata key: "off" asks for QDQ fusion off whatever the Q/DQ types (set by the lowering).
FUSION_KEY = "tegrad.ort_qdq_fusion"
_SIGNED = (TensorProto.INT8, TensorProto.INT4, TensorProto.INT16)


def has_signed_qdq(model: onnx.ModelProto) -> bool:
    """Whether any Q/DQ of ``model`` works on a signed integer type (TensorRT's form)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in _QDQ:
            continue
        zero = node.input[2] if len(node.input) > 2 else ""
        if node.op_type == "DequantizeLinear" and node.input[0] in types:
            if types[node.input[0]] in _SIGNED:
                return True
        elif zero and types.get(zero) in _SIGNED:
            return True
        elif node.op_type == "QuantizeLinear" and any(a.name == "output_dtype" and a.i in _SIGNED for a in node.attribute):
            return True
    return False


def keep_exact(options: Any, model: onnx.ModelProto | str | os.PathLike | bytes) -> Any:
    """Turn off QDQ fusion in ``options`` (an ``ort.SessionOptions``) when ``model`` needs it."""
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model), load_external_data=False)
    elif isinstance(model, bytes):
        model = onnx.load_from_string(model)
    fusion = next((p.value for p in model.metadata_props if p.key == FUSION_KEY), "")
    if fusion == "off" or has_signed_qdq(model):
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return options
