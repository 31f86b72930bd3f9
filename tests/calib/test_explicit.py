"""Pre-quantized (explicit Q/DQ) models: PTQ and QAT exports lowered for both targets, bad Q/DQ refused."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib import explicit, glue
from calib import lower as L
from calib.cache import CalibrationCache
from calib.evaluate import compare_outputs, run_batches
from calib.graph import Graph
from tests.onnx_models import ort_quantize_static

DIGITS = Path(__file__).resolve().parents[2] / "daemon" / "models" / "digits"
MODEL = DIGITS / "1" / "model.onnx"


@pytest.fixture(scope="module")
def batches():
    with np.load(DIGITS / "data" / "heldout.npz") as z:
        x = (z["x"][:256].astype(np.float32) / 16).reshape(-1, 1, 8, 8)
    return [x[i : i + 64] for i in range(0, 256, 64)]


@pytest.fixture(scope="module")
def ptq() -> onnx.ModelProto:
    """The digits model quantized by tegrad for TensorRT (int8 weights + DQ, FP32 glue), as a file would hold it."""
    amax = CalibrationCache.load(DIGITS / "calib.json").amax
    return onnx.load_from_string(L.lower(onnx.load(MODEL), "int8", amax, target="tensorrt", glue="fp32").SerializeToString())


def _qat(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph as a QAT export writes it: float weights → Q → DQ."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = Graph(out)
    nodes = []
    for node in out.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in g.initializers and g.initializers[node.input[0]].data_type == TensorProto.INT8:
            w = explicit._dequantize(g, node)
            name = g.add_initializer(f"{node.input[0]}_float", w)
            q_out = f"{node.input[0]}_qat"
            axis = [a for a in node.attribute if a.name == "axis"]
            nodes.append(helper.make_node("QuantizeLinear", [name, node.input[1], node.input[2]], [q_out],
                                          name=f"{node.name}_Q", **({"axis": axis[0].i} if axis else {})))
            node.input[0] = q_out
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def _dq_inputs(model: onnx.ModelProto, name: str) -> list[str]:
    g = Graph(model)
    node = next(n for n in model.graph.node if n.name == name)
    return [i for i in node.input if i in g.producer and g.producer[i].op_type == "DequantizeLinear"]


@pytest.mark.parametrize("target", ["tensorrt", "cpu"], ids=["trt-target", "cpu-target"])
def test_ptq_export_lowers_on_its_own_grid(ptq, batches, target):
    direct = run_batches(ptq, batches)
    out = L.lower(ptq, "explicit", target=target)
    got = run_batches(out, batches)
    r = compare_outputs(direct, got)
    assert r.top1_agreement >= 0.99 and r.cosine > 0.999, r.as_dict()
    if target == "cpu":
        zps = [Graph(out).initializers[n.input[2]] for n in out.graph.node if n.op_type in explicit.QDQ_OPS]
        assert zps and all(z.data_type == TensorProto.UINT8 for z in zps)
        # Same grid; ORT's optimized float convs round differently, which can flip a requantized
        # value by one step (as TensorRT's kernels could): a few steps at most, never more.
        np.testing.assert_allclose(np.concatenate(got), np.concatenate(direct), atol=0.02 * np.abs(np.concatenate(direct)).max())
    else:
        assert glue.fp32_compute_nodes(out) == []  # FP16 glue around the model's own Q/DQ
    assert L.count_precisions(out)["int8"] == 5


def test_qat_export_becomes_int8_weights_with_the_same_numbers(ptq, batches):
    qat = _qat(ptq)
    out = L.lower(qat, "explicit", target="tensorrt", glue="fp32")
    g = Graph(out)
    weight_dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in g.initializers]
    assert len(weight_dqs) == 5 and all(g.initializers[n.input[0]].data_type == TensorProto.INT8 for n in weight_dqs)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in g.initializers for n in out.graph.node)
    np.testing.assert_allclose(np.concatenate(run_batches(out, batches)), np.concatenate(run_batches(ptq, batches)),
                               rtol=1e-5, atol=1e-5)


def test_quantized_models_are_detected_whatever_the_precision(ptq, caplog):
    with caplog.at_level(logging.WARNING, logger="tegrad.calib.lower"):
        auto = L.lower(ptq, "int8", target="cpu")
    assert "already carries Q/DQ" in caplog.text and "'explicit'" in caplog.text
    assert auto == L.lower(ptq, "explicit", target="cpu")
    with pytest.raises(ValueError, match="needs a model that carries Q/DQ"):
        L.lower(onnx.load(MODEL), "explicit")


def test_exclude_removes_exactly_the_pairs_of_those_layers(ptq, batches):
    layer = "/features/features.3/Conv"
    assert len(_dq_inputs(ptq, layer)) == 2
    out = L.lower(ptq, "explicit", exclude=[layer], target="tensorrt", glue="fp32")
    assert _dq_inputs(out, layer) == []
    others = [n.name for n in ptq.graph.node if n.op_type in ("Conv", "Gemm") and n.name != layer]
    assert all(_dq_inputs(out, n) == _dq_inputs(ptq, n) for n in others)
    assert L.layer_precisions(out)[layer] == "fp32"
    assert L.count_precisions(out) == {"int8": 4, "fp16": 0, "fp32": 1}
    assert compare_outputs(run_batches(ptq, batches), run_batches(out, batches)).top1_agreement >= 0.98
    with pytest.raises(ValueError, match="nope"):
        L.lower(ptq, "explicit", exclude=["nope"])


def _edit(model: onnx.ModelProto, edit) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    edit(out, Graph(out))
    return out


def _first(model, op, weight: bool):
    g = Graph(model)
    return next(n for n in model.graph.node if n.op_type == op and (n.input[0] in g.initializers) == weight)


def _set_init(g: Graph, name: str, value: np.ndarray) -> None:
    g.initializers[name].CopyFrom(numpy_helper.from_array(value, name))


def test_bad_qdq_graphs_are_refused_with_the_node_named(ptq):
    def zero_point(m, g):
        q = _first(m, "QuantizeLinear", weight=False)
        _set_init(g, q.input[2], np.array(3, np.int8))
    q = _first(ptq, "QuantizeLinear", weight=False)
    with pytest.raises(explicit.ExplicitModelError, match=rf"QuantizeLinear '{q.name}': zero point \[3\]; TensorRT needs 0"):
        L.lower(_edit(ptq, zero_point), "explicit")

    def uint8_weights(m, g):
        dq = _first(m, "DequantizeLinear", weight=True)
        _set_init(g, dq.input[0], (numpy_helper.to_array(g.initializers[dq.input[0]]).astype(np.int16) + 128).astype(np.uint8))
        _set_init(g, dq.input[2], np.full(numpy_helper.to_array(g.initializers[dq.input[2]]).shape, 128, np.uint8))
    dq = _first(ptq, "DequantizeLinear", weight=True)
    with pytest.raises(explicit.ExplicitModelError, match=rf"DequantizeLinear '{dq.name}': zero point type uint8; TensorRT needs int8"):
        L.lower(_edit(ptq, uint8_weights), "explicit", target="tensorrt")

    def wrong_axis(m, g):
        dq = _first(m, "DequantizeLinear", weight=True)
        for a in dq.attribute:
            if a.name == "axis":
                a.i = 1
    with pytest.raises(explicit.ExplicitModelError, match=rf"DequantizeLinear '{dq.name}': per-channel weight scales on axis 1"):
        L.lower(_edit(ptq, wrong_axis), "explicit")


@pytest.fixture(scope="module")
def ort_quantized(tmp_path_factory) -> onnx.ModelProto:
    """The digits model quantized by ONNX Runtime's quantize_static, QDQ format, TensorRT-style (symmetric S8)."""
    return ort_quantize_static(MODEL, DIGITS / "data" / "calib.npz", tmp_path_factory.mktemp("ortq") / "digits.qdq.onnx")


@pytest.mark.parametrize("target", ["tensorrt", "cpu"], ids=["trt-target", "cpu-target"])
def test_onnx_runtime_quantize_static_export_lowers_for_both_targets(ort_quantized, batches, target):
    direct = run_batches(ort_quantized, batches)
    out = L.lower(ort_quantized, "explicit", target=target)
    r = compare_outputs(direct, run_batches(out, batches))
    assert r.top1_agreement >= 0.99 and r.cosine > 0.999, r.as_dict()
    # ORT's int32 bias DQs became float biases: TensorRT takes int8 Q/DQ only
    g = Graph(out)
    assert not any(n.op_type == "DequantizeLinear" and g.initializers.get(n.input[0]) is not None
                   and g.initializers[n.input[0]].data_type == TensorProto.INT32 for n in out.graph.node)
    assert L.count_precisions(out)["int8"] == 5
