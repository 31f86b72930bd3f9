"""Q/DQ placement by TensorRT's rules, checked on small graphs built here."""

from __future__ import annotations

import calib_graphs as G
import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from calib import qdq
from calib.graph import Graph


def _lower(model, x, target="tensorrt", exclude=()):
    tensors = qdq.activation_tensors_to_quantize(model, exclude=exclude)
    amax = G.observe_amax(model, x, tensors)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    out = qdq.insert_qdq(copy, amax, exclude=exclude, target=target)
    onnx.checker.check_model(out, full_check=True)
    return out, amax


def _dq_feeding(g: Graph, node_name: str, index: int) -> onnx.NodeProto | None:
    node = next(n for n in g.graph.node if n.name == node_name)
    prod = g.producer.get(node.input[index])
    return prod if prod is not None and prod.op_type == "DequantizeLinear" else None


def _init(g: Graph, name: str) -> np.ndarray:
    return numpy_helper.to_array(g.initializers[name])


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _check_activation_qdq(g: Graph, dq: onnx.NodeProto, source: str, amax: float, zp_type=np.int8, zp=0):
    q = g.producer[dq.input[0]]
    assert q.op_type == "QuantizeLinear"
    assert q.input[0] == source
    scale = _init(g, q.input[1])
    zero = _init(g, q.input[2])
    assert scale.shape == () and zero.shape == ()
    assert zero.dtype == zp_type and int(zero) == zp
    assert np.isclose(float(scale), amax / 127, rtol=1e-6)
    assert _attr(q, "axis") is None and _attr(dq, "axis") is None


def _check_weight_dq(g: Graph, dq: onnx.NodeProto, w_float: np.ndarray, axis: int):
    q_w = _init(g, dq.input[0])
    scale = _init(g, dq.input[1])
    zero = _init(g, dq.input[2])
    assert q_w.dtype == np.int8 and zero.dtype == np.int8 and not zero.any()
    assert q_w.min() >= -127 and q_w.max() <= 127
    assert _attr(dq, "axis") == axis
    assert scale.shape == (w_float.shape[axis],)
    reduce = tuple(i for i in range(w_float.ndim) if i != axis)
    np.testing.assert_allclose(scale, np.abs(w_float).max(axis=reduce) / 127, rtol=1e-6)
    assert (np.abs(q_w).max(axis=reduce) == 127).all()  # each channel uses its full range


