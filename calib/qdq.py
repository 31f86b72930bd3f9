"""INT8 explicit quantization: QuantizeLinear/DequantizeLinear placement by TensorRT's rules.

Placement (``target="tensorrt"``, the portable graph):

* Every activation input of Conv, ConvTranspose, Gemm and MatMul gets one Q→DQ pair,
  per-tensor, symmetric: scale = amax/127, zero point int8 0, range [-128, 127].
* Weights (constant inputs) are stored as int8 initializers quantized per output channel
  (Conv/Gemm(transB=1) axis 0, Gemm(transB=0)/MatMul the last axis, ConvTranspose axis 1),
  range [-127, 127], scale = max|w|/127, followed by a DequantizeLinear. Pre-quantized
  int8 weights are what TensorRT's parser documents for QAT-style graphs ("an
  IDequantizeLayer is required between the weights and the linear operator"), what ONNX
  Runtime's QDQ fusion looks for (a constant int8 DQ input), they are 4× smaller than
  float Q→DQ weights, and both runtimes see bit-identical integer weights instead of each
  rounding the float weights itself. Biases stay float (TensorRT folds them).
* The residual input of a skip-connection Add (the input that does not come straight from a
  weighted op, possibly through a BatchNormalization) shares the Q/DQ of that tensor, so
  TensorRT can fuse Conv+Add with an int8 residual.
* Nothing is put on outputs of weighted ops.
* Detector-safe rules (general, no node names): a depthwise Conv whose input channels span very
  different ranges keeps a float input, because its channels never mix and per-tensor
  activation scales (all TensorRT takes) leave the small channels a few levels or none; the
  spread is bounded from the producing Conv's weights (sum |w_c| + |b_c| per channel, through
  elementwise activations, capped by a Clip on the way: ReLU6 bounds every channel by 6), so
  no data is needed. Limit: largest / 10th-percentile channel > 8×. In YOLOX-Nano (SiLU) that
  is 11 of its 30 depthwise Convs (their spreads measured on calibration data 7.6–34×,
  the others' 2–13×); their FP32 inputs took max-calibrated F1 vs FP32 from 0.86 to 0.90 and mse
  from 0.92 to 0.94. EfficientNet-Lite (ReLU6) has none: its graph is unchanged.
  On the CPU variant, a weighted op's output that reaches a model output without another
  quantized op on the way (a detection head's box/score convs), or that a non-linear float op
  reads (SiLU), is not requantized.
* Where the input of a weighted op is reached through data-movement ops that commute with
  quantization (MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Slice, Pad with
  zero padding, Relu, Concat), the pair sits *directly in front of the weighted op*, after
  the chain. TensorRT moves Q backwards and DQ forwards across commuting layers on its own,
  so the int8 region still reaches the producer, while ONNX Runtime can only fuse a
  DQ that feeds the weighted op directly. Placing it earlier would cost ONNX Runtime its
  fusion and gain TensorRT nothing.
* One pair per tensor, shared by every consumer that wants the quantized value; consumers
  that do not (Sigmoid, Softmax, an un-fused Add...) keep reading the float tensor.
* AveragePool/GlobalAveragePool/Concat get no pair on their own inputs: they are cheap next
  to the weighted layers and an extra pair costs accuracy and an extra amax. When they feed
  a weighted op, that op's input pair sits on their output (Concat: TensorRT propagates the
  Q back into the concatenated branches).

``target="cpu"`` (ONNX Runtime on x86) uses the same grid with uint8 activations and zero
point 128 (S8 ``q`` equals U8 ``q + 128``), because ONNX Runtime's x86 kernels are fast for
U8 activations only. Its weights are stored the same way (uint8, zero point 128): the U8U8
kernels are exact on every x86, while the U8S8 ones saturate on CPUs without VNNI
(``bench/u8_weights.py`` measures both). Its QDQ fusion needs DQ→op→Q units, so the CPU variant also:

* moves the Q of a quantized tensor up to the weighted op that produces it when only
  value-preserving ops lie between (Relu/Clip/Pad/MaxPool/Reshape/...), and runs those ops on
  uint8 (Relu becomes Clip at the zero point): monotone ops commute with rounding, so the
  numbers equal the TensorRT graph's and the layer fuses into QLinearConv;
* quantizes the remaining outputs of weighted ops with their own amax (e.g. a projection
  Conv feeding a residual Add, or a Conv followed by SiLU); model outputs stay float;
* folds BatchNormalization into the preceding Conv and gives Conv/Gemm int32 biases
  (scale s_x·s_w), which ONNX Runtime's QLinearConv/QGemm need.

:func:`activation_tensors_to_quantize` lists what both targets need by default, so one
calibration cache lowers for either.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .graph import (
    WEIGHTED_OPS,
    Graph,
    ensure_node_names,
    ensure_opset,
    fold_batchnorm,
    fold_constants,
    match_nodes,
    node_attr,
    prune,
)

TARGETS = ("tensorrt", "cpu")

_WEIGHT_QMAX = 127
_ACT_QMAX = 127


class MissingAmaxError(KeyError, ValueError):
    """The calibration cache lacks amax for tensors the int8 graph needs."""

    def __init__(self, tensors: list[str]):
        self.tensors = tensors
        shown = ", ".join(repr(t) for t in tensors[:20])
        more = f" and {len(tensors) - 20} more" if len(tensors) > 20 else ""
        super().__init__(
            f"calibration cache has no amax for {len(tensors)} tensor(s) that INT8 lowering quantizes: "
            f"{shown}{more}; recalibrate on this model or exclude the layers that read them"
        )

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.args[0]


@dataclass
class _Slot:
    """One quantized input of a weighted op."""

    node: onnx.NodeProto
    index: int
    axis: int | None  # per-channel axis for constant weights, None for per-tensor


@dataclass
class QuantPlan:
    #: activation tensor → consumers (node, input index) that read its DQ output
    activations: dict[str, list[tuple[onnx.NodeProto, int]]] = field(default_factory=dict)
    #: activation tensors whose every consumer reads the DQ output (CPU-variant outputs)
    rewire_all: set[str] = field(default_factory=set)
    #: CPU variant: quantized tensor → (weighted-op output, value-preserving ops in between)
    chains: dict[str, tuple[str, list[onnx.NodeProto]]] = field(default_factory=dict)
    weights: list[_Slot] = field(default_factory=list)
    quantized_nodes: list[onnx.NodeProto] = field(default_factory=list)


def weight_axis(node: onnx.NodeProto, index: int, ndim: int) -> int | None:
    """Output-channel axis of the constant input ``index`` of ``node`` (None: per-tensor)."""
    op = node.op_type
    if op == "Conv" and index == 1:
        return 0
    if op == "ConvTranspose" and index == 1:
        return 1 if ndim >= 2 else None
    if op == "Gemm" and index == 1:
        return 0 if node_attr(node, "transB", 0) else 1
    if op == "MatMul" and index == 1 and ndim >= 2:
        return ndim - 1
    return None


def _quantized_inputs(node: onnx.NodeProto) -> list[int]:
    # Data and weight; the bias (input 2 of Conv/ConvTranspose/Gemm) stays float.
    return [0, 1] if node.op_type in WEIGHTED_OPS else []


def _from_weighted(g: Graph, tensor: str, quantized: set[str]) -> onnx.NodeProto | None:
    """The quantized weighted op that produces ``tensor`` directly (a BatchNorm in between fuses)."""
    node = g.producer.get(tensor)
    if node is not None and node.op_type == "BatchNormalization":
        node = g.producer.get(node.input[0])
    if node is not None and node.op_type in WEIGHTED_OPS and node.name in quantized:
        return node
    return None


def build_plan(model: onnx.ModelProto, exclude: Iterable[str] = (), target: str = "tensorrt") -> QuantPlan:
    """Decide where Q/DQ go. ``exclude`` holds node names or fnmatch patterns (validated)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    ensure_node_names(model)
    g = Graph(model)
    excluded = match_nodes(model, exclude) if exclude else set()
    plan = QuantPlan()
    quantized: set[str] = set()

    def want(tensor: str, node: onnx.NodeProto, index: int) -> None:
        plan.activations.setdefault(tensor, []).append((node, index))

    for node in g.graph.node:
        if node.op_type not in WEIGHTED_OPS or node.name in excluded or _channels_too_spread(g, node):
            continue
        slots = [i for i in _quantized_inputs(node) if i < len(node.input) and node.input[i]]
        if not all(g.is_constant(node.input[i]) or g.is_activation(node.input[i]) for i in slots):
            continue
        if all(g.is_constant(node.input[i]) for i in slots):
            continue  # constant-only subgraph: nothing runs at inference time
        quantized.add(node.name)
        plan.quantized_nodes.append(node)
        for i in slots:
            name = node.input[i]
            if g.is_constant(name):
                value = g.constant(name)
                if value is None or value.dtype.kind != "f":
                    continue
                plan.weights.append(_Slot(node, i, weight_axis(node, i, value.ndim)))
            else:
                want(name, node, i)

    for node in g.graph.node:
        if node.op_type != "Add" or node.name in excluded or len(node.input) != 2:
            continue
        a, b = node.input
        if not (g.is_activation(a) and g.is_activation(b)):
            continue
        pa, pb = _from_weighted(g, a, quantized), _from_weighted(g, b, quantized)
        if pa is None and pb is None:
            continue  # no Conv+Add fusion to feed
        if pa is not None and pb is not None:
            # Both branches end in a weighted op (e.g. a projection shortcut): the one that
            # finished first is the shortcut; the other fuses with the Add.
            residual = 0 if g.node_index[id(pa)] < g.node_index[id(pb)] else 1
        else:
            residual = 1 if pa is not None else 0
        want(node.input[residual], node, residual)

    if target == "cpu":
        chained_outputs: set[str] = set()
        for tensor, readers in plan.activations.items():
            chain = _integer_chain(g, tensor, readers, quantized)
            if chain is not None:
                plan.chains[tensor] = chain
                chained_outputs.add(chain[0])
        for node in plan.quantized_nodes:
            out = node.output[0]
            if out in g.graph_outputs or out in chained_outputs or _reaches_output_unquantized(g, out, quantized):
                continue  # model outputs stay float; chained outputs reuse the chain end's scale
            if any(c.op_type not in _REQUANTIZABLE_READERS for c in g.consumers.get(out, [])):
                continue  # e.g. SiLU's Sigmoid·Mul: TensorRT fuses it and never rounds that tensor
            plan.activations.setdefault(out, [])
            plan.rewire_all.add(out)
    return plan


