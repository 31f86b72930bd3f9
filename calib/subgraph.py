"""Run only the part of a graph that differs from a reference graph, fed with the reference's tensors.

Sensitivity analysis builds one candidate graph per layer (the FP32 graph with that layer's Q/DQ,
or with its Q/DQ removed). Everything upstream of the first change computes exactly what the FP32
graph computes, so :func:`changed_region` finds the nodes whose outputs can differ (new or edited
nodes, nodes reading a changed initializer, and everything downstream of those) and
:func:`extract` cuts them out as a graph of their own whose inputs are the unchanged tensors at the
cut. Those inputs come from one FP32 run that keeps every intermediate tensor
(:class:`TensorCache`); the candidate then costs only its affected subgraph.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .evaluate import _feed, session
from .graph import _subgraph_inputs


@dataclass
class Region:
    """The nodes of a candidate that compute ``output`` differently, and the tensors they read at the cut."""

    nodes: list[onnx.NodeProto]
    cut: list[str]
    output: str


def _has_graph_attrs(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


class Baseline:
    """``base`` indexed once for :func:`changed_region`: its nodes and initializers as bytes."""

    def __init__(self, base: onnx.ModelProto):
        self.model = base
        self.nodes = {n.SerializeToString() for n in base.graph.node}
        self.inits = {t.name: t.SerializeToString() for t in base.graph.initializer}
        self.produced = {o for n in base.graph.node for o in n.output} | {i.name for i in base.graph.input}


def changed_region(base: onnx.ModelProto | Baseline, candidate: onnx.ModelProto, output: str) -> Region | None:
    """What of ``candidate`` must run to get ``output``; ``nodes`` is empty when it equals ``base``'s.

    Returns None when the candidate cannot be cut (control flow, or an output the base lacks).
    """
    base = base if isinstance(base, Baseline) else Baseline(base)
    changed: set[str] = set()
    for t in candidate.graph.initializer:
        old = base.inits.get(t.name)
        if old is None or old != t.SerializeToString():
            changed.add(t.name)
    marked: list[onnx.NodeProto] = []
    for node in candidate.graph.node:
        if _has_graph_attrs(node):
            return None  # subgraph bodies read outer tensors implicitly
        if any(i in changed for i in node.input) or node.SerializeToString() not in base.nodes:
            changed.update(o for o in node.output if o)
            marked.append(node)
    if output not in changed:
        return Region([], [], output) if output in base.produced else None
    producer = {o: n for n in marked for o in n.output}
    seen, stack = set(), [output]
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(i for i in node.input if i)
    nodes = [n for n in marked if id(n) in seen]
    inits = {t.name for t in candidate.graph.initializer}
    made = {o for n in nodes for o in n.output}
    cut = []
    for n in nodes:
        for i in n.input:
            if i and i not in made and i not in inits and i not in cut:
                cut.append(i)
    return Region(nodes, cut, output)


def extract(candidate: onnx.ModelProto, region: Region, examples: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The region as a model of its own: inputs are the cut tensors (typed like ``examples``)."""
    needed = {i for n in region.nodes for i in n.input if i}
    for n in region.nodes:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                needed |= _subgraph_inputs(a.g)
    inputs = []
    for name in region.cut:
        value = np.asarray(examples[name])
        dims: list = list(value.shape)
        if dims:
            dims[0] = "batch"  # the last batch of a slice may be shorter
        inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), dims))
    out = next((o for o in candidate.graph.output if o.name == region.output), None)
    outputs = [out] if out is not None else [helper.make_empty_tensor_value_info(region.output)]
    graph = helper.make_graph(
        list(region.nodes),
        f"{candidate.graph.name}_region",
        inputs,
        outputs,
        [t for t in candidate.graph.initializer if t.name in needed],
    )
    model = helper.make_model(graph, opset_imports=list(candidate.opset_import))
    model.ir_version = candidate.ir_version
    model.functions.extend(candidate.functions)
    return model


class TensorCache:
    """One session of ``model`` that also outputs the tensors in ``keep`` (all of them when None)."""

    def __init__(self, model: onnx.ModelProto, keep: Iterable[str] | None = None):
        from .observe import with_outputs

        wanted = None if keep is None else set(keep)
        names = [o for n in model.graph.node for o in n.output if o and (wanted is None or o in wanted)]
        self.session = session(with_outputs(model, names))
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, batches: Iterable) -> list[dict[str, np.ndarray]]:
        """Per batch: graph inputs as fed, then the kept node outputs."""
        result = []
        for batch in batches:
            feed = _feed(self.session, batch)
            values = dict(zip(self.names, self.session.run(self.names, feed), strict=True))
            values.update(feed)
            result.append(values)
        return result


def _lean_session(model: onnx.ModelProto):
    """A CPU session without a memory arena: analysis keeps one per layer alive across chunks."""
    import onnxruntime as ort

    from .ort_exact import keep_exact

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    keep_exact(options, model)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


class RegionRunner:
    """One session for a region, made on first use (a resumed analysis may need only a few)."""

    def __init__(self, candidate: onnx.ModelProto, region: Region, examples: Mapping[str, np.ndarray]):
        self.region = region
        self.model = extract(candidate, region, examples) if region.nodes else None
        self.session = None

    def run(self, tensors: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        if self.model is None and self.session is None:
            return [t[self.region.output] for t in tensors]
        if self.session is None:
            self.session, self.model = _lean_session(self.model), None
        out = self.region.output
        return [self.session.run([out], {c: t[c] for c in self.region.cut})[0] for t in tensors]