def test_conv_bn_relu_maxpool_placement():
    model = G.conv_bn_relu()
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    tensors = qdq.activation_tensors_to_quantize(model, target="tensorrt")
    # conv inputs only; the pool output is quantized right in front of conv2, nothing on c1/bn/r1
    assert tensors == ["x", "p1"]
    out, amax = _lower(model, x)
    g = Graph(out)
    w1 = _init(Graph(model), "w1")
    _check_activation_qdq(g, _dq_feeding(g, "conv1", 0), "x", amax["x"])
    _check_weight_dq(g, _dq_feeding(g, "conv1", 1), w1, axis=0)
    _check_activation_qdq(g, _dq_feeding(g, "conv2", 0), "p1", amax["p1"])
    _check_weight_dq(g, _dq_feeding(g, "conv2", 1), _init(Graph(model), "w2"), axis=0)
    # bias stays float, BN and Relu are left for TensorRT to fuse
    conv1 = next(n for n in out.graph.node if n.name == "conv1")
    assert g.initializers[conv1.input[2]].data_type == TensorProto.FLOAT
    assert [n.op_type for n in out.graph.node].count("QuantizeLinear") == 2
    for name in ("c1", "bn", "r1", "y"):
        assert all(c.op_type != "QuantizeLinear" for c in g.consumers.get(name, []))
    assert all(imp.version >= 13 for imp in out.opset_import if imp.domain == "")
    ref = G.run(model, x)[0]
    got = G.run(out, x)[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_residual_add_quantizes_the_skip_input_only():
    model = G.residual()
    tensors = qdq.activation_tensors_to_quantize(model, target="tensorrt")
    assert set(tensors) == {"x", "a", "r1", "r2"}
    x = np.random.default_rng(2).standard_normal((2, 3, 6, 6)).astype(np.float32)
    out, amax = _lower(model, x)
    g = Graph(out)
    add = next(n for n in out.graph.node if n.name == "add")
    # b comes straight from conv2 (fuses as Conv+Add); a is the residual and shares conv1's pair
    assert add.input[0] == "b"
    skip_dq = g.producer[add.input[1]]
    assert skip_dq.op_type == "DequantizeLinear"
    assert skip_dq is _dq_feeding(g, "conv1", 0)
    _check_activation_qdq(g, skip_dq, "a", amax["a"])
    assert [n.op_type for n in out.graph.node].count("QuantizeLinear") == 4
    ref, got = G.run(model, x)[0], G.run(out, x)[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_gemm_and_matmul_weight_axes():
    model = G.gemm_matmul()
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    out, amax = _lower(model, x)
    g, g0 = Graph(out), Graph(model)
    assert qdq.activation_tensors_to_quantize(model, target="tensorrt") == ["x", "r", "m"]
    _check_weight_dq(g, _dq_feeding(g, "fc1", 1), _init(g0, "wg"), axis=0)  # transB=1: [N, K]
    _check_weight_dq(g, _dq_feeding(g, "matmul", 1), _init(g0, "wm"), axis=1)  # [K, N]: last axis
    _check_weight_dq(g, _dq_feeding(g, "fc2", 1), _init(g0, "wt"), axis=1)  # transB=0: [K, N]
    for name, index, src in (("fc1", 0, "x"), ("matmul", 0, "r"), ("fc2", 0, "m")):
        _check_activation_qdq(g, _dq_feeding(g, name, index), src, amax[src])
    fc1 = next(n for n in out.graph.node if n.name == "fc1")
    assert g.initializers[fc1.input[2]].data_type == TensorProto.FLOAT
    ref, got = G.run(model, x)[0], G.run(out, x)[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_conv_transpose_weight_axis_1():
    model = G.conv_transpose()
    x = np.random.default_rng(4).standard_normal((1, 3, 5, 5)).astype(np.float32)
    out, amax = _lower(model, x)
    g = Graph(out)
    _check_weight_dq(g, _dq_feeding(g, "deconv", 1), _init(Graph(model), "wt"), axis=1)
    _check_activation_qdq(g, _dq_feeding(g, "deconv", 0), "r0", amax["r0"])
    ref, got = G.run(model, x)[0], G.run(out, x)[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("build", [G.conv_bn_relu, G.residual, G.conv_transpose, G.gemm_matmul])
def test_cpu_variant_is_u8_on_the_same_grid(build):
    model = build()
    shape = [d.dim_value or 2 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    tensors = qdq.activation_tensors_to_quantize(model)
    amax = G.observe_amax(model, x, tensors)
    s8 = qdq.insert_qdq(build(), amax, target="tensorrt")
    u8 = qdq.insert_qdq(build(), amax, target="cpu")
    onnx.checker.check_model(u8, full_check=True)
    g = Graph(u8)
    for node in u8.graph.node:
        if node.op_type == "QuantizeLinear":
            zp = _init(g, node.input[2])
            assert zp.dtype == np.uint8 and int(zp) == 128
            assert np.isclose(float(_init(g, node.input[1])), amax[_q_source(g, node, tensors)] / 127, rtol=1e-6)
        weight = g.initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight is not None and weight.data_type != TensorProto.INT32:
            # weights: per-channel on TensorRT's symmetric grid, stored U8 + 128 (exact U8U8 kernels)
            assert weight.data_type == TensorProto.UINT8 and _attr(node, "axis") is not None
            zero = _init(g, node.input[2])
            assert zero.dtype == np.uint8 and (zero == 128).all()
            q_w = _init(g, node.input[0]).astype(np.int16) - 128
            reduce = tuple(i for i in range(q_w.ndim) if i != _attr(node, "axis"))
            assert q_w.min() >= -127 and (np.abs(q_w).max(axis=reduce) == 127).all()
    ref, a, b = G.run(model, x)[0], G.run(s8, x)[0], G.run(u8, x)[0]
    # same grid: the U8 graph reproduces the S8 graph up to rounding of the requantized outputs
    scale = np.abs(ref).max()
    assert np.abs(a - b).max() < 0.02 * scale
    assert np.abs(b - ref).max() < 0.05 * scale


def _q_source(g: Graph, q: onnx.NodeProto, tensors) -> str:
    # a Q's scale name is "<tensor>_scale"
    name = q.input[1]
    assert name.endswith("_scale")
    base = name[: -len("_scale")]
    assert base in tensors
    return base


def test_cpu_variant_moves_relu_into_uint8_and_matches_s8_exactly():
    model = G.residual()
    x = np.random.default_rng(6).standard_normal((2, 3, 6, 6)).astype(np.float32)
    amax = G.observe_amax(model, x, qdq.activation_tensors_to_quantize(model))
    s8 = qdq.insert_qdq(G.residual(), amax, target="tensorrt")
    u8 = qdq.insert_qdq(G.residual(), amax, target="cpu")
    # conv1 → Relu → conv2 runs as QLinearConv → Clip(uint8) → QLinearConv: no float island
    clip = next(n for n in u8.graph.node if n.name == "relu1")
    assert clip.op_type == "Clip"
    g = Graph(u8)
    assert int(_init(g, clip.input[1])) == 128
    assert g.producer[clip.input[0]].op_type == "QuantizeLinear"
    ref = G.run(model, x)[0]
    # Only the Add output (a requantized QLinearAdd on the CPU) may differ by rounding.
    np.testing.assert_allclose(G.run(u8, x)[0], G.run(s8, x)[0], atol=0.02 * np.abs(ref).max())


def test_missing_amax_names_the_tensors():
    model = G.residual()
    with pytest.raises(qdq.MissingAmaxError) as err:
        qdq.insert_qdq(model, {"x": 1.0, "a": 1.0})
    assert "'r1'" in str(err.value) and "'r2'" in str(err.value)
    assert set(err.value.tensors) == {"r1", "r2"}


def test_exclude_skips_layers_and_their_amax():
    model = G.residual()
    tensors = qdq.activation_tensors_to_quantize(model, exclude=["conv3"], target="tensorrt")
    assert "r2" not in tensors
    x = np.random.default_rng(7).standard_normal((1, 3, 6, 6)).astype(np.float32)
    amax = G.observe_amax(model, x, tensors)
    out = qdq.insert_qdq(G.residual(), amax, exclude=["conv3"])
    g = Graph(out)
    assert _dq_feeding(g, "conv3", 0) is None and _dq_feeding(g, "conv3", 1) is None
    with pytest.raises(ValueError, match="nope"):
        qdq.activation_tensors_to_quantize(model, exclude=["nope*"])


def test_opset11_is_upgraded_for_per_axis_qdq():
    model = G.conv_bn_relu(opset=11)
    x = np.random.default_rng(8).standard_normal((1, 3, 8, 8)).astype(np.float32)
    out, _ = _lower(model, x)
    assert [i.version for i in out.opset_import if i.domain == ""] == [13]
    G.run(out, x)


def test_weight_quantization_guards_zero_channels():
    w = np.zeros((3, 2, 1, 1), np.float32)
    w[1] = 0.5
    q, scale = qdq.quantize_weight(w, 0)
    assert np.isfinite(scale).all() and (scale > 0).all()
    assert not q[0].any() and (q[1] == 127).all()


def test_cpu_variant_fuses_every_conv_in_onnx_runtime(tmp_path):
    import onnxruntime as ort

    model = G.residual()
    x = np.random.default_rng(9).standard_normal((1, 3, 6, 6)).astype(np.float32)
    amax = G.observe_amax(model, x, qdq.activation_tensors_to_quantize(model))
    u8 = qdq.insert_qdq(G.residual(), amax, target="cpu")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(u8.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    # conv3 writes the model output, which stays float: ONNX Runtime cannot fuse that one
    assert ops.count("QLinearConv") == 3 and ops.count("Conv") == 1
    assert ops.count("Clip") == 2  # relu0/relu1 run as uint8 Clip between fused convs


def test_s8_graphs_run_without_the_saturating_fusion_and_u8_graphs_keep_it():
    from calib.ort_exact import has_signed_qdq

    model = G.residual()
    x = np.random.default_rng(10).standard_normal((1, 3, 6, 6)).astype(np.float32)
    amax = G.observe_amax(model, x, qdq.activation_tensors_to_quantize(model))
    assert has_signed_qdq(qdq.insert_qdq(G.residual(), amax, target="tensorrt"))
    assert not has_signed_qdq(qdq.insert_qdq(G.residual(), amax, target="cpu"))
    assert not has_signed_qdq(model)


def test_full_range_int8_product_is_exact_on_both_targets():
    # 64 inputs at ±amax and weights at ±127: pairs of u8×s8 products overflow int16, which is
    # where ONNX Runtime's U8S8 kernels (vpmaddubsw, x86 without VNNI) saturate.
    rng = np.random.default_rng(11)
    w = np.where(rng.random((8, 64)) < 0.5, -1.0, 1.0).astype(np.float32)

    def model():
        nodes = [onnx.helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)]
        return G._model(nodes, [G._x("x", ["N", 64])], [G._x("y", ["N", 8])], [numpy_helper.from_array(w, "w")])

    x = np.where(rng.random((4, 64)) < 0.5, -1.0, 1.0).astype(np.float32)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    for target in qdq.TARGETS:
        out = qdq.insert_qdq(model(), {"x": 1.0, "y": 64.0}, target=target)
        got = G.run(out, x)[0]
        # the CPU target requantizes y on its own amax (64/127 per step): at most half a step off
        tol = 1e-4 if target == "tensorrt" else 64 / 127 / 2 + 1e-4
        assert np.abs(got - exact).max() <= tol, target


def _silu_dw(spread: float) -> onnx.ModelProto:
    """x → Conv (channel gains 1 … spread) → SiLU → depthwise Conv → SiLU → Conv → Sigmoid → y (a head)."""
    rng = np.random.default_rng(12)
    w0 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * np.geomspace(1.0, spread, 16, dtype=np.float32)[:, None, None, None]
    inits = [numpy_helper.from_array(w0, "w0"), G._w("wd", [16, 1, 3, 3], rng), G._w("w2", [4, 16, 1, 1], rng)]
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Sigmoid", ["c0"], ["s0"], name="sig0"),
        onnx.helper.make_node("Mul", ["c0", "s0"], ["a0"], name="silu0"),
        onnx.helper.make_node("Conv", ["a0", "wd"], ["c1"], name="dw", group=16, pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Sigmoid", ["c1"], ["s1"], name="sig1"),
        onnx.helper.make_node("Mul", ["c1", "s1"], ["a1"], name="silu1"),
        onnx.helper.make_node("Conv", ["a1", "w2"], ["c2"], name="head"),
        onnx.helper.make_node("Sigmoid", ["c2"], ["y"], name="score"),
    ]
    return G._model(nodes, [G._x("x", ["N", 3, 8, 8])], [G._x("y", ["N", 4, 8, 8])], inits)


def test_depthwise_conv_with_far_apart_channel_ranges_keeps_a_float_input():
    wide, even = _silu_dw(spread=200.0), _silu_dw(spread=2.0)
    assert "a0" not in qdq.activation_tensors_to_quantize(wide, target="tensorrt")
    assert "a0" in qdq.activation_tensors_to_quantize(even, target="tensorrt")
    x = np.random.default_rng(13).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out, _ = _lower(wide, x)
    g = Graph(out)
    assert _dq_feeding(g, "dw", 0) is None and _dq_feeding(g, "dw", 1) is None
    assert _dq_feeding(g, "stem", 0) is not None and _dq_feeding(g, "head", 0) is not None


def test_cpu_variant_does_not_round_what_tensorrt_keeps_in_high_precision():
    model = _silu_dw(spread=2.0)
    x = np.random.default_rng(14).standard_normal((2, 3, 8, 8)).astype(np.float32)
    amax = G.observe_amax(model, x, qdq.activation_tensors_to_quantize(model))
    u8 = qdq.insert_qdq(_silu_dw(spread=2.0), amax, target="cpu")
    g = Graph(u8)
    quantized = {n.input[0] for n in u8.graph.node if n.op_type == "QuantizeLinear"}
    # conv outputs read by SiLU, and the head conv whose output reaches the model output, stay float
    assert not quantized & {"c0", "c1", "c2"}
    assert {"x", "a0", "a1"} <= quantized
    assert g.producer["y"].op_type == "Sigmoid"
