"""FP16 glue for TensorRT-target Q/DQ graphs, and the type census that checks it.

In a strongly typed TensorRT network every layer outside Q/DQ keeps its ONNX type, so a Q/DQ
graph on FP32 runs its glue (Clip, Add, pooling, the un-quantized layers) in FP32, the slowest
path on Orin. trtexec ``--int8 --fp16`` and ModelOpt's ONNX PTQ run it in FP16; this pass
writes that into the graph, for tegrad's own INT8/mixed graphs and for explicit (QAT/PTQ)
models alike, because it only looks at Q/DQ nodes, not at how they came to be:

* Q/DQ get FP16 scales (opset 19): the DQ output type follows the scale type, so an INT8
  Conv reads FP16 from its DQ and TensorRT fuses DQ→Conv→(Q) into one INT8 kernel with FP16
  in- and output, where FP32 scales would need a Cast between DQ and the layer. (ModelOpt's
  ``high_precision_dtype="fp16"`` converts the scales to FP16 as well.) Scales below FP16's
  normal range are raised to its smallest normal, and a constant weight behind such a scale is
  re-quantized onto it.
* Every other float node runs FP16 (weights, biases and constants converted), the model's
  inputs and outputs keep their declared types through Casts at the edges.
* ``keep_fp32`` names nodes that stay FP32 (the user's ``exclude_precision = "fp32"``).

:func:`fold_zero_pads` folds ``Pad(0)`` (optionally through a Q→DQ pair, as TF "SAME" exports
have it) into the following Conv's ``pads``: TensorRT would otherwise run a padding layer and
an extra int8 copy per Conv.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto

from .fp16 import TYPE_OPS, nodes_to_fp16
from .graph import WEIGHTED_OPS, Graph, ensure_node_names, ensure_opset, load, node_attr, prune, tensor_types

#: DequantizeLinear takes its output type from an FP16 scale from opset 19 on.
FP16_QDQ_OPSET = 19
_QDQ = ("QuantizeLinear", "DequantizeLinear")
#: Nodes that carry or reshape types instead of computing, left out of the census.
_NOT_COMPUTE = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast", "CastLike", "Constant", "Shape", "Size",
                          "Identity"})
_FP16_TINY = float(np.finfo(np.float16).tiny)
_FP16_MAX = float(np.finfo(np.float16).max)


def fold_zero_pads(model: onnx.ModelProto) -> int:
    """Fold zero constant Pads into the Conv they feed (directly or through one Q→DQ); returns how many."""
    g = Graph(model)
    folded = 0
    for pad in [n for n in g.graph.node if n.op_type == "Pad"]:
        conv, chain = _pad_target(g, pad)
        if conv is None:
            continue
        amounts = g.constant(pad.input[1]).astype(np.int64).tolist()
        rank = len(amounts) // 2
        spatial = rank - 2
        old = [int(v) for v in node_attr(conv, "pads", [0] * (2 * spatial))]
        new = [old[i] + amounts[2 + i] for i in range(spatial)] + [old[spatial + i] + amounts[rank + 2 + i] for i in range(spatial)]
        for attr in list(conv.attribute):
            if attr.name == "pads":
                conv.attribute.remove(attr)
        conv.attribute.append(onnx.helper.make_attribute("pads", new))
        first = chain[0] if chain else conv
        first.input[0] = pad.input[0]
        pad.output[0] = ""  # dead now; prune() drops it
        folded += 1
    if folded:
        prune(model)
    return folded


def _pad_target(g: Graph, pad: onnx.NodeProto):
    """The Conv a foldable ``pad`` feeds and the Q/DQ between them, or (None, None)."""
    if node_attr(pad, "mode", b"constant") not in (b"constant", "constant"):
        return None, None
    if len(pad.input) < 2 or not g.is_constant(pad.input[1]) or (len(pad.input) > 3 and pad.input[3]):
        return None, None
    if len(pad.input) > 2 and pad.input[2]:
        value = g.constant(pad.input[2])
        if value is None or np.any(value != 0):
            return None, None
    amounts = g.constant(pad.input[1])
    rank = amounts.size // 2
    if rank < 3 or np.any(amounts < 0) or np.any(amounts[[0, 1, rank, rank + 1]] != 0):
        return None, None  # negative pads crop; batch/channel pads are not a Conv's to make
    chain: list[onnx.NodeProto] = []
    cur = pad.output[0]
    while True:
        if cur in g.graph_outputs:
            return None, None
        readers = g.consumers.get(cur, [])
        if len(readers) != 1:
            return None, None
        node = readers[0]
        if node.op_type == "Conv" and node.input[0] == cur:
            if node_attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                return None, None
            weight = g.constant(node.input[1]) if g.is_constant(node.input[1]) else None
            if weight is not None and weight.ndim != rank:
                return None, None
            return node, chain
        # A Q→DQ pair maps 0 to 0 (its zero point), so the padding commutes with it.
        wants = "QuantizeLinear" if not chain else "DequantizeLinear" if len(chain) == 1 else None
        if node.op_type != wants or node.input[0] != cur:
            return None, None
        chain.append(node)
        cur = node.output[0]


def to_fp16_glue(model: onnx.ModelProto, keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """Run everything outside Q/DQ in FP16, with FP16 Q/DQ scales; returns the new model."""
    ensure_node_names(model)
    ir_version = model.ir_version
    model = ensure_opset(model, FP16_QDQ_OPSET)
    model.ir_version = max(ir_version, 9)  # opset 19 needs IR 9
    _scales_to_fp16(model)
    keep = set(keep_fp32)
    types = tensor_types(model)
    chosen = []
    for node in model.graph.node:
        if node.name in keep or node.op_type in TYPE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        if node.op_type == "QuantizeLinear" or any(types.get(o) == TensorProto.FLOAT for o in node.output if o):
            chosen.append(node.name)
    # DQ outputs are FP16 now (their scale says so); nodes_to_fp16 renames them and adds the Cast
    # back only where an FP32 node still reads them.
    return nodes_to_fp16(model, chosen, types)


def _scales_to_fp16(model: onnx.ModelProto) -> None:
    g = Graph(model)
    done: dict[str, str] = {}
    for node in g.graph.node:
        if node.op_type not in _QDQ or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in done:
            value = g.constant(name)
            if value is None:
                raise ValueError(f"{node.op_type} {node.name!r}: its scale {name!r} is not a constant")
            if value.dtype == np.float16:
                done[name] = name
                continue
            # Below FP16's normal range the scale would lose its digits (and 0 is illegal).
            half = np.clip(value.astype(np.float32), _FP16_TINY, _FP16_MAX).astype(np.float16)
            done[name] = g.add_initializer(f"{name}_fp16", half)
        if node.op_type == "DequantizeLinear" and g.is_constant(node.input[0]):
            _requantize_weight(g, node, g.constant(name), g.constant(done[name]))
        node.input[1] = done[name]
    prune(model)


def _requantize_weight(g: Graph, dq: onnx.NodeProto, scale: np.ndarray, half: np.ndarray) -> None:
    """Re-quantize a constant weight onto its FP16 scale where that scale had to be raised.

    Per-channel scales of near-dead channels (EfficientNet-Lite0 has 128, down to 6e-12) lie below
    FP16's smallest normal (6.1e-5); raised to it, they would multiply the channel's old integers
    by up to 10^7 and turn weights of 1e-9 into ±0.008. Re-quantized on the raised grid, every
    weight keeps its value within half a step (3e-5).
    """
    raised = half.astype(np.float64) > scale.astype(np.float64) * (1 + 2**-10)  # more than FP16 rounding
    if not np.any(raised) or scale.ndim > 1:
        return
    q = g.constant(dq.input[0])
    zero = g.constant(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(scale.shape, q.dtype)
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[int(node_attr(dq, "axis", 1)) % q.ndim] = -1
    z = zero.astype(np.float64).reshape(shape)
    w = (q.astype(np.float64) - z) * scale.astype(np.float64).reshape(shape)
    # |w| / raised scale <= |q - z|: the new integers stay in the old range
    requant = (np.rint(w / half.astype(np.float64).reshape(shape)) + z).astype(q.dtype)
    dq.input[0] = g.add_initializer(f"{dq.input[0]}_fp16_grid", requant)


def type_census(model: onnx.ModelProto) -> dict[str, int]:
    """Compute nodes by output type ("fp32", "fp16", "int8", ...) plus "Pad": what TensorRT sees."""
    types = tensor_types(model)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Pad":
            counts["Pad"] = counts.get("Pad", 0) + 1
        if node.op_type in _NOT_COMPUTE:
            continue
        out_types = {types.get(o) for o in node.output if o}
        for key, t in (("fp32", TensorProto.FLOAT), ("fp16", TensorProto.FLOAT16)):
            if t in out_types:
                counts[key] = counts.get(key, 0) + 1
    return counts


def fp32_compute_nodes(model: onnx.ModelProto) -> list[str]:
    """Names and ops of the compute nodes with FP32 outputs (the census's offenders)."""
    types = tensor_types(model)
    return [f"{n.op_type} {n.name}" for n in model.graph.node
            if n.op_type not in _NOT_COMPUTE and any(types.get(o) == TensorProto.FLOAT for o in n.output if o)]


#: Pointwise ops TensorRT runs in the epilogue of the INT8 kernel before them (activation, residual).
_EPILOGUE_OPS = frozenset({"Clip", "Relu", "Add"})


def emulate_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """An FP16-glue graph as TensorRT computes it, in a form ONNX Runtime's FP32 kernels run.

    ONNX Runtime on x86 has no FP16 Conv: it casts around each FP16 node and rounds every node's
    output to FP16, including the Conv outputs right before their QuantizeLinear. TensorRT fuses
    DQ → Conv/Gemm → Clip/Relu/Add → Q into one INT8 kernel (int32 accumulation, the scales applied
    in its epilogue): those tensors never exist in FP16 there. This copy keeps every FP16 value
    of ``model`` (scales, biases, constants: the same numbers, FP32 type) and rounds to FP16
    exactly where TensorRT writes an FP16 tensor: the output of every node except the inside of
    those fused chains. Set against the plain ONNX Runtime run, it tells the cost of the FP16
    values from the cost of ONNX Runtime's extra roundings. For measuring only: TensorRT gets
    ``model`` itself.
    """
    m = load(model)
    g = Graph(m)
    types = tensor_types(m)
    hidden = _fused_tensors(g)
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.FLOAT16:
            m.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float32), t.name))
    nodes: list[onnx.NodeProto] = []
    for node in m.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT16:
                    attr.t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(attr.t).astype(np.float32)))
            nodes.append(node)
            continue
        nodes.append(node)
        for o, name in enumerate(node.output):
            if not name or types.get(name) != TensorProto.FLOAT16 or name in hidden:
                continue
            # x → FP16 → FP32 is the rounding TensorRT does when it writes ``name`` as FP16.
            half = node.output[o] = g.unique(f"{name}_rounded")
            if node.op_type != "Cast":  # a Cast to FP16 rounds by itself
                raw = node.output[o] = g.unique(f"{name}_unrounded")
                nodes.append(onnx.helper.make_node("Cast", [raw], [half], name=g.unique(f"{name}_round"), to=TensorProto.FLOAT16))
            nodes.append(onnx.helper.make_node("Cast", [half], [name], name=g.unique(f"{name}_widen"), to=TensorProto.FLOAT))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.value_info[:]
    for value in list(m.graph.input) + list(m.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return m


def _fused_tensors(g: Graph) -> set[str]:
    """Tensors that live only inside TensorRT's fused INT8 kernels (DQ → weighted op → epilogue → Q)."""
    hidden: set[str] = set()
    int8_reads: set[tuple[int, str]] = set()  # (node, input) pairs a fused kernel reads as INT8
    for node in g.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        producers = [g.producer.get(name) for name in node.input[:2]]
        if not all(p is not None and p.op_type == "DequantizeLinear" for p in producers):
            continue
        int8_reads.update((id(node), name) for name in node.input[:2])
        cur = node.output[0]
        while cur not in g.graph_outputs:
            readers = g.consumers.get(cur, [])
            if readers and all(r.op_type == "QuantizeLinear" for r in readers):
                hidden.add(cur)  # the kernel writes INT8
                break
            if len(readers) != 1 or readers[0].op_type not in _EPILOGUE_OPS:
                break
            nxt = readers[0]
            hidden.add(cur)
            # the residual of a fused Add, when it comes dequantized, is read as INT8 too
            int8_reads.update((id(nxt), name) for name in nxt.input if name != cur and name in g.producer
                              and g.producer[name].op_type == "DequantizeLinear")
            cur = nxt.output[0]
    for name in {name for _, name in int8_reads}:
        if name not in g.graph_outputs and all((id(r), name) in int8_reads for r in g.consumers.get(name, [])):
            hidden.add(name)  # never dequantized to memory
    return hidden
