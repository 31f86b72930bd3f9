"""FP16 glue for the TensorRT target: the type census of the digits model, Pad folding, numbers on ORT."""

from __future__ import annotations

from pathlib import Path

import calib_graphs as G
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib import glue, qdq
from calib import lower as L
from calib.cache import CalibrationCache
from calib.evaluate import compare_outputs, run_batches
from calib.graph import Graph, tensor_types

DIGITS = Path(__file__).resolve().parents[2] / "daemon" / "models" / "digits"
MODEL = DIGITS / "1" / "model.onnx"


@pytest.fixture(scope="module")
def digits():
    with np.load(DIGITS / "data" / "heldout.npz") as z:
        x = (z["x"][:256].astype(np.float32) / 16).reshape(-1, 1, 8, 8)
    return onnx.load(MODEL), CalibrationCache.load(DIGITS / "calib.json").amax, [x[i : i + 64] for i in range(0, 256, 64)]


@pytest.mark.parametrize("precision", ["int8", "mixed"])
def test_tensorrt_target_census_has_no_fp32_compute_and_no_pads(digits, precision):
    model, amax, _ = digits
    exclude = ["/features/features.3/Conv"] if precision == "mixed" else []
    out = L.lower(model, precision, amax, exclude=exclude, target="tensorrt")
    census = glue.type_census(out)
    assert glue.fp32_compute_nodes(out) == [] and census.get("Pad", 0) == 0, census
    assert census["fp16"] >= 10
    # I/O as the model declares it, with one Cast at each edge
    types = tensor_types(out)
    assert [types[i.name] for i in out.graph.input] == [TensorProto.FLOAT]
    assert [types[o.name] for o in out.graph.output] == [TensorProto.FLOAT]
    g = Graph(out)
    assert g.producer[out.graph.output[0].name].op_type == "Cast"
    # DQ outputs are FP16 because their scales are: what TensorRT fuses into FP16-in/out INT8 kernels
    for node in out.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert g.initializers[node.input[1]].data_type == TensorProto.FLOAT16, node.name
    assert L.count_precisions(out)["int8"] == (5 if precision == "int8" else 4)


def test_fp32_glue_stays_available_and_the_cpu_target_is_unchanged(digits):
    model, amax, _ = digits
    fp32 = L.lower(model, "int8", amax, target="tensorrt", glue="fp32")
    assert glue.type_census(fp32).get("fp16", 0) == 0 and glue.type_census(fp32)["fp32"] >= 10
    cpu = L.lower(model, "int8", amax, target="cpu")
    assert cpu == L.lower(model, "int8", amax, target="cpu", glue="fp32")
    assert glue.type_census(cpu).get("fp16", 0) == 0
    with pytest.raises(ValueError, match="TensorRT target"):
        L.lower(model, "int8", amax, target="cpu", glue="fp16")


def test_fp16_glue_matches_fp32_glue_on_onnx_runtime(digits):
    model, amax, batches = digits
    ref = run_batches(model, batches)
    a = run_batches(L.lower(model, "int8", amax, target="tensorrt", glue="fp32"), batches)
    b = run_batches(L.lower(model, "int8", amax, target="tensorrt", glue="fp16"), batches)
    glue_vs_glue = compare_outputs(a, b)
    assert glue_vs_glue.top1_agreement >= 0.99 and glue_vs_glue.cosine > 0.999, glue_vs_glue.as_dict()
    assert compare_outputs(ref, b).top1_agreement >= 0.98


def _padded_convs() -> onnx.ModelProto:
    """x → Pad(0, TF SAME) → Conv → Relu → Pad(0) → Conv; and a Pad with value 1 that must stay."""
    rng = np.random.default_rng(0)
    pads_a = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads_a")
    pads_b = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads_b")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    nodes = [
        helper.make_node("Pad", ["x", "pads_a"], ["p0"], name="pad0", mode="constant"),
        helper.make_node("Conv", ["p0", "w0"], ["c0"], name="conv0", strides=[2, 2]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("Pad", ["r0", "pads_b"], ["p1"], name="pad1", mode="constant"),
        helper.make_node("Conv", ["p1", "w1"], ["c1"], name="conv1", pads=[1, 0, 1, 0]),
        helper.make_node("Pad", ["c1", "pads_b", "one"], ["p2"], name="pad_one", mode="constant"),
        helper.make_node("Conv", ["p2", "w2"], ["y"], name="conv2"),
    ]
    inits = [G._w("w0", [4, 3, 3, 3], rng), G._w("w1", [4, 4, 3, 3], rng), G._w("w2", [2, 4, 3, 3], rng),
             pads_a, pads_b, one]
    return G._model(nodes, [G._x("x", ["N", 3, 9, 9])], [G._x("y", ["N", 2, None, None])], inits)