#: Readers of a weighted op's output for which the CPU variant requantizes it (ONNX Runtime's
#: QLinearAdd/QLinearConcat/pooling, integer data movement). Before a non-linear float op the
#: extra rounding is one TensorRT never does (it fuses Conv+activation), and on YOLOX-Nano's
#: SiLU layers it halved the F1 of the detections.
_REQUANTIZABLE_READERS = WEIGHTED_OPS | {"Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Reshape",
                                         "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Identity", "Relu",
                                         "Clip", "Pad"}

#: Largest / 10th-percentile channel range at a depthwise Conv input beyond which it stays float.
#: At 8× the 10th-percentile channel of a max-calibrated tensor keeps at most ~16 of 127 levels.
DEPTHWISE_SPREAD_LIMIT = 8.0
_ELEMENTWISE = frozenset({"Relu", "Clip", "Sigmoid", "Mul", "HardSwish", "HardSigmoid", "LeakyRelu", "PRelu", "Pad",
                          "Identity", "Tanh", "Softplus"})


def _channels_too_spread(g: Graph, node: onnx.NodeProto) -> bool:
    if node.op_type != "Conv" or not g.is_constant(node.input[1]):
        return False
    w = g.constant(node.input[1])
    if w is None or w.ndim < 3 or w.shape[1] != 1 or node_attr(node, "group", 1) != w.shape[0] or w.shape[0] < 8:
        return False  # not depthwise
    cur = node.input[0]
    cap = math.inf  # a Clip (ReLU6) on the way caps every channel: only channels below the cap spread
    for _ in range(8):  # back through the activation (e.g. SiLU = x * Sigmoid(x)) to the producing Conv
        prod = g.producer.get(cur)
        if prod is None:
            return False
        if prod.op_type == "Conv":
            break
        if prod.op_type not in _ELEMENTWISE:
            return False
        if prod.op_type == "Clip":
            cap = min(cap, _clip_cap(g, prod))
        cur = prod.input[0]
    else:
        return False
    pw = g.constant(prod.input[1]) if g.is_constant(prod.input[1]) else None
    if pw is None or pw.shape[0] != w.shape[0]:
        return False
    bound = np.abs(pw.astype(np.float64)).reshape(pw.shape[0], -1).sum(axis=1)
    if len(prod.input) > 2 and prod.input[2] and g.is_constant(prod.input[2]):
        bound = bound + np.abs(g.constant(prod.input[2]).astype(np.float64)).reshape(-1)
    bound = np.minimum(bound, cap)
    live = bound[bound > 0]  # a dead channel is exact on any grid
    return bool(live.size and live.max() / np.percentile(live, 10) > DEPTHWISE_SPREAD_LIMIT)


