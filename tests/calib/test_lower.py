"""lower(): every precision passes the full checker and runs in ONNX Runtime."""

from __future__ import annotations

import calib_graphs as G
import numpy as np
import onnx
import pytest
from onnx import TensorProto

from calib import lower as L
from calib import qdq
from calib.graph import Graph


def _data(model, seed=0, n=2):
    shape = [d.dim_value or n for d in model.graph.input[0].type.tensor_type.shape.dim]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _amax(model, x):
    return G.observe_amax(model, x, qdq.activation_tensors_to_quantize(model))


BUILDERS = [G.conv_bn_relu, G.residual, G.gemm_matmul, G.conv_transpose]


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize(
    "precision,kwargs",
    [
        ("fp32", {}),
        ("fp16", {}),
        ("int8", {}),
        ("int8", {"target": "cpu"}),
        ("mixed", {"exclude_precision": "fp16"}),
        ("mixed", {"exclude_precision": "fp32"}),
        ("mixed", {"target": "cpu"}),
    ],
)
def test_every_lowering_checks_and_runs(build, precision, kwargs):
    model = build()
    x = _data(model)
    amax = _amax(model, x)
    first = next(n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm"))
    if precision == "mixed":
        kwargs = {**kwargs, "exclude": [first]}
    out = L.lower(model, precision, amax=amax, **kwargs)
    onnx.checker.check_model(out, full_check=True)
    ref, got = G.run(model, x)[0], G.run(out, x)[0]
    assert got.dtype == np.float32 and got.shape == ref.shape
    tol = {"fp32": 1e-6, "fp16": 0.01}.get(precision, 0.06)
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max() + 1e-6
    counts = L.count_precisions(out)
    total = sum(n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") for n in model.graph.node)
    assert sum(counts.values()) == total
    if precision == "int8":
        assert counts["int8"] == total
    if precision == "fp16":
        assert counts["fp16"] == total
    if precision == "mixed":
        left = "fp16" if kwargs.get("exclude_precision", "fp16") == "fp16" and kwargs.get("target") != "cpu" else "fp32"
        assert counts["int8"] == total - 1 and counts[left] == 1


def test_model_is_not_modified_and_paths_work(tmp_path):
    model = G.residual()
    before = model.SerializeToString()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    amax = _amax(model, _data(model))
    dst = L.lower_file(src, tmp_path / "out" / "m.int8.onnx", "int8", amax=amax)
    assert model.SerializeToString() == before
    assert dst.exists() and not list(dst.parent.glob(".*tmp*"))
    assert L.count_precisions(dst) == {"int8": 4, "fp16": 0, "fp32": 0}
    assert L.count_precisions(L.lower(str(src), "fp32")) == {"int8": 0, "fp16": 0, "fp32": 4}


def test_mixed_leaves_named_layers_unquantized():
    model = G.residual()
    amax = _amax(model, _data(model))
    out = L.lower(model, "mixed", amax=amax, exclude=["conv0", "conv3"], exclude_precision="fp32")
    precisions = L.layer_precisions(out)
    assert precisions == {"conv0": "fp32", "conv1": "int8", "conv2": "int8", "conv3": "fp32"}
    g = Graph(out)
    conv0 = next(n for n in out.graph.node if n.name == "conv0")
    assert conv0.input[0] == "x" and g.initializers[conv0.input[1]].data_type == TensorProto.FLOAT
    # fnmatch patterns work and fp16 islands are wrapped in Casts
    out16 = L.lower(model, "mixed", amax=amax, exclude=["conv[03]"])
    assert L.layer_precisions(out16) == {"conv0": "fp16", "conv1": "int8", "conv2": "int8", "conv3": "fp16"}
    assert out16.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_errors_name_the_problem():
    model = G.residual()
    amax = _amax(model, _data(model))
    with pytest.raises(ValueError, match="'conv9'"):
        L.lower(model, "mixed", amax=amax, exclude=["conv9"])
    with pytest.raises(ValueError, match="'/blocks/\\*'"):
        L.lower(model, "fp16", exclude=["/blocks/*"])
    with pytest.raises(qdq.MissingAmaxError, match="'r2'"):
        L.lower(model, "int8", amax={k: v for k, v in amax.items() if k != "r2"})
    with pytest.raises(ValueError, match="amax"):
        L.lower(model, "int8")
    with pytest.raises(ValueError, match="precision"):
        L.lower(model, "int4", amax=amax)
    lowered = L.lower(model, "int8", amax=amax, glue="fp32")
    # issue 12: a graph that already carries Q/DQ is served as it is (precision "explicit")
    assert L.count_precisions(L.lower(lowered, "int8", amax=amax)) == L.count_precisions(lowered)
    # excluding the only reader of r2 makes its amax unnecessary
    L.lower(model, "mixed", amax={k: v for k, v in amax.items() if k != "r2"}, exclude=["conv3"])


def test_opset11_model_is_upgraded():
    model = G.conv_bn_relu(opset=11)
    x = _data(model)
    out = L.lower(model, "int8", amax=_amax(model, x), target="cpu")
    assert [i.version for i in out.opset_import if i.domain == ""] == [13]
    G.run(out, x)