def test_zero_pads_fold_into_the_next_conv_through_qdq():
    model = _padded_convs()
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 9)).astype(np.float32)
    amax = G.observe_amax(model, x, qdq.activation_tensors_to_quantize(model, target="tensorrt"))
    out = L.lower(model, "int8", amax, target="tensorrt", glue="fp32")
    ops = {n.name: n for n in out.graph.node}
    assert "pad0" not in ops and "pad1" not in ops and "pad_one" in ops  # a pad value of 1 is not a Conv's
    attr = {n: {a.name: helper.get_attribute_value(a) for a in ops[n].attribute} for n in ("conv0", "conv1")}
    assert attr["conv0"]["pads"] == [0, 0, 1, 1] and attr["conv1"]["pads"] == [2, 1, 2, 1]
    unfolded = qdq.insert_qdq(_padded_convs(), amax, target="tensorrt")
    np.testing.assert_allclose(G.run(out, x)[0], G.run(unfolded, x)[0], rtol=1e-5, atol=1e-5)


def test_fold_leaves_pads_that_do_not_commute():
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode="reflect"),
        helper.make_node("Conv", ["p", "w"], ["y"], name="conv"),
    ]
    model = G._model(nodes, [G._x("x", [1, 3, 6, 6])], [G._x("y", [1, 2, 6, 6])],
                     [G._w("w", [2, 3, 3, 3], rng), numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")])
    assert glue.fold_zero_pads(model) == 0 and [n.op_type for n in model.graph.node] == ["Pad", "Conv"]


def test_weights_behind_a_raised_fp16_scale_are_requantized_onto_it():
    """A near-dead channel (weights 1e-7, scale 8e-10) needs a scale FP16 cannot hold: the weights follow it."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    w[1] = 1e-7 * np.sign(rng.standard_normal((3, 3, 3)))
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = G._model(nodes, [G._x("x", ["N", 3, 6, 6])], [G._x("y", ["N", 4, 6, 6])],
                     [numpy_helper.from_array(w, "w")])
    x = (rng.standard_normal((4, 3, 6, 6)) * 4).astype(np.float32)
    amax = G.observe_amax(model, x, qdq.activation_tensors_to_quantize(model, target="tensorrt"))
    out = L.lower(model, "int8", amax, target="tensorrt", glue="fp16")
    g = Graph(out)
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and g.is_constant(n.input[0]))
    scale = g.constant(dq.input[1]).astype(np.float32)
    assert scale.dtype == np.float32 and g.initializers[dq.input[1]].data_type == TensorProto.FLOAT16
    assert scale[1] == np.float32(np.finfo(np.float16).tiny)  # raised to FP16's smallest normal
    dequantized = g.constant(dq.input[0]).astype(np.float32) * scale.reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(dequantized[1], w[1], atol=float(np.finfo(np.float16).tiny) / 2)
    y16 = G.run(out, x)[0].astype(np.float32)
    y32 = G.run(L.lower(model, "int8", amax, target="tensorrt", glue="fp32"), x)[0]
    assert np.abs(y16[:, 1] - y32[:, 1]).max() < 1e-3  # the dead channel stays dead
    assert compare_outputs([y32], [y16]).cosine > 0.999


def test_tensorrt_emulation_rounds_only_what_the_fused_int8_kernels_write(digits):
    model, amax, batches = digits
    fp16 = L.lower(model, "int8", amax, target="tensorrt", glue="fp16")
    emulated = glue.emulate_tensorrt(fp16)
    assert all(t.data_type != TensorProto.FLOAT16 for t in emulated.graph.initializer)
    assert TensorProto.FLOAT16 not in {t for n, t in tensor_types(emulated).items()
                                       if not n.endswith("_rounded")}  # FP16 only between a round trip's Casts
    g16, ge = Graph(fp16), Graph(emulated)
    rounded = {n.output[0] for n in emulated.graph.node if n.name.endswith("_widen")}
    for node in fp16.graph.node:
        if node.op_type != "Conv":
            continue
        # Conv → (Add) → Relu → Q is one INT8 kernel: nothing before its end is written in FP16
        cur = node.output[0]
        while [r.op_type for r in g16.consumers[cur]] in (["Add"], ["Relu"]):
            assert cur not in rounded, cur
            cur = g16.consumers[cur][0].output[0]
        readers = {r.op_type for r in ge.consumers[cur]}
        assert (cur in rounded) == (readers != {"QuantizeLinear"}), (cur, readers)
    assert {fp16.graph.input[0].name + "_fp16", fp16.graph.output[0].name + "_fp16"} <= rounded
    ref = run_batches(L.lower(model, "int8", amax, target="tensorrt", glue="fp32"), batches)
    assert compare_outputs(ref, run_batches(emulated, batches)).cosine > 0.999