def _clip_cap(g: Graph, clip: onnx.NodeProto) -> float:
    """The largest |value| a Clip lets through (inf when a bound is missing or not a constant)."""
    bounds = []
    for i in (1, 2):
        name = clip.input[i] if len(clip.input) > i else ""
        value = g.constant(name) if name and g.is_constant(name) else None
        if value is None:
            attr = node_attr(clip, ("min", "max")[i - 1])  # opset < 11 keeps the bounds as attributes
            if attr is None:
                return math.inf
            value = np.asarray(attr)
        bounds.append(float(np.abs(value).max()))
    return max(bounds)


def _reaches_output_unquantized(g: Graph, tensor: str, quantized: set[str]) -> bool:
    """Whether ``tensor`` flows into a model output with no quantized weighted op on the way."""
    stack, seen = [tensor], set()
    reaches = False
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in g.graph_outputs:
            reaches = True
        for c in g.consumers.get(t, []):
            if c.op_type in WEIGHTED_OPS and c.name in quantized:
                return False
            stack.extend(o for o in c.output if o)
    return reaches


#: Ops ONNX defines on uint8 that ONNX Runtime runs natively, so a quantized tensor can flow
#: through them without a DQ→op→Q float island (Relu is rewritten as Clip).
_INTEGER_OPS = frozenset(
    {"Relu", "Clip", "Pad", "MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Identity"}
)


