"""FP16 lowering: float16 weights and compute, float32 model I/O, Cast nodes at the borders.

TensorRT 11 builds strongly typed networks only, so FP16 has to be written into the ONNX
graph. ``onnxconverter_common.float16.convert_float_to_float16`` is the usual tool, but on our
graphs it produced wrong types: with ``keep_io_types=True`` a graph output made by a
block-listed op (e.g. a final Softmax) came out FP16, and with a node block list over a
Q/DQ graph (mixed precision) it retyped blocked nodes and the model output. The
conversion here is small: chosen nodes get FP16 constants, Casts where a float tensor
enters or leaves the FP16 region, and FP16 tensors flow directly between FP16 nodes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .graph import Graph, ensure_node_names, prune, tensor_types

#: Ops kept in FP32 because FP16 overflows or loses the range they need:
#: Exp/Pow/Log/Reciprocal/Sqrt/Div blow up or underflow outside ±65504; reductions and
#: Softmax accumulate over large extents; normalisations divide by small variances;
#: Resize/Upsample/Range/CumSum/TopK/NonMaxSuppression/RoiAlign carry coordinates, scales or
#: indices that must stay exact (Resize scales of 1/3 are not representable in FP16).
FP32_OPS: tuple[str, ...] = (
    "Exp",
    "Pow",
    "Log",
    "Reciprocal",
    "Sqrt",
    "Softmax",
    "LogSoftmax",
    "ReduceSum",
    "ReduceMean",
    "ReduceSumSquare",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceProd",
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "LpNormalization",
    "Resize",
    "Upsample",
    "Range",
    "CumSum",
    "TopK",
    "NonMaxSuppression",
    "RoiAlign",
    "Einsum",
    "RandomUniformLike",
    "RandomNormalLike",
    "QuantizeLinear",
    "DequantizeLinear",
)

#: Ops whose output type is set by an attribute, or that only produce shapes/indices: they
#: keep their types and the FP16 region ends at their inputs.
TYPE_OPS = frozenset(
    {"Cast", "CastLike", "Constant", "ConstantOfShape", "Shape", "Size", "EyeLike", "RandomNormal", "RandomUniform", "NonZero"}
)

_FP16_MAX = 65504.0

#: Float inputs that are parameters, not data: ONNX keeps them float32 whatever the data type.
_FLOAT_PARAMS = {"Resize": {1, 2}, "Upsample": {1}}


def convert_fp16(
    model: onnx.ModelProto,
    op_block_list: Iterable[str] | None = None,
    node_block_list: Iterable[str] = (),
) -> onnx.ModelProto:
    """FP16 weights and compute with FP32 model inputs/outputs; ``model`` is modified and returned.

    Every node that computes float tensors runs in FP16 unless its op is in ``op_block_list``
    (default :data:`FP32_OPS`) or its name is in ``node_block_list``.
    """
    ensure_node_names(model)
    ops = set(FP32_OPS if op_block_list is None else op_block_list)
    blocked = set(node_block_list)
    types = tensor_types(model)
    chosen = []
    for node in model.graph.node:
        if node.op_type in ops or node.name in blocked or node.op_type in TYPE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if any(types.get(o) == TensorProto.FLOAT for o in node.output if o):
            chosen.append(node.name)
    return nodes_to_fp16(model, chosen, types)


def nodes_to_fp16(model: onnx.ModelProto, node_names: Iterable[str], types: dict[str, int] | None = None) -> onnx.ModelProto:
    """Run just ``node_names`` in FP16; every other node keeps its types.

    Float constant inputs become FP16 initializers (clamped to ±65504); a float activation
    entering the set gets one Cast to FP16, a float output read outside the set (or a model
    output) one Cast back to FP32 under its original name. Used alone it makes the FP16
    islands of a mixed INT8 graph; TensorRT folds the border Casts into the layers.
    """
    ensure_node_names(model)
    g = Graph(model)
    wanted = set(node_names)
    types = tensor_types(model) if types is None else types
    half: dict[str, str] = {}  # float tensor → its FP16 twin
    before: dict[int, list[onnx.NodeProto]] = {}
    after: dict[int, list[onnx.NodeProto]] = {}
    for idx, node in enumerate(g.graph.node):
        if node.name not in wanted:
            continue
        params = _FLOAT_PARAMS.get(node.op_type, ())
        for i, name in enumerate(node.input):
            if not name or i in params:
                continue
            if name not in half:
                value = g.constant(name)
                if value is not None:
                    if value.dtype != np.float32:
                        continue
                    clipped = np.clip(value, -_FP16_MAX, _FP16_MAX).astype(np.float16)
                    half[name] = g.add_initializer(f"{name}_fp16", clipped)
                elif types.get(name) == TensorProto.FLOAT:
                    half[name] = g.unique(f"{name}_fp16")
                    before.setdefault(idx, []).append(
                        helper.make_node("Cast", [name], [half[name]], name=g.unique(f"{name}_to_fp16"), to=TensorProto.FLOAT16)
                    )
                else:
                    continue
            node.input[i] = half[name]
        for o, name in enumerate(node.output):
            if not name or types.get(name) != TensorProto.FLOAT:
                continue
            half[name] = node.output[o] = g.unique(f"{name}_fp16")
            # Dead when only FP16 nodes read it; prune() drops it then.
            after.setdefault(idx, []).append(
                helper.make_node("Cast", [half[name]], [name], name=g.unique(f"{name}_to_fp32"), to=TensorProto.FLOAT)
            )
    nodes: list[onnx.NodeProto] = []
    for idx, node in enumerate(g.graph.node):
        nodes.extend(before.get(idx, ()))
        nodes.append(node)
        nodes.extend(after.get(idx, ()))
    del g.graph.node[:]
    g.graph.node.extend(nodes)
    prune(model)
    return model
