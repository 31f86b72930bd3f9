"""The precision monitor's parts on real data: input statistics and PSI, saturation and its
stable label choice, the task comparisons, the field capture ring and recalibration from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from calib import input_stats
from calib.cache import CalibrationCache
from calib.cli import main as calib_main
from daemon.monitor.capture import Capture
from daemon.monitor.compare import Task, score, window_values
from daemon.monitor.saturation import Saturation, beyond
from daemon.monitor.settings import MonitorConfig
from daemon.monitor.window import Window

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "daemon" / "models" / "digits"


def _digits(split: str) -> np.ndarray:
    with np.load(DIGITS / "data" / f"{split}.npz") as z:
        return (z["x"].astype(np.float32) / 16).reshape(-1, 1, 8, 8)


def _psi_of(stats, x: np.ndarray) -> float:
    return input_stats.psi(stats, input_stats.histogram(x, stats))


def test_input_stats_separate_held_out_data_from_shifted_data():
    builder = input_stats.InputStatsBuilder()
    for chunk in np.array_split(_digits("calib"), 4):
        builder.update(chunk)
    stats = json.loads(json.dumps(builder.result()))  # survives the cache's JSON
    assert stats["shape"] == [1, 8, 8] and stats["channels"] == 1 and stats["samples"] == 256
    assert [f["feature"] for f in stats["features"]] == ["mean[0]", "std[0]"]
    for f in stats["features"]:
        assert sum(f["counts"]) == 256 and len(f["counts"]) == len(f["edges"]) + 1
    held = _digits("heldout")
    for n in (20, 100, 450):  # unchanged inputs read small at any window size
        assert _psi_of(stats, held[:n]) < input_stats.PSI_SMALL, n
    rng = np.random.default_rng(0)
    for shifted in (held[:100] * 4, held[:100] * 0.25, rng.random((100, 1, 8, 8), dtype=np.float32)):
        assert _psi_of(stats, shifted) >= input_stats.PSI_LARGE
    assert input_stats.drift_level(0.05) == "small" and input_stats.drift_level(0.3) == "large"


def test_image_batches_keep_their_colour_channels():
    rng = np.random.default_rng(1)
    b = input_stats.InputStatsBuilder()
    b.update(np.concatenate([rng.normal(0, 1, (4, 1, 16, 16)), rng.normal(5, 2, (4, 1, 16, 16)),
                             rng.normal(-3, 0.5, (4, 1, 16, 16))], axis=1))
    result = b.result()
    assert result["channels"] == 3 and len(result["features"]) == 6
    assert result["mean"] == pytest.approx([0, 5, -3], abs=0.3)
    assert result["std"] == pytest.approx([1, 2, 0.5], abs=0.2)
    assert input_stats.channel_axis((2, 224, 224, 3)) == 3 and input_stats.channel_axis((2, 16)) is None


def test_saturation_ratio_and_a_stable_label_set():
    assert beyond(np.array([0.5, -2.0, 3.0, 1.0]), 1.0) == 0.5
    amax = {f"t{i}": 1.0 for i in range(6)}
    sat = Saturation(amax, window=10, max_tensors=3)
    rng = np.random.default_rng(2)
    for _ in range(10):
        # t0..t2 saturate a little and alike; t5 saturates a lot
        sat.add({name: rng.normal(0, 0.5 if name != "t5" else 2.0, 1000) for name in amax})
    chosen, _ = sat.choose()
    assert "t5" in chosen and len(chosen) == 3
    assert sat.maximum() == pytest.approx(sat.ratio("t5"))
    for _ in range(5):  # ratios of the near-equal ones jiggle: the set does not churn
        sat.add({name: rng.normal(0, 0.5 if name != "t5" else 2.0, 1000) for name in amax})
        again, removed = sat.choose()
        assert again == chosen and removed == []


def test_classification_and_raw_scores_over_a_window():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(20, 1, 10)).astype(np.float32)
    served = ref + rng.normal(scale=0.002, size=ref.shape).astype(np.float32)
    served[3, 0, :] = -ref[3, 0, :]  # one sample disagrees
    task, raw = Task("classification", "logits"), Task("raw", "y")
    w, wr = Window(500), Window(500)
    for r, s in zip(ref, served):
        w.add(**score(task, s, r))
        wr.add(**score(raw, s, r))
    got = window_values(task, w)
    assert got["top1_agreement"] == pytest.approx(19 / 20)
    assert got["cosine"] == pytest.approx(0.9, abs=1e-3)  # 19 of ~1.0 and one of -1.0
    assert window_values(raw, wr)["max_rel_error"] == pytest.approx(2.0, rel=1e-3)


def test_settings_refuse_unknown_metrics():
    with pytest.raises(ValidationError, match="unknown metric"):
        MonitorConfig(rollback_below={"accuracy": 0.9})
    assert MonitorConfig().shadow_rate == 0.01


def test_capture_is_a_bounded_ring_that_calibration_reads(tmp_path, capsys):
    cap = Capture(tmp_path / "cap", max_bytes=40_000, model="digits", version=2)
    held = _digits("heldout")
    for x in held[:200]:
        cap.add({"input": x[None]})
    files = sorted((tmp_path / "cap").glob("*.npz"))
    assert sum(f.stat().st_size for f in files) <= 40_000 and 10 < len(files) < 200
    assert files[-1].stem == f"{199:012d}"  # the newest are kept
    meta = json.loads((tmp_path / "cap" / "capture.json").read_text())
    assert meta["format"] == "tegrad-capture" and meta["inputs"]["input"]["shape"] == [1, 8, 8]
    out = tmp_path / "field.calib.json"
    rc = calib_main(["calibrate", str(DIGITS / "1" / "model.onnx"), "--data", str(tmp_path / "cap"),
                     "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr()
    cache = CalibrationCache.load(out)
    # --algorithm auto (the default) holds some samples out to score the algorithms: all are read.
    assert cache.num_samples + cache.selection["held_out_samples"] == len(files)
    assert "input" in cache.source["input_stats"]