def _integer_safe(g: Graph, node: onnx.NodeProto) -> bool:
    if node.op_type not in _INTEGER_OPS:
        return False
    if node.op_type == "Clip":
        return all(not x or g.is_constant(x) for x in node.input[1:])
    if node.op_type == "Pad":
        return (node_attr(node, "mode", b"constant") in (b"constant", "constant")) and all(
            not x or g.is_constant(x) for x in node.input[1:]
        )
    if node.op_type == "MaxPool":
        return len(node.output) == 1 or not node.output[1]
    return True


def _integer_chain(g: Graph, tensor: str, readers, quantized: set[str]):
    """Find weighted op → value-preserving ops → ``tensor`` with nothing else reading the path.

    On the CPU the Q can then move up to the weighted op's output (with ``tensor``'s scale)
    and the ops in between run on uint8. Because those ops are monotone and exact on the
    grid, the numbers equal the TensorRT graph's, and ONNX Runtime fuses a QLinearConv
    instead of leaving a DQ→Clip→Q float island behind every layer.
    """
    if tensor in g.graph_outputs:
        return None
    consumers = g.consumers.get(tensor, [])
    wanted = {(id(n), i) for n, i in readers}
    if not consumers or any((id(c), i) not in wanted for c in consumers for i, x in enumerate(c.input) if x == tensor):
        return None  # a float reader would see dequantized values it does not see on TensorRT
    return _integer_chain_back(g, tensor, quantized)


def _integer_chain_back(g: Graph, tensor: str, quantized: set[str]):
    chain: list[onnx.NodeProto] = []
    cur = tensor
    while True:
        node = g.producer.get(cur)
        if node is None:
            return None
        if node.op_type in WEIGHTED_OPS and node.name in quantized:
            return (cur, list(reversed(chain))) if chain else None
        if not _integer_safe(g, node) or cur in g.graph_outputs:
            return None
        if len(g.consumers.get(node.input[0], [])) != 1:
            return None
        chain.append(node)
        cur = node.input[0]


def activation_tensors_to_quantize(
    model: onnx.ModelProto, exclude: Iterable[str] = (), target: str | None = None
) -> list[str]:
    """Activation tensors that get a Q/DQ pair (and so need an amax), in graph order.

    The default ``target=None`` returns what either target needs (the TensorRT set plus the
    weighted-op outputs the CPU variant requantizes), so one cache lowers for both; pass
    ``"tensorrt"`` or ``"cpu"`` for one target. ``exclude``: node names or fnmatch patterns
    of layers left unquantized. ``model`` is not modified.
    """
    if target is not None and target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    base = _copy(model)
    ensure_node_names(base)
    excluded = match_nodes(base, exclude) if exclude else set()
    base = fold_constants(base)  # lower() folds too; Pad amounts must be constants to plan alike
    excluded &= {n.name for n in base.graph.node}
    wanted: set[str] = set()
    for t in TARGETS if target is None else (target,):
        m = _copy(base)
        if t == "cpu":
            m = fold_batchnorm(m)
            if not exclude:
                # Under any exclusion set the CPU variant may requantize a weighted layer's own
                # output (so ONNX Runtime can fuse it), so a portable cache carries all of them.
                wanted |= {n.output[0] for n in m.graph.node if n.op_type in WEIGHTED_OPS and n.output}
        wanted |= set(build_plan(m, sorted(excluded), t).activations)
    return [name for name in dict.fromkeys(_graph_order(base)) if name in wanted]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _plan_names(model: onnx.ModelProto, exclude, target) -> list[str]:
    return list(build_plan(model, exclude, target).activations)


