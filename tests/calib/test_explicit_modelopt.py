"""Pre-quantized models in NVIDIA ModelOpt's ONNX PTQ convention, made here without ModelOpt.

``modelopt.onnx.quantization.quantize`` (0.47, INT8, default ``high_precision_dtype="fp16"``)
writes opset 19; weights as FP16 initializers → QuantizeLinear → DequantizeLinear, per output
channel on axis 0; activations per tensor; FP16 scales, int8 zero points 0; FP16 glue between a
Cast after the FP32 input and a Cast before the FP32 output. With ``high_precision_dtype="fp32"``
the same graph keeps FP32 weights, scales and glue. bench/modelopt_interop.py runs the real tool.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib import explicit, glue
from calib import lower as L
from calib.cache import CalibrationCache
from calib.evaluate import compare_outputs, run_batches
from calib.graph import Graph, tensor_types
from calib.ort_exact import FUSION_KEY
from tests.calib import test_explicit
from tests.calib.test_explicit import DIGITS, MODEL, _qat

batches = test_explicit.batches  # the digits held-out fixture, shared


@pytest.fixture(scope="module")
def modelopt_fp16() -> onnx.ModelProto:
    """The digits model in ModelOpt's default form: QAT-style FP16 weights + Q/DQ, FP16 scales and glue."""
    amax = CalibrationCache.load(DIGITS / "calib.json").amax
    ptq = L.lower(onnx.load(MODEL), "int8", amax, target="tensorrt", glue="fp32")
    model = glue.to_fp16_glue(_qat(ptq))
    g = Graph(model)
    weight_qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in g.initializers]
    assert len(weight_qs) == 5 and all(g.initializers[n.input[0]].data_type == TensorProto.FLOAT16 for n in weight_qs)
    assert all(g.initializers[n.input[1]].data_type == TensorProto.FLOAT16 for n in weight_qs)
    assert [n.op_type for n in (model.graph.node[0], model.graph.node[-1])] == ["Cast", "Cast"]
    return onnx.load_from_string(model.SerializeToString())


def _unfused(model: onnx.ModelProto, batches) -> np.ndarray:
    """DQ → float op → Q, without ONNX Runtime's integer kernels: the graph's own arithmetic."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x})[0] for x in batches])


def test_fp16_glue_becomes_fp32_on_the_cpu_target_on_the_same_grid(modelopt_fp16, batches):
    cpu = L.lower(modelopt_fp16, "explicit", target="cpu")
    types = tensor_types(cpu)
    assert TensorProto.FLOAT16 not in types.values()
    assert {i.name: i.type.tensor_type.elem_type for i in [*cpu.graph.input, *cpu.graph.output]} == \
        {"input": TensorProto.FLOAT, "logits": TensorProto.FLOAT}
    zps = [Graph(cpu).initializers[n.input[2]] for n in cpu.graph.node if n.op_type in explicit.QDQ_OPS]
    assert zps and all(z.data_type == TensorProto.UINT8 for z in zps)
    assert L.count_precisions(cpu)["int8"] == 5

    # The U8 grid is the signed grid moved by 128: unfused, it computes exactly what the
    # TensorRT-form graph with FP32 glue computes.
    signed = L.lower(modelopt_fp16, "explicit", target="tensorrt", glue="fp32")
    assert TensorProto.FLOAT16 not in tensor_types(signed).values()
    np.testing.assert_array_equal(_unfused(cpu, batches), _unfused(signed, batches))

    # Sessions made the way the daemon's engine and calib make them (keep_exact) run it unfused:
    # TensorRT-placed Q/DQ leave ONNX Runtime few kernels to fuse, and those round differently.
    assert {p.key: p.value for p in cpu.metadata_props}[FUSION_KEY] == "off"
    served_like = run_batches(cpu, batches)
    np.testing.assert_array_equal(np.concatenate(served_like), _unfused(signed, batches))

    # Against the file as it is (FP16 between ops): FP16 rounding apart, the same answers.
    direct = run_batches(modelopt_fp16, batches)
    r = compare_outputs(direct, served_like)
    assert r.top1_agreement >= 0.99 and r.cosine > 0.999, r.as_dict()


def test_tensorrt_target_keeps_fp16_glue_by_default(modelopt_fp16):
    out = L.lower(modelopt_fp16, "explicit", target="tensorrt")
    assert glue.fp32_compute_nodes(out) == []
    assert TensorProto.FLOAT16 in tensor_types(out).values()


def test_widening_keeps_fp16_model_inputs_and_outputs():
    # direct_io_types=True: the FP16 graph's own inputs and outputs are FP16.
    nodes = [helper.make_node("Mul", ["x", "k"], ["m"]), helper.make_node("Relu", ["m"], ["y"]),
             helper.make_node("Cast", ["m"], ["m32"], to=TensorProto.FLOAT16)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 3]),
         helper.make_tensor_value_info("m32", TensorProto.FLOAT16, [2, 3])],
        [numpy_helper.from_array(np.array(1.5, np.float16), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    wide = explicit.to_fp32_glue(onnx.load_from_string(model.SerializeToString()))
    onnx.checker.check_model(wide, full_check=True)
    types = tensor_types(wide)
    assert types["x"] == types["y"] == types["m32"] == TensorProto.FLOAT16
    assert types["m"] == types["k"] == TensorProto.FLOAT
    x = np.array([[-1, 0.5, 2], [3, -4, 0.25]], np.float16)
    got = ort.InferenceSession(wide.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_array_equal(got[0], np.maximum(x * np.float16(1.5), 0))
    np.testing.assert_array_equal(got[1], x * np.float16(1.5))


def test_qat_weights_fold_onto_the_grid_quantize_linear_gives():
    """QuantizeLinear divides in float32; float64 puts some weights one level off (ties)."""
    rng = np.random.default_rng(3)
    scale = np.float32(0.0123)
    w = ((rng.integers(-120, 120, 4096) + 0.5) * scale).astype(np.float32)  # near ties: where the two differ
    w = w + rng.choice([-1, 0, 1], w.size).astype(np.float32) * np.spacing(w)
    f32 = np.rint(w / scale)
    f64 = np.rint(w.astype(np.float64) / np.float64(scale))
    assert (f32 != f64).any()  # the case this test is about is in the data
    weight = w.reshape(64, 64)
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], name="wQ"),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wdq"], name="wDQ"),
             helper.make_node("Gemm", ["x", "wdq"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array(scale), "s"),
         numpy_helper.from_array(np.array(0, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    q_only = helper.make_model(helper.make_graph(
        nodes[:1], "q", [], [helper.make_tensor_value_info("wq", TensorProto.INT8, [64, 64])], list(graph.initializer)),
        opset_imports=[helper.make_opsetid("", 19)])
    want = ort.InferenceSession(q_only.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]

    out = explicit.normalize(onnx.load_from_string(model.SerializeToString()))
    g = Graph(out)
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    np.testing.assert_array_equal(g.constant(dq.input[0]), want)
