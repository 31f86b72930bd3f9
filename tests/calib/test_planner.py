"""The precision planner: bisection over the ranked prefix, the budget's bound, INT8 share, and ``tegrad plan``."""

from __future__ import annotations

import json

import calib_graphs as G
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib import planner, qdq, sensitivity
from calib.cli import main

FEATURES = 8
CLASSES = 6


def _chain(fragile: tuple[int, ...], layers: int = 5, seed: int = 0) -> onnx.ModelProto:
    """``layers`` Gemms with Relu between; the input of each layer in ``fragile`` carries one
    feature 1000x the others (a per-tensor INT8 grid then wipes out the rest), which the layer's
    weight scales back down so FP32 stays well-behaved."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []
    src = "x"
    for i in range(layers):
        out_dim = CLASSES if i == layers - 1 else FEATURES
        w = (rng.standard_normal((out_dim, FEATURES)) * 0.4).astype(np.float32)
        if i in fragile:
            w[:, 0] *= 1e-3  # the huge input feature contributes normally
        if i + 1 in fragile:
            w[0, :] *= 1e3  # feature 0 of this layer's output becomes huge
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Gemm", [src, f"w{i}"], [f"h{i}"], name=f"fc{i}", transB=1))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
            src = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
                              [helper.make_tensor_value_info(f"h{layers - 1}", TensorProto.FLOAT, ["N", CLASSES])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _data(seed: int, n: int, fragile_input: bool = True) -> np.ndarray:
    x = np.abs(np.random.default_rng(seed).standard_normal((n, FEATURES))).astype(np.float32)
    if fragile_input:
        x[:, 0] = 1000.0 + 10 * x[:, 0]
    return x


# ---- the search -------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [0, 1, 2, 7, 50])
def test_bisection_finds_the_linear_answer_on_monotone_checks(limit: int) -> None:
    for threshold in range(0, limit + 3):
        calls: list[int] = []

        def check(k: int, t: int = threshold, calls: list[int] = calls) -> bool:
            calls.append(k)
            return k >= t

        k_lin, _ = planner.smallest_prefix(check, limit, "linear")
        calls.clear()
        k_bis, tried = planner.smallest_prefix(check, limit, "bisect")
        expected = threshold if threshold <= limit else None
        assert k_lin == k_bis == expected
        assert len(calls) == len(set(calls)) == len(tried)  # no k evaluated twice
        if k_bis:
            assert k_bis in tried and k_bis - 1 in tried  # the answer is verified on both sides
        if limit >= 7:
            assert len(tried) <= int(np.ceil(np.log2(limit))) + 2


def test_unknown_search_is_refused() -> None:
    with pytest.raises(ValueError, match="bisect"):
        planner.smallest_prefix(lambda k: True, 3, "binary")


def test_wilson_bound() -> None:
    # No failure in n: the bound is z^2 / (n + z^2); the point estimate at confidence 0.5.
    z = 1.2815515655446004  # 90 % one-sided
    assert planner.wilson_upper(0, 100, 0.9) == pytest.approx(z * z / (100 + z * z))
    assert planner.wilson_upper(3, 100, 0.5) == pytest.approx(0.03)
    assert planner.wilson_upper(3, 100, 0.8) > 0.03
    assert planner.wilson_upper(30, 1000, 0.8) < planner.wilson_upper(3, 100, 0.8)  # more samples, tighter
    assert planner.smallest_provable_drop(500, 0.8) < 0.002


def test_paired_accuracy_drop_bound() -> None:
    z = 0.8416212335729143  # 80 % one-sided
    assert planner.paired_drop_upper(0, 0, 100, 0.8) == planner.wilson_upper(0, 100, 0.8)
    # As many samples gained as lost: no drop, but the discordant pairs leave doubt.
    assert planner.paired_drop_upper(5, 5, 100, 0.8) == pytest.approx(z * np.sqrt(10) / 100)
    assert planner.paired_drop_upper(6, 2, 100, 0.8) > 0.04


def test_labels_budget_counts_accuracy_points() -> None:
    ref = [np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]]
    cand = [np.eye(4, dtype=np.float32)[[0, 1, 2, 0]]]  # the last answer changes: right -> wrong
    r = planner.Budget(target_drop=0.3, confidence=0.5).judge(ref, cand, labels=np.array([0, 1, 2, 3]))
    assert r["drop"] == pytest.approx(0.25) and r["met"] and r["accuracy_candidate"] == 0.75
    r = planner.Budget(target_drop=0.3, confidence=0.5).judge(ref, cand, labels=[np.array([0, 1]), np.array([2, 0])])
    assert r["drop"] == pytest.approx(-0.25)  # FP32 was wrong on the last one, INT8 right


# ---- whole-model plans on real ONNX Runtime -------------------------------------------------------
@pytest.fixture(scope="module")
def chain():
    model = _chain(fragile=(0, 2))
    amax = G.observe_amax(model, _data(1, 256), qdq.activation_tensors_to_quantize(model))
    report = sensitivity.analyze(model, amax, [_data(2, 32)], method="single")
    return model, amax, report


def test_fragile_layers_rank_first(chain) -> None:
    _, _, report = chain
    assert {r.layer for r in report.rows[:2]} == {"fc0", "fc2"}, report.to_table()


def test_bisection_and_linear_growth_agree_on_a_real_model(chain) -> None:
    model, amax, report = chain
    order = [r.layer for r in report.rows]
    held = [_data(3, 128), _data(4, 128)]
    budget = planner.Budget(target_drop=0.05)
    lin = planner.grow(order, model, amax, held, budget, search="linear", exclude_precision="fp32")
    bis = planner.grow(order, model, amax, held, budget, search="bisect", exclude_precision="fp32")
    assert lin.met and bis.met
    assert bis.excluded == lin.excluded and set(bis.excluded) == {"fc0", "fc2"}
    assert [h["excluded"] for h in lin.history] == [0, 1, 2]
    assert not any(h["met"] for h in bis.history if h["excluded"] < 2)
    assert bis.achieved["drop_bound"] <= 0.05 and "kl" in bis.achieved
    assert bis.history[0]["drop"] > 0.05  # plain INT8 misses it


def test_plan_reports_int8_share_in_layers_and_macs(chain) -> None:
    model, amax, report = chain
    order = [r.layer for r in report.rows]
    plan = planner.grow(order, model, amax, [_data(3, 128)], planner.Budget(target_drop=0.05),
                        speed_batch=_data(5, 16), speed_repeats=3)
    assert plan.total_layers == 5 and plan.int8_layers == 3
    macs = FEATURES * FEATURES  # per sample, every layer but the last
    total = 4 * macs + FEATURES * CLASSES
    kept = total - 2 * macs  # fc0 and fc2 leave INT8
    assert plan.share["total_macs"] == total and plan.share["int8_macs"] == kept
    assert plan.share["int8_mac_share"] == pytest.approx(kept / total)
    assert set(plan.speed["seconds"]) == {"fp32", "int8", "mixed"} and plan.speed["repeats"] == 3
    assert all(v > 0 for v in plan.speed["speedup_vs_fp32"].values())
    text = plan.summary()
    assert "2 of 5 layers out of INT8" in text and f"{kept / total:.1%} of the MACs" in text
    doc = plan.as_dict()
    assert doc["evaluations"] == len(doc["history"]) and doc["share"]["int8_layers"] == 3


def test_layer_macs_of_convolutions() -> None:
    macs = planner.layer_macs(G.conv_bn_relu())
    # conv1: 8x3x3x3 weights over an 8x8 output; conv2: 4x8x1x1 over 4x4.
    assert macs == {"conv1": 8 * 27 * 64, "conv2": 4 * 8 * 16}


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="target drop"):
        planner.Budget(target_drop=2.0)
    with pytest.raises(ValueError, match="confidence"):
        planner.Budget(confidence=0.2)
    assert "F1" in planner.Budget(task="detection").describe()
    assert "2 points (80% upper bound)" in planner.Budget().describe()


# ---- tegrad plan -------------------------------------------------------------------------------
@pytest.fixture()
def plan_files(tmp_path):
    model = tmp_path / "chain.onnx"
    onnx.save(_chain(fragile=(0, 2)), model)
    calib, held = tmp_path / "calib.npy", tmp_path / "held.npy"
    np.save(calib, _data(1, 256))
    np.save(held, _data(3, 256))
    return tmp_path, str(model), str(calib), str(held)




def test_plan_partial(plan_files, capsys) -> None:
    tmp, model, calib, held = plan_files
    report = tmp / "plan.json"
    rc = main(["plan", model, "--data", held, "--calib-data", calib, "--target-drop", "5%", "--json", str(report),
               "--no-progress", "--speed-repeats", "2", "--exclude-precision", "fp32"])
    out = capsys.readouterr().out
    assert rc == 0, out
    doc = json.loads(report.read_text())
    assert doc["outcome"] == "partial"
    assert set(doc["steps"]["plan"]["excluded"]) == {"fc0", "fc2"}
    assert "Partial PTQ with these 2 layers kept in fp32" in out and "fc0" in out and "fc2" in out
    assert "3 of 5 layers INT8" in out and "speed-up vs FP32" in out
    assert doc["steps"]["ptq"]["met"] is False and doc["steps"]["sensitivity"]["rows"]
    assert 'exclude = [' in out  # the config snippet


def test_plan_ptq_enough(tmp_path, capsys) -> None:
    model = tmp_path / "calm.onnx"
    onnx.save(_chain(fragile=()), model)
    np.save(tmp_path / "c.npy", _data(1, 256, fragile_input=False))
    np.save(tmp_path / "h.npy", _data(3, 256, fragile_input=False))
    common = ["plan", str(model), "--data", str(tmp_path / "h.npy"), "--calib-data", str(tmp_path / "c.npy"),
              "--target-drop", "0.2", "--no-progress", "--speed-repeats", "2"]
    # int8 without a calibration cache would not load: the config is refused and not written.
    refused = tmp_path / "refused" / "config.toml"
    refused.parent.mkdir()
    assert main(common + ["--write-config", str(refused)]) == 2
    assert not refused.exists()
    capsys.readouterr()
    out_cfg = tmp_path / "config.toml"
    out_cfg.write_text('# kept\nmax_batch = 4\nprecision = "fp32"\n')
    rc = main(common + ["--cache-out", str(tmp_path / "calm.calib.json"), "--write-config", str(out_cfg)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PTQ is enough" in out and "5 of 5 layers INT8" in out
    text = out_cfg.read_text()
    # Merged into the existing file: its comment and other keys stay, precision and the cache are the plan's.
    assert "# kept" in text and "max_batch = 4" in text
    assert 'precision = "int8"' in text and 'calibration_cache = "calm.calib.json"' in text


def test_plan_needs_qat_when_the_budget_of_layers_is_too_small(plan_files, capsys) -> None:
    tmp, model, calib, held = plan_files
    report = tmp / "plan.json"
    rc = main(["plan", model, "--data", held, "--calib-data", calib, "--target-drop", "0.05", "--max-excluded", "1",
               "--json", str(report), "--no-progress", "--speed-repeats", "2"])
    out = capsys.readouterr().out
    assert rc == 3, out
    assert "Needs QAT: the best partial plan within the budget of 1 excluded layers reaches" in out
    assert "against a target of top-1 drop vs FP32 <= 5 points" in out
    doc = json.loads(report.read_text())
    assert doc["outcome"] == "qat" and len(doc["steps"]["plan"]["excluded"]) == 1


def test_plan_bad_input_exits_2(plan_files, capsys) -> None:
    tmp, model, calib, held = plan_files
    base = ["plan", model, "--no-progress"]
    assert main([*base, "--data", held, "--calib-data", held]) == 2  # measured on calibration data
    assert "held-out" in capsys.readouterr().err
    assert main([*base, "--data", held]) == 2  # an array cannot be split safely
    assert "--calib-data" in capsys.readouterr().err
    assert main([*base, "--data", held, "--calib-data", str(tmp / "missing.npy")]) == 2
    assert main([*base, "--data", held, "--calib-data", calib, "--max-excluded", "lots"]) == 2
    assert main([*base, "--data", held, "--calib-data", calib, "--confidence", "0.1"]) == 2
    with pytest.raises(SystemExit) as exc:
        main([*base, "--data", held, "--calib-data", calib, "--target-drop", "2"])
    assert exc.value.code == 2
    assert "0.02 or 2%" in capsys.readouterr().err


def test_plan_splits_an_image_folder_and_never_measures_on_calibration_images(tmp_path) -> None:
    from calib.datasets import ImageFolder
    from calib.plan_cli import _split
    from calib.preprocess import PRESETS

    cv2 = pytest.importorskip("cv2")
    for i in range(9):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8, 3), i * 20, np.uint8))
    source = ImageFolder(tmp_path, PRESETS["imagenet"].replace(size=(4, 4), resize_short=None, resize="stretch"))
    calib, held = _split(source, 0.5)
    assert not set(calib.files) & set(held.files)
    assert sorted(calib.files + held.files) == sorted(source.files) and len(held.files) == 4
