"""`--algorithm auto`: held-out split, choice by measured agreement with FP32, cache metadata, CLI default.

Real ONNX Runtime on small models built here and on the embedded digits model; no mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib import algorithms
from calib import auto_algorithm as auto
from calib.cache import CalibrationCache
from calib.cli import main
from calib.datasets import ImageFolder, NumpyFiles, as_source
from calib.observe import observe
from calib.preprocess import PreprocessSpec

DIGITS = Path(__file__).resolve().parents[2] / "daemon" / "models" / "digits"


def _outlier_model(path: Path | None = None) -> onnx.ModelProto:
    """conv → Exp → conv: a few input pixels at 8 make Exp's output thousands of times its usual
    size, so ``max`` spends the int8 grid on them and rounds every ordinary activation away."""
    rng = np.random.default_rng(0)

    def w(name, shape, s):
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        helper.make_node("Exp", ["c1"], ["e"], name="exp"),
        helper.make_node("Conv", ["e", "w2"], ["c2"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["y"], name="flat"),
    ]
    graph = helper.make_graph(nodes, "outlier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
                              [w("w1", [8, 4, 1, 1], 0.5), w("w2", [10, 8, 1, 1], 1.0)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    if path is not None:
        onnx.save(model, path)
    return model


def _outlier_file(tmp_path: Path) -> str:
    _outlier_model(tmp_path / "m.onnx")
    return str(tmp_path / "m.onnx")


def _outlier_data(path: Path, n: int = 60) -> Path:
    x = np.random.default_rng(1).standard_normal((n, 4, 8, 8)).astype(np.float32)
    x[::6, :, 3, 3] = 8.0
    np.save(path, x)
    return path


# ---- split ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [10, 16, 60, 108, 1000])
def test_held_out_indices_are_evenly_spread_and_bounded(n):
    count = auto.held_out_count(n)
    held = auto.held_out_indices(n, count)
    assert len(held) == count == len(set(held))
    assert min(auto.MIN_HELD_OUT, n // 2) <= count <= min(auto.MAX_HELD_OUT, n // 2)
    assert count >= round(0.2 * n) or count == auto.MAX_HELD_OUT
    # Spread over the order, not a block at one end.
    assert held[0] < n // 2 < held[-1]
    assert auto.held_out_indices(n, count) == held  # deterministic
    assert auto.held_out_count(auto.MIN_SAMPLES - 1) == 0


def test_numpy_split_is_disjoint_and_observation_never_sees_the_held_out(tmp_path):
    # Sample i holds the value i everywhere, so every sample is recognisable after the split.
    n = 40
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 4, 8, 8)).copy()
    np.save(tmp_path / "x.npy", x)
    split = auto.split_source(as_source(tmp_path / "x.npy"))
    assert set(split.range_indices).isdisjoint(split.held_out_indices)
    assert sorted(split.range_indices + split.held_out_indices) == list(range(n))
    assert len(split.ranges) == len(split.range_indices) and len(split.held_out) == len(split.held_out_indices)

    def seen(source):
        return [int(v) for chunk in source.iter_chunks("x") for v in chunk["x"][:, 0, 0, 0]]

    assert seen(split.ranges) == split.range_indices
    assert seen(split.held_out) == split.held_out_indices
    # The histograms hold only range samples: the last sample (held out) is the largest value.
    assert split.held_out_indices[-1] == n - 1
    obs = observe(_outlier_model(), split.ranges, input_name="x", progress=False)
    assert obs.num_samples == len(split.range_indices)
    assert obs["x"].absmax == max(split.range_indices) < n - 1


def test_image_folder_split_picks_files(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(12):
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    folder = ImageFolder(tmp_path, PreprocessSpec.from_dict({"size": [8, 8], "scale": 1 / 255}))
    split = auto.split_source(folder)
    assert isinstance(split.ranges, ImageFolder) and isinstance(split.held_out, ImageFolder)
    assert set(split.ranges.files).isdisjoint(split.held_out.files)
    assert sorted(split.ranges.files + split.held_out.files) == folder.files
    assert split.held_out.files == [folder.files[i] for i in split.held_out_indices]
    assert split.ranges.describe()["count"] == len(split.ranges.files)


def test_too_few_samples_do_not_split(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((auto.MIN_SAMPLES - 1, 4, 8, 8), np.float32))
    assert auto.split_source(NumpyFiles(tmp_path / "x.npy")) is None


# ---- choice --------------------------------------------------------------------------------------
def test_auto_picks_the_best_held_out_candidate_not_max_on_outliers(tmp_path):
    model = _outlier_model()
    split = auto.split_source(as_source(_outlier_data(tmp_path / "x.npy")))
    obs = observe(model, split.ranges, input_name="x", progress=False)
    held = auto.model_batches(model, split.held_out, "x", 8)
    choice = auto.choose(model, obs, held, progress=False)

    by_name = {c.name: c for c in choice.candidates}
    assert list(by_name) == [c.name for c in auto.CANDIDATES]
    assert choice.chosen is min(choice.candidates, key=lambda c: c.kl)
    # max is clearly worse here: its grid is spent on the rare outliers.
    assert choice.chosen.name != "max"
    assert by_name["max"].kl > 2 * choice.chosen.kl
    assert by_name["max"].top1_agreement < choice.chosen.top1_agreement
    # The cache gets exactly the amax that were scored.
    assert choice.amax == algorithms.compute_all(obs, choice.chosen.algorithm, **choice.chosen.params)
    assert choice.held_out_samples == len(split.held_out_indices)
    assert choice.range_samples == len(split.range_indices)
    table = choice.to_table()
    assert "<- chosen" in table and choice.chosen.name in table


def test_digits_candidates_are_scored_and_the_best_kept():
    raw = np.load(DIGITS / "data" / "calib.npz")["x"]
    x = (raw.astype(np.float32) / 16.0)[:, None]
    model = onnx.load(DIGITS / "1" / "model.onnx")
    split = auto.split_source(as_source([s for s in x]))
    obs = observe(model, split.ranges, progress=False)
    choice = auto.choose(model, obs, auto.model_batches(model, split.held_out, None, 64), progress=False)
    assert choice.chosen.kl == min(c.kl for c in choice.candidates)
    assert all(c.top1_agreement >= 0.9 for c in choice.candidates)


def _tiny_detector(path: Path) -> Path:
    """1x1 conv → sigmoid → YOLOv5 layout [N, 64, 4 + 1 + 2] (boxes scaled to pixels)."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["c"], name="head"),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sig"),
        helper.make_node("Reshape", ["s", "shape"], ["r"], name="flat"),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1], name="tr"),
        helper.make_node("Mul", ["t", "scale"], ["output0"], name="px"),
    ]
    inits = [numpy_helper.from_array((rng.standard_normal((7, 3, 1, 1)) * 2).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([0, 7, 64], np.int64), "shape"),
             numpy_helper.from_array(np.array([64, 64, 24, 24, 1, 1, 1], np.float32), "scale")]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 64, 7])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def test_detection_candidates_are_scored_by_f1(tmp_path):
    model = onnx.load(_tiny_detector(tmp_path / "det.onnx"))
    x = np.random.default_rng(4).standard_normal((30, 3, 8, 8)).astype(np.float32)
    x[::5, 0, 2, 2] = 9.0
    split = auto.split_source(as_source([s for s in x]))
    obs = observe(model, split.ranges, input_name="images", progress=False)
    held = auto.model_batches(model, split.held_out, "images", 4)
    choice = auto.choose(model, obs, held, task="detection", detection={"layout": "yolov5", "score_threshold": 0.3},
                         progress=False)
    assert all(c.f1 is not None and c.kl is None for c in choice.candidates)
    assert choice.chosen.f1 == max(c.f1 for c in choice.candidates)
    assert choice.as_metadata()["metric"] == "f1"


