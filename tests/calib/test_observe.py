"""observe(): real ONNX Runtime on small models built here; streaming statistics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calib.cache import model_sha256
from calib.observe import Observations, TensorStats, observe


def _model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 4, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3, 4, 4])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [
        helper.make_node("Relu", ["X"], ["R"], name="relu"),
        helper.make_node("Neg", ["R"], ["NR"], name="neg"),
        helper.make_node("Mul", ["NR", "two"], ["M"], name="mul"),
        helper.make_node("Add", ["M", "X"], ["Y"], name="add"),
    ]
    g = helper.make_graph(nodes, "tiny", [x], [y], initializer=[two])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _data(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, 3, 4, 4)) * 3).astype(np.float32)


@pytest.mark.parametrize("threaded", [True, False])
def test_exact_min_max_against_numpy(threaded: bool) -> None:
    model = _model()
    x = _data(23)
    obs = observe(model, x, ["X", "R", "M", "Y"], batch_size=4, progress=False, threaded=threaded)
    assert isinstance(obs, Observations)
    assert obs.num_samples == 23 and obs.model_sha256 == model_sha256(model)
    r = np.maximum(x, 0)
    expected = {"X": x, "R": r, "M": -2 * r, "Y": -2 * r + x}
    assert list(obs) == ["X", "R", "M", "Y"]
    for name, ref in expected.items():
        st = obs[name]
        assert st.min == float(ref.min()) and st.max == float(ref.max()), name
        assert st.absmax == float(np.abs(ref).max())
        assert st.count == ref.size == int(st.hist.sum())


def test_histogram_counts_match_direct_binning() -> None:
    x = _data(16, seed=1)
    obs = observe(_model(), x, ["M"], batch_size=16, progress=False)
    st = obs["M"]
    m = np.abs(-2 * np.maximum(x, 0)).ravel()
    ref = np.bincount(np.minimum((m * np.float32(2048 / st.hist_range)).astype(np.int64), 2047), minlength=2048)
    np.testing.assert_array_equal(st.hist, ref)


def test_memory_does_not_grow_with_samples() -> None:
    small = observe(_model(), _data(4), ["R", "M"], batch_size=2, progress=False)
    large = observe(_model(), _data(400, seed=2), ["R", "M"], batch_size=8, progress=False)
    for name in ("R", "M"):
        assert small[name].hist.shape == large[name].hist.shape == (2048,)
        assert small[name].hist.nbytes == large[name].hist.nbytes
    assert large.num_samples == 400


def test_histogram_growth_merges_exactly() -> None:
    rng = np.random.default_rng(3)
    parts = [rng.uniform(-1, 1, 5000), rng.uniform(-2.5, 2.5, 5000), rng.uniform(-9, 9, 5000)]
    st = TensorStats("t")
    for p in parts:
        st.update(p.astype(np.float32))
    assert st.hist.shape == (2048,) and st.hist.sum() == 15000
    assert st.absmax <= st.hist_range < 2 * st.absmax
    # Merging is exact: same counts as binning everything at the final range, up to
    # float32 rounding of values sitting on a bin edge.
    allx = np.abs(np.concatenate(parts)).astype(np.float32)
    direct = np.bincount(np.minimum((allx * (2048 / st.hist_range)).astype(np.int64), 2047), minlength=2048)
    assert np.abs(st.hist - direct).sum() <= 4


def test_stats_merge_and_save_load(tmp_path) -> None:
    a, b = TensorStats("t"), TensorStats("t")
    a.update(np.linspace(-1, 1, 1001, dtype=np.float32))
    b.update(np.linspace(-3, 2, 1001, dtype=np.float32))
    a.merge(b)
    assert (a.min, a.max, a.count, int(a.hist.sum())) == (-3.0, 2.0, 2002, 2002)
    obs = Observations({"t": a}, num_samples=2, model_sha256="ab" * 32)
    obs.save(tmp_path / "obs.npz")
    back = Observations.load(tmp_path / "obs.npz")
    assert back.num_samples == 2 and back.model_sha256 == "ab" * 32
    np.testing.assert_array_equal(back["t"].hist, a.hist)
    assert (back["t"].min, back["t"].max, back["t"].hist_range) == (a.min, a.max, a.hist_range)


def test_minmax_only_and_model_from_path(tmp_path) -> None:
    path = tmp_path / "tiny.onnx"
    onnx.save(_model(), path)
    x = _data(5)
    obs = observe(path, x, ["Y"], histogram=False, progress=False)
    assert obs["Y"].hist is None and obs.model_sha256 == model_sha256(path)
    assert obs["Y"].max == float((-2 * np.maximum(x, 0) + x).max())


def test_fixed_batch_model_and_dict_data() -> None:
    m = _model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    x = _data(3)
    with pytest.warns(UserWarning, match="fixed batch"):
        obs = observe(m, [{"X": s} for s in x], ["R"], batch_size=4, progress=False)
    assert obs.num_samples == 3


def test_bad_requests() -> None:
    with pytest.raises(ValueError, match="not a tensor"):
        observe(_model(), _data(2), ["nope"], progress=False)
    with pytest.raises(ValueError, match="initializer"):
        observe(_model(), _data(2), ["two"], progress=False)
    with pytest.raises(ValueError, match="empty"):
        observe(_model(), [], ["R"], input_name="X", progress=False)


def test_default_tensors_come_from_qdq_plan() -> None:
    qdq = pytest.importorskip("calib.qdq")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 3, 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 2, 3, 3],
                           np.random.default_rng(4).standard_normal(72).astype(np.float32))
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                           helper.make_node("Conv", ["r", "w"], ["y"], name="conv")], "c", [x], [y], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    data = np.random.default_rng(5).standard_normal((2, 2, 5, 5)).astype(np.float32)
    obs = observe(model, data, progress=False)
    assert set(obs) == set(qdq.activation_tensors_to_quantize(model))
    assert "r" in obs


def test_input_like_follows_rearranging_ops_only() -> None:
    # YOLOX's Focus: slices of the pixel input concatenated feed the first Conv; they are
    # still the input as far as ranges go, while the Relu after the Conv is not.
    from onnx import TensorProto, helper

    from calib.observe import input_like_tensors

    ints = lambda name, vals: helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals)  # noqa: E731
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2, 1, 1], [1.0] * 4)
    nodes = [
        helper.make_node("Slice", ["x", "s0", "e0", "ax"], ["a"]),
        helper.make_node("Slice", ["x", "s1", "e1", "ax"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w"], ["conv"]),
        helper.make_node("Relu", ["conv"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "focus",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[w, ints("s0", [0]), ints("e0", [2]), ints("s1", [2]), ints("e1", [4]), ints("ax", [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert input_like_tensors(model) == ["x", "a", "b", "cat"]
