"""Pre-quantized (explicit Q/DQ) models: QAT exports (float weights + Q→DQ) and PTQ exports (int8 weights + DQ).

Such a model already says where INT8 runs, which is what TensorRT ≥ 10 wants, so tegrad takes
it as it is, after checking it against TensorRT's Q/DQ rules (symmetric int8, per-tensor
activations, weights per-tensor or per output channel, constant scales) with errors that name
the node. Then:

* :func:`normalize` folds the Q of constant float weights (QAT) into int8 initializers, so both
  export styles become int8 weights + DQ, and DQs of other constants (ONNX Runtime's int32
  biases) into float constants, which TensorRT folds anyway and does not take as int32 DQ;
* :func:`remove_pairs` drops the Q/DQ around the layers named in ``exclude`` (partial
  de-quantization: those layers read the float tensors and float weights);
* for the TensorRT target the FP16-glue pass of :mod:`calib.glue` applies to what lies outside
  Q/DQ; for the CPU target :func:`to_u8_grid` moves every Q/DQ to uint8 with zero point 128,
  the same grid, as tegrad's own CPU variant does (exact U8U8 kernels on ONNX Runtime);
* :func:`to_fp32_glue` widens an export's FP16 glue (ModelOpt's default
  ``high_precision_dtype="fp16"``) where the glue is to be FP32: ONNX Runtime's CPU provider
  has no FP16 kernels for most ops and, measured on such an EfficientNet-Lite0, its QDQ fusion
  turned the FP16 graph into wrong answers (top-1 agreement 0 with the unfused run).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import WEIGHTED_OPS, Graph, ensure_node_names, match_nodes, node_attr, prune
from .qdq import weight_axis, weights_to_u8

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd")


class ExplicitModelError(ValueError):
    """A pre-quantized model breaks TensorRT's Q/DQ rules; ``problems`` names each node."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        super().__init__(f"the pre-quantized model breaks TensorRT's Q/DQ rules: {shown}")


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QDQ_OPS for n in model.graph.node)


def count_pairs(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "DequantizeLinear" for n in model.graph.node)


def _weight_reader(g: Graph, dq: onnx.NodeProto) -> tuple[onnx.NodeProto, int] | None:
    """The weighted op reading ``dq``'s output as its weight (input 1), if that is what it feeds."""
    for reader in g.consumers.get(dq.output[0], []):
        if reader.op_type in WEIGHTED_OPS and len(reader.input) > 1 and reader.input[1] == dq.output[0]:
            return reader, 1
    return None


def validate(model: onnx.ModelProto) -> None:
    """Raise :class:`ExplicitModelError` when a Q/DQ node breaks TensorRT's rules."""
    g = Graph(model)
    problems: list[str] = []
    qop = sorted({n.op_type for n in g.graph.node if n.op_type in _QOPERATOR_OPS})
    if qop:
        problems.append(f"QOperator nodes ({', '.join(qop)}) are not Q/DQ; TensorRT takes QuantizeLinear/"
                        "DequantizeLinear only: export the model in QDQ format")
    for node in g.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        if node.op_type == "DequantizeLinear" and g.is_constant(node.input[0]) and _weight_reader(g, node) is None:
            continue  # a constant that is no weight (ONNX Runtime's int32 bias): folded to float
        where = f"{node.op_type} {node.name!r}"
        if len(node.input) < 2 or not g.is_constant(node.input[1]):
            problems.append(f"{where}: its scale is computed at run time; TensorRT needs a constant (initializer)")
            continue
        scale = g.constant(node.input[1])
        if scale.dtype.kind != "f" or not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            problems.append(f"{where}: scale must be finite and positive")
        if len(node.input) < 3 or not node.input[2]:
            problems.append(f"{where}: no zero point, which ONNX reads as uint8; TensorRT needs an int8 zero point of 0")
            continue
        if not g.is_constant(node.input[2]):
            problems.append(f"{where}: its zero point is computed at run time; TensorRT needs a constant 0")
            continue
        zero = g.constant(node.input[2])
        if zero.dtype != np.int8:
            problems.append(f"{where}: zero point type {zero.dtype}; TensorRT needs int8 (symmetric, zero point 0)")
        elif np.any(zero != 0):
            problems.append(f"{where}: zero point {zero.flatten()[:4].tolist()}; TensorRT needs 0 (symmetric quantization)")
        if scale.size <= 1:
            continue
        source = node.input[0]
        constant = g.is_constant(source)
        if node.op_type == "DequantizeLinear" and not constant:
            q = g.producer.get(source)
            constant = q is not None and q.op_type == "QuantizeLinear" and g.is_constant(q.input[0])
        dq = node if node.op_type == "DequantizeLinear" else next(
            (c for c in g.consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"), None)
        reader = _weight_reader(g, dq) if dq is not None else None
        if not constant or reader is None:
            problems.append(f"{where}: per-channel scales on an activation; TensorRT quantizes activations per tensor")
            continue
        weight = g.constant(source) if g.is_constant(source) else g.constant(g.producer[source].input[0])
        axis = node_attr(node, "axis", 1)
        axis = axis + weight.ndim if axis < 0 else axis
        want = weight_axis(reader[0], reader[1], weight.ndim)
        if axis != want or scale.size != weight.shape[axis]:
            problems.append(f"{where}: per-channel weight scales on axis {axis} ({scale.size} values) for "
                            f"{reader[0].op_type} {reader[0].name!r}; TensorRT needs the output-channel axis {want}")
    if problems:
        raise ExplicitModelError(problems)


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """QAT float weights → int8 + DQ; DQs of other constants (int32 biases) → float constants."""
    g = Graph(model)
    for node in list(g.graph.node):
        if node.op_type != "QuantizeLinear" or not g.is_constant(node.input[0]):
            continue
        # In float32, as QuantizeLinear divides: float64 moved 160 of ModelOpt's 4.6 M EfficientNet
        # weights one level off the grid ONNX Runtime's Q node gives.
        w = g.constant(node.input[0]).astype(np.float32)
        scale = g.constant(node.input[1]).astype(np.float32)
        axis = node_attr(node, "axis", 1)
        if scale.size > 1:
            shape = [1] * w.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
        q = np.clip(np.rint(w / scale), -128, 127).astype(np.int8)  # zero point 0 (validated)
        name = g.add_initializer(f"{node.output[0]}_int8", q)
        for reader in g.consumers.get(node.output[0], []):
            reader.input[:] = [name if x == node.output[0] else x for x in reader.input]
    prune(model)
    g = Graph(model)
    for node in list(g.graph.node):
        if node.op_type != "DequantizeLinear" or not g.is_constant(node.input[0]) or _weight_reader(g, node):
            continue
        name = g.add_initializer(f"{node.output[0]}_float", _dequantize(g, node))
        for reader in g.consumers.get(node.output[0], []):
            reader.input[:] = [name if x == node.output[0] else x for x in reader.input]
        for out in model.graph.output:
            if out.name == node.output[0]:
                raise ExplicitModelError([f"DequantizeLinear {node.name!r}: a constant model output"])
    prune(model)
    return model


def _dequantize(g: Graph, dq: onnx.NodeProto) -> np.ndarray:
    q = g.constant(dq.input[0]).astype(np.float64)
    scale = g.constant(dq.input[1]).astype(np.float64)
    zero = g.constant(dq.input[2]).astype(np.float64) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale)
    if scale.size > 1:
        shape = [1] * q.ndim
        shape[node_attr(dq, "axis", 1)] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q - zero) * scale).astype(np.float32)