def _graph_order(model: onnx.ModelProto) -> list[str]:
    names = [i.name for i in model.graph.input]
    for node in model.graph.node:
        names.extend(o for o in node.output if o)
    return names


def activation_scale(amax: float) -> float:
    amax = float(amax)
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"amax must be finite and non-negative, got {amax}")
    # An all-zero tensor is exact on any grid; scale 0 is illegal in QuantizeLinear.
    return amax / _ACT_QMAX if amax > 0 else 1.0


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 [-127, 127] per-channel (or per-tensor when ``axis`` is None)."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max() if w.size else 0.0, dtype=np.float32)
        scale = np.where(amax > 0, amax / _WEIGHT_QMAX, 1.0).astype(np.float32)
        q = np.clip(np.rint(w / scale), -_WEIGHT_QMAX, _WEIGHT_QMAX).astype(np.int8)
        return q, scale
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce_axes) if w.size else np.zeros(w.shape[axis], np.float32)
    # An all-zero channel quantizes to zeros with any scale; 1.0 keeps the division finite.
    scale = np.where(amax > 0, amax / _WEIGHT_QMAX, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -_WEIGHT_QMAX, _WEIGHT_QMAX).astype(np.int8)
    return q, scale


def weights_to_u8(q: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same symmetric grid stored as uint8 with zero point 128 (S8 ``q`` is U8 ``q + 128``).

    ONNX Runtime's x86 U8S8 kernels add pairs of u8×s8 products in int16 (``vpmaddubsw``) on
    CPUs without VNNI, which saturates on full-range activations; its U8U8 kernels widen
    first and are exact on every x86, so the CPU graph computes what TensorRT computes.
    """
    return (q.astype(np.int16) + 128).astype(np.uint8), (zero.astype(np.int16) + 128).astype(np.uint8)


def insert_qdq(
    model: onnx.ModelProto,
    amax: Mapping[str, float],
    exclude: Iterable[str] = (),
    target: str = "tensorrt",
) -> onnx.ModelProto:
    """Return ``model`` (modified in place, opset ≥ 13) with Q/DQ inserted for ``target``."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul") for n in model.graph.node):
        raise ValueError("model is already quantized (it has Q/DQ or QLinear nodes); lower the float model instead")
    model = ensure_opset(model)
    if target == "cpu":
        model = fold_batchnorm(model)
    plan = build_plan(model, exclude, target)
    missing = [t for t in plan.activations if t not in amax]
    if missing:
        raise MissingAmaxError(missing)

    g = Graph(model)
    cpu = target == "cpu"
    act_zp = np.array(128, np.uint8) if cpu else np.array(0, np.int8)
    before: list[onnx.NodeProto] = []  # nodes that depend only on initializers / graph inputs
    after: dict[str, list[onnx.NodeProto]] = {}
    act_scales: dict[str, float] = {}

    for tensor, readers in plan.activations.items():
        scale = activation_scale(amax[tensor])
        act_scales[tensor] = scale
        s_name = g.add_initializer(f"{tensor}_scale", np.array(scale, np.float32))
        z_name = g.add_initializer(f"{tensor}_zero_point", act_zp)
        q_out, dq_out = g.unique(f"{tensor}_quantized"), g.unique(f"{tensor}_dequantized")
        q_in = tensor
        if tensor in plan.chains:
            q_in, chain = plan.chains[tensor]
            last = _chain_to_integer(g, chain, q_out, scale, int(act_zp))
        q_node = helper.make_node("QuantizeLinear", [q_in, s_name, z_name], [q_out], name=g.unique(f"{tensor}_QuantizeLinear"))
        dq_node = helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=g.unique(f"{tensor}_DequantizeLinear"))
        if tensor in plan.chains:
            dq_node.input[0] = last
            after.setdefault(q_in, []).append(q_node)
            after.setdefault(last, []).append(dq_node)
            readers = [(c, i) for c in g.consumers.get(tensor, []) for i, x in enumerate(c.input) if x == tensor]
        elif tensor in g.producer:
            after.setdefault(tensor, []).extend([q_node, dq_node])
        else:
            before.extend([q_node, dq_node])
        if tensor in plan.rewire_all:
            readers = [(c, i) for c in g.consumers.get(tensor, []) for i, x in enumerate(c.input) if x == tensor]
        for consumer, index in readers:
            consumer.input[index] = dq_out

    done: dict[tuple[str, int | None], tuple[str, np.ndarray]] = {}
    for slot in plan.weights:
        name = slot.node.input[slot.index]
        key = (name, slot.axis)
        if key not in done:
            q, scale = quantize_weight(g.constant(name), slot.axis)
            zero = np.zeros(scale.shape, np.int8)
            if cpu:
                q, zero = weights_to_u8(q, zero)
            q_name = g.add_initializer(f"{name}_quantized", q)
            s_name = g.add_initializer(f"{name}_scale", scale)
            z_name = g.add_initializer(f"{name}_zero_point", zero)
            dq_out = g.unique(f"{name}_dequantized")
            attrs = {"axis": slot.axis} if slot.axis is not None else {}
            before.append(
                helper.make_node(
                    "DequantizeLinear", [q_name, s_name, z_name], [dq_out], name=g.unique(f"{name}_DequantizeLinear"), **attrs
                )
            )
            done[key] = (dq_out, scale)
        slot.node.input[slot.index] = done[key][0]

    if cpu:
        _int32_biases(g, plan, act_scales, done, before)

    new_nodes: list[onnx.NodeProto] = list(before)
    for node in g.graph.node:
        new_nodes.append(node)
        for out in node.output:
            new_nodes.extend(after.get(out, ()))
    del g.graph.node[:]
    g.graph.node.extend(new_nodes)
    prune(model)
    return model


