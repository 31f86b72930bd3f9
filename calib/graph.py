"""Small ONNX graph utilities shared by the lowering passes (Q/DQ, FP16, sensitivity)."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .files import fsync_dir

#: Ops whose weights we quantize and whose precision ``count_precisions`` reports.
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

#: Per-axis QuantizeLinear/DequantizeLinear first appear in opset 13.
MIN_QDQ_OPSET = 13


def load(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Return a private copy of ``model`` (a ModelProto or a path), external data loaded."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    return onnx.load(str(model))


def data_input(model: onnx.ModelProto, input_name: str | None = None, what: str = "the model") -> tuple[str, int]:
    """The input the data feeds (``input_name``, or the only non-initializer input) and its fixed
    batch (0 when the first dimension is dynamic). ``what`` names the model in the error."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if input_name is None:
        if len(inputs) != 1:
            raise ValueError(f"{what} has inputs {[i.name for i in inputs]}: choose one with --input-name")
        input_name = inputs[0].name
    dims = next((i.type.tensor_type.shape.dim for i in inputs if i.name == input_name), [])
    fixed = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else 0
    return input_name, max(fixed, 0)


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def ensure_opset(model: onnx.ModelProto, minimum: int = MIN_QDQ_OPSET) -> onnx.ModelProto:
    """Upgrade the default-domain opset to ``minimum`` when it is older; otherwise return it as is."""
    if opset_version(model) >= minimum:
        return model
    ir_version = model.ir_version
    converted = onnx.version_converter.convert_version(model, minimum)
    # The converter stamps the newest IR version onnx knows, which older ONNX Runtime
    # and TensorRT parsers refuse; opset 13 only needs IR 7.
    converted.ir_version = max(ir_version, 7)
    return converted


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - shape info is an optimisation here, never a requirement
        return model


class Graph:
    """Index over one ``GraphProto``: producers, consumers, constants, unique names.

    The index is built once; passes that edit the graph call :meth:`reindex` afterwards.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self._names: set[str] = set()
        self.reindex()

    def reindex(self) -> None:
        g = self.graph
        self.initializers = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.node_index: dict[int, int] = {}
        for i, node in enumerate(g.node):
            self.node_index[id(node)] = i
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers.setdefault(inp, []).append(node)
        self.graph_inputs = {v.name for v in g.input} - set(self.initializers)
        self.graph_outputs = {v.name for v in g.output}
        self._names = set(self.initializers) | set(self.producer) | self.graph_inputs
        self._names |= {n.name for n in g.node if n.name}
        self._names |= {v.name for v in g.value_info}

    def unique(self, base: str) -> str:
        """A tensor/node name not yet used in the graph (and reserve it)."""
        name = base
        i = 1
        while name in self._names:
            name = f"{base}_{i}"
            i += 1
        self._names.add(name)
        return name

    def constant(self, name: str) -> np.ndarray | None:
        """Value of ``name`` when it is an initializer or the output of a Constant node."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name in ("value_float", "value_int"):
                    return np.array(helper.get_attribute_value(attr))
                if attr.name in ("value_floats", "value_ints"):
                    return np.array(helper.get_attribute_value(attr))
        return None

    def is_constant(self, name: str) -> bool:
        if name in self.initializers:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant"

    def is_activation(self, name: str) -> bool:
        """A runtime float tensor: produced by a non-Constant node or a real graph input."""
        return bool(name) and not self.is_constant(name) and (name in self.producer or name in self.graph_inputs)

    def add_initializer(self, base: str, value: np.ndarray) -> str:
        name = self.unique(base)
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        return name

    def weighted_nodes(self) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if n.op_type in WEIGHTED_OPS]