# ---- cache and CLI -------------------------------------------------------------------------------
def test_cli_default_is_auto_and_records_the_choice(tmp_path, capsys):
    model = _outlier_file(tmp_path)
    data = str(_outlier_data(tmp_path / "x.npy"))
    out, trt = tmp_path / "m.calib.json", tmp_path / "m.cache"
    assert main(["calibrate", model, "--data", data, "-o", str(out), "--trt-out", str(trt), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "--algorithm auto: candidates scored on 12 held-out samples" in printed and "<- chosen" in printed
    doc = json.loads(out.read_text())
    sel = doc["selection"]
    assert sel["method"] == "auto" and sel["metric"] == "kl" and sel["task"] == "classification"
    assert sel["held_out_samples"] == 12 and sel["range_samples"] == doc["num_samples"] == 48
    assert [c["name"] for c in sel["candidates"]] == [c.name for c in auto.CANDIDATES]
    chosen = next(c for c in sel["candidates"] if c["name"] == sel["chosen"])
    assert chosen["kl"] == min(c["kl"] for c in sel["candidates"])
    assert doc["algorithm"] == chosen["algorithm"] != "max" and doc["params"] == chosen["params"]
    # The TensorRT export is the same as for any cache with these amax.
    cache = CalibrationCache.load(out)
    assert cache.selection == sel
    plain = CalibrationCache(cache.amax, cache.algorithm, cache.params)
    assert trt.read_text() == plain.to_trt_text()
    # Import back from TensorRT text and re-export is unchanged (no selection there).
    assert CalibrationCache.load(trt).to_trt_text() == trt.read_text()


def test_cli_fixed_algorithm_still_works_and_writes_no_selection(tmp_path, capsys):
    model = _outlier_file(tmp_path)
    data = str(_outlier_data(tmp_path / "x.npy"))
    out = tmp_path / "e.json"
    assert main(["calibrate", model, "--data", data, "--algorithm", "entropy", "-o", str(out), "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    assert doc["algorithm"] == "entropy" and doc["num_samples"] == 60 and "selection" not in doc
    assert "held-out" not in capsys.readouterr().out
    assert main(["calibrate", model, "--data", data, "--algorithm", "entropy", "--held-out", "0.3",
                 "-o", str(out), "--no-progress"]) == 2
    assert "--held-out only applies to --algorithm auto" in capsys.readouterr().err


def test_cli_auto_with_few_samples_falls_back_with_a_note(tmp_path, capsys):
    model = _outlier_file(tmp_path)
    data = str(_outlier_data(tmp_path / "x.npy", n=6))
    out = tmp_path / "f.json"
    assert main(["calibrate", model, "--data", data, "-o", str(out), "--no-progress"]) == 0
    assert "6 samples are too few to hold some out" in capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["algorithm"] == auto.FALLBACK and doc["num_samples"] == 6 and "selection" not in doc
    assert main(["calibrate", model, "--data", data, "--held-out", "1.5", "-o", str(out), "--no-progress"]) == 2
    assert "held-out fraction must be between 0 and 1" in capsys.readouterr().err


def test_cli_auto_with_observations_needs_data(tmp_path, capsys):
    model = _outlier_file(tmp_path)
    data = str(_outlier_data(tmp_path / "x.npy"))
    obs = tmp_path / "o.npz"
    assert main(["calibrate", model, "--data", data, "--save-observations", str(obs), "-o", str(tmp_path / "a.json"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["calibrate", model, "--observations", str(obs), "-o", str(tmp_path / "b.json")]) == 2
    assert "--algorithm auto scores each algorithm on held-out samples" in capsys.readouterr().err
    # With the data the observations came from, the same choice comes back without a new pass.
    assert main(["calibrate", model, "--observations", str(obs), "--data", data, "-o", str(tmp_path / "b.json"),
                 "--no-progress"]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["amax"] == b["amax"] and a["selection"]["chosen"] == b["selection"]["chosen"]


def test_old_caches_load_without_selection():
    cache = CalibrationCache.load(DIGITS / "calib.json")
    assert cache.selection is None and "selection" not in cache.to_dict()
    doc = cache.to_dict()
    doc["selection"] = "not an object"
    with pytest.raises(ValueError, match="'selection' must be an object or null"):
        CalibrationCache.from_dict(doc)