def remove_pairs(model: onnx.ModelProto, exclude: Iterable[str]) -> list[str]:
    """Drop the Q/DQ pairs in front of the weighted layers matching ``exclude``; returns those layers."""
    ensure_node_names(model)
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    if not patterns:
        return []
    names = match_nodes(model, patterns)
    g = Graph(model)
    done = []
    for node in g.graph.node:
        if node.name not in names:
            continue
        touched = False
        for i, name in enumerate(node.input):
            dq = g.producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            if g.is_constant(dq.input[0]):
                node.input[i] = g.add_initializer(f"{name}_float", _dequantize(g, dq))
            else:
                q = g.producer.get(dq.input[0])
                if q is None or q.op_type != "QuantizeLinear":
                    continue
                node.input[i] = q.input[0]
            touched = True
        if touched:
            done.append(node.name)
    prune(model)
    return done


def to_u8_grid(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every int8 Q/DQ (zero point 0) as uint8 with zero point 128: the same grid for ONNX Runtime's x86 kernels."""
    g = Graph(model)
    zeros: dict[str, str] = {}
    for node in g.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 3 or not node.input[2]:
            continue
        zero = g.constant(node.input[2])
        if zero is None or zero.dtype != np.int8:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in g.initializers:
            q, z = weights_to_u8(g.constant(node.input[0]), zero)
            node.input[0] = g.add_initializer(f"{node.input[0]}_u8", q)
            node.input[2] = g.add_initializer(f"{node.input[2]}_u8", z)
            continue
        if node.input[2] not in zeros:
            zeros[node.input[2]] = g.add_initializer(f"{node.input[2]}_u8", weights_to_u8(zero, zero)[1])
        node.input[2] = zeros[node.input[2]]
    prune(model)
    _retype_u8(model)
    return model


def to_fp32_glue(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every FP16 tensor of ``model`` as FP32 (exact: FP16 values widen without loss); declared I/O types kept."""
    _widen_graph(model.graph, declared=False)
    g = Graph(model)
    for inp in model.graph.input:
        if inp.type.tensor_type.elem_type == TensorProto.FLOAT16 and inp.name not in g.initializers:
            wide = g.unique(f"{inp.name}_fp32")
            for reader in g.consumers.get(inp.name, []):
                reader.input[:] = [wide if x == inp.name else x for x in reader.input]
            model.graph.node.insert(0, helper.make_node("Cast", [inp.name], [wide], to=TensorProto.FLOAT,
                                                        name=g.unique(f"{inp.name}_to_fp32")))
    for out in model.graph.output:
        if out.type.tensor_type.elem_type == TensorProto.FLOAT16:
            wide = g.unique(f"{out.name}_fp32")
            for node in model.graph.node:
                node.output[:] = [wide if x == out.name else x for x in node.output]
                node.input[:] = [wide if x == out.name else x for x in node.input]
            model.graph.node.append(helper.make_node("Cast", [wide], [out.name], to=TensorProto.FLOAT16,
                                                     name=g.unique(f"{out.name}_to_fp16")))
    return model


def _widen_graph(graph: onnx.GraphProto, declared: bool = True) -> None:
    """``declared``: also the graph's own inputs and outputs (a subgraph's, which no caller sees)."""
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT16:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32),
                                                                  init.name))
    for vi in [*graph.value_info, *(list(graph.input) + list(graph.output) if declared else [])]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
            elif attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype") and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.GRAPH:
                _widen_graph(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _widen_graph(sub)


def _retype_u8(model: onnx.ModelProto) -> None:
    """Stale int8 value_info of Q outputs would contradict the uint8 they now carry."""
    q_outs = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for vi in model.graph.value_info:
        if vi.name in q_outs and vi.type.tensor_type.elem_type == TensorProto.INT8:
            vi.type.tensor_type.elem_type = TensorProto.UINT8
