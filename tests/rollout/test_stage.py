"""Staging on a workstation: `tegrad bundle verify --validate` builds the bundle's engine through the
daemon's build path (lowering with the shipped cache, spawned build worker) and checks its golden samples."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from daemon.rollout import cli
from daemon.rollout.bundle import validation_for
from daemon.rollout.make import create

DIGITS = Path(__file__).resolve().parents[2] / "daemon" / "models" / "digits"


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("digits") / "digits"
    (d / "1").mkdir(parents=True)
    shutil.copy(DIGITS / "1" / "model.onnx", d / "1" / "model.onnx")
    for name in ("calib.json", "labels.txt"):
        shutil.copy(DIGITS / name, d / name)
    config = (DIGITS / "config.toml").read_text().replace('precision = "fp32"', 'precision = "int8"\ncalibration_cache = "calib.json"')
    (d / "config.toml").write_text(config)
    return d


@pytest.fixture(scope="module")
def golden() -> np.ndarray:
    with np.load(DIGITS / "data" / "heldout.npz") as z:
        return (z["x"][:200].astype(np.float32) / 16).reshape(-1, 1, 8, 8)


def test_int8_bundle_builds_and_passes_its_golden_samples(int8_dir, golden, tmp_path, capsys):
    out = tmp_path / "digits-int8.tegrad"
    create(int8_dir, out, golden_inputs=golden, golden_count=200, created="2026-01-02T03:04:05Z")
    dest = tmp_path / "staged"
    assert cli.main(["bundle", "verify", str(out), "--allow-unsigned", "--validate", "--extract-to", str(dest)]) == 0
    text = capsys.readouterr().out
    assert "layers int8/fp16/fp32 5/0/0" in text and "validation passed (classification, 200 samples" in text
    assert (dest / "model.onnx").is_file() and (dest / "calib.json").is_file()


def test_a_bundle_whose_engine_misses_its_thresholds_is_refused(int8_dir, golden, tmp_path, capsys):
    out = tmp_path / "strict.tegrad"
    # INT8 logits are close to FP32 but not equal: a cosine of 1.0 cannot be met.
    create(int8_dir, out, golden_inputs=golden, golden_count=50, created="2026-01-02T03:04:05Z",
           validation=validation_for("classification", min_cosine=0.9999999))
    assert cli.main(["bundle", "verify", str(out), "--allow-unsigned", "--validate"]) == 1
    text = capsys.readouterr().out
    assert "validation FAILED" in text and re.search(r"\): cosine 0\.99\d+ < ", text), text