def node_attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every unnamed node a stable name (exclusions and reports refer to nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            base = f"{node.op_type}_{i}"
            name = base
            k = 1
            while name in used:
                name = f"{base}_{k}"
                k += 1
            node.name = name
            used.add(name)


def match_nodes(model: onnx.ModelProto, patterns: Iterable[str]) -> set[str]:
    """Node names matched by exact names or fnmatch patterns; an unmatched pattern is an error."""
    names = [n.name for n in model.graph.node if n.name]
    matched: set[str] = set()
    unmatched = []
    for pattern in patterns:
        hits = {pattern} if pattern in names else set(fnmatch.filter(names, pattern))
        if not hits:
            unmatched.append(pattern)
        matched |= hits
    if unmatched:
        raise ValueError(
            "exclude pattern(s) match no node in the model: "
            + ", ".join(repr(p) for p in unmatched)
            + " (use exact node names or fnmatch patterns such as '/_blocks.0/*')"
        )
    return matched


def save_atomic(model: onnx.ModelProto, dst: str | os.PathLike) -> Path:
    """Write ``model`` to a temp name in the same folder, fsync it, then rename over ``dst``."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(dst.parent)
    return dst


#: Never folded: their value is not a function of their inputs alone.
_NOT_FOLDABLE = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"})


def fold_constants(model: onnx.ModelProto, max_elements: int = 1 << 20, keep_ops: Iterable[str] = ()) -> onnx.ModelProto:
    """Evaluate nodes whose inputs are all constants and store their results as initializers.

    Exporters leave shape arithmetic (e.g. TF "SAME" padding as ConstantOfShape/Concat/Slice/
    Cast chains feeding Pad) as nodes; folding turns those Pad amounts into initializers so
    later passes can tell a plain zero Pad. Results larger than ``max_elements`` stay nodes, and
    so do nodes of ``keep_ops`` (an explicit model's weight DQs must stay DQs).
    """
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    g = Graph(model)
    values: dict[str, np.ndarray] = {}
    overridable = {i.name for i in graph.input}  # IR < 4: an initializer a feed may replace
    for name in g.initializers:
        if name not in overridable:
            values[name] = None  # type: ignore[assignment]  # loaded lazily
    folded: list[onnx.NodeProto] = []
    kept: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    opset = [helper.make_opsetid(i.domain, i.version) for i in model.opset_import]
    not_foldable = _NOT_FOLDABLE | set(keep_ops)
    for node in graph.node:
        inputs = [i for i in node.input if i]
        foldable = (
            node.domain in ("", "ai.onnx")
            and node.op_type not in not_foldable
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
            and all(i in values for i in inputs)
            and node.output
        )
        if not foldable:
            kept.append(node)
            continue
        feeds = {}
        for i in inputs:
            if values[i] is None:
                values[i] = numpy_helper.to_array(g.initializers[i])
            feeds[i] = values[i]
        try:
            sub = helper.make_graph(
                [node], "fold", [], [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]
            )
            ref = ReferenceEvaluator(helper.make_model(sub, opset_imports=opset))
            outs = ref.run(None, feeds)
        except Exception:  # noqa: BLE001 - anything the reference runtime cannot do stays a node
            kept.append(node)
            continue
        if any(np.asarray(o).size > max_elements for o in outs):
            kept.append(node)
            continue
        for name, value in zip([o for o in node.output if o], outs, strict=False):
            value = np.asarray(value)
            values[name] = value
            new_inits.append(numpy_helper.from_array(value, name))
        folded.append(node)
    if not folded:
        return model
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    prune(model)
    return model


def prune(model: onnx.ModelProto) -> None:
    """Drop nodes and initializers nothing reads any more (e.g. float weights replaced by int8)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output) or node.op_type in ("If", "Loop", "Scan"):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    needed.update(_subgraph_inputs(attr.g))
    keep.reverse()
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    before = {t.name for t in graph.initializer}
    inits = [t for t in graph.initializer if t.name in needed]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
    # Old (IR < 4) graphs also list initializers as inputs: drop those with their initializer.
    dropped = before - {t.name for t in inits}
    for vi in [i for i in graph.input if i.name in dropped]:
        graph.input.remove(vi)
    produced = {o for n in keep for o in n.output}
    vinfo = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(vinfo)


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        names.update(i for i in node.input if i)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= _subgraph_inputs(attr.g)
    return names


def fold_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold inference BatchNormalization into the Conv/ConvTranspose that alone feeds it.

    Only for the ONNX Runtime variant: TensorRT fuses BN itself and wants the original graph.
    The fused layer takes the BN's output name, so calibration names downstream still match.
    """
    g = Graph(model)
    removed: set[int] = set()
    for bn in list(g.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        conv = g.producer.get(bn.input[0])
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or len(g.consumers.get(bn.input[0], [])) != 1:
            continue
        if bn.input[0] in g.graph_outputs:
            continue
        params = [g.constant(n) for n in bn.input[1:5]]
        w = g.constant(conv.input[1])
        b = g.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if any(p is None for p in params) or w is None or (len(conv.input) > 2 and conv.input[2] and b is None):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        factor = gamma / np.sqrt(var + float(node_attr(bn, "epsilon", 1e-5)))
        group = int(node_attr(conv, "group", 1))
        if conv.op_type == "Conv":
            shape = [-1] + [1] * (w.ndim - 1)
            new_w = w.astype(np.float64) * factor.reshape(shape)
        else:  # ConvTranspose weight is [C_in, C_out/group, ...]
            per_group = w.shape[1]
            f = factor.reshape(group, per_group)
            new_w = w.astype(np.float64).reshape(group, w.shape[0] // group, per_group, *w.shape[2:])
            new_w = (new_w * f.reshape(group, 1, per_group, *([1] * (w.ndim - 2)))).reshape(w.shape)
        bias = np.zeros(factor.shape, np.float64) if b is None else b.astype(np.float64)
        new_b = (bias - mean) * factor + beta
        w_name = g.add_initializer(f"{conv.input[1]}_bn_folded", new_w.astype(w.dtype))
        b_name = g.add_initializer(f"{conv.name}_bias_bn_folded", new_b.astype(w.dtype))
        conv.input[1] = w_name
        if len(conv.input) > 2:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        conv.output[0] = bn.output[0]
        removed.add(id(bn))
    if removed:
        keep = [n for n in g.graph.node if id(n) not in removed]
        del g.graph.node[:]
        g.graph.node.extend(keep)
        prune(model)
    return model


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every typed tensor (inputs, values, outputs, initializers) after shape inference."""
    inferred = infer_shapes(model)
    types: dict[str, int] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in inferred.graph.initializer:
        types[init.name] = init.data_type
    return types