def _chain_to_integer(g: Graph, chain, q_in: str, scale: float, zero_point: int) -> str:
    """Make ``chain`` (value-preserving ops) run on the uint8 tensor ``q_in``; returns its end."""

    def q(value) -> np.ndarray:
        v = np.asarray(value, dtype=np.float64)
        return np.clip(np.rint(v / scale) + zero_point, 0, 255).astype(np.uint8)

    cur = q_in
    for node in chain:
        node.input[0] = cur
        old_out = node.output[0]
        node.output[0] = g.unique(f"{old_out}_quantized")
        if node.op_type == "Relu":
            node.op_type = "Clip"
            del node.input[1:]
            node.input.append(g.add_initializer(f"{node.name}_min", q(0.0)))
        elif node.op_type == "Clip":
            lo, hi = (list(node.input[1:]) + ["", ""])[:2]
            del node.input[1:]
            node.input.append(g.add_initializer(f"{node.name}_min", q(g.constant(lo))) if lo else "")
            if hi:
                node.input.append(g.add_initializer(f"{node.name}_max", q(g.constant(hi))))
        elif node.op_type == "Pad":
            pad_value = g.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else 0.0
            while len(node.input) < 3:
                node.input.append("")
            node.input[2] = g.add_initializer(f"{node.name}_constant_value", q(pad_value))
        cur = node.output[0]
    return cur


def _int32_biases(g: Graph, plan: QuantPlan, act_scales, weights, before) -> None:
    """Give Conv/Gemm int32 biases (scale s_x·s_w) so ONNX Runtime forms QLinearConv/QGemm."""
    for node in plan.quantized_nodes:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        x, w, b = node.input[0], node.input[1], node.input[2]
        bias = g.constant(b)
        src_x = next((t for t, r in plan.activations.items() if any(n is node and i == 0 for n, i in r)), None)
        w_entry = next((v for (name, axis), v in weights.items() if v[0] == w), None)
        if bias is None or bias.ndim != 1 or src_x is None or w_entry is None or x == src_x:
            continue
        w_scale = np.broadcast_to(w_entry[1], bias.shape).astype(np.float64)
        scale = (act_scales[src_x] * w_scale).astype(np.float32)
        q = np.rint(bias.astype(np.float64) / scale.astype(np.float64))
        q = np.clip(q, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)
        q_name = g.add_initializer(f"{b}_quantized", q)
        s_name = g.add_initializer(f"{b}_scale", scale)
        z_name = g.add_initializer(f"{b}_zero_point", np.zeros(scale.shape, np.int32))
        dq_out = g.unique(f"{b}_dequantized")
        before.append(
            helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out], name=g.unique(f"{b}_DequantizeLinear"), axis=0)
        )
        node.input[2] = dq_out
