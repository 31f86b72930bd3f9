"""FP16 lowering keeps FP32 I/O and the range-sensitive ops in FP32."""

from __future__ import annotations

import calib_graphs as G
import numpy as np
import onnx
from onnx import TensorProto

from calib import lower as L
from calib.graph import Graph


def _types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.input})
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


def test_fp16_keeps_io_fp32_and_blocklisted_ops_fp32():
    model = G.softmax_head()
    out = L.lower(model, "fp16")
    assert out.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    types = _types(out)
    g = Graph(out)
    by_name = {n.name: n for n in out.graph.node}
    conv = by_name["conv0"]
    assert types[conv.input[1]] == TensorProto.FLOAT16  # weights stored in fp16
    assert types[conv.input[0]] == TensorProto.FLOAT16
    for name in ("exp", "rsum", "softmax"):
        assert types[by_name[name].input[0]] == TensorProto.FLOAT, name
    assert any(n.op_type == "Cast" for n in g.graph.node)
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(G.run(out, x)[0], G.run(model, x)[0], rtol=0.02, atol=1e-3)
    assert L.count_precisions(out) == {"int8": 0, "fp16": 1, "fp32": 0}


def test_fp16_node_exclusion_keeps_that_layer_fp32():
    model = G.residual()
    out = L.lower(model, "fp16", exclude=["conv3"])
    assert L.layer_precisions(out) == {"conv0": "fp16", "conv1": "fp16", "conv2": "fp16", "conv3": "fp32"}
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    ref = G.run(model, x)[0]
    np.testing.assert_allclose(G.run(out, x)[0], ref, atol=0.01 * np.abs(ref).max())
