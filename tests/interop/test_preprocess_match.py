"""An INT8 model whose calibration cache records other preprocessing than the served [preprocess]
is refused with both sides named (DeepStream's model-color-format mistake); allow_preprocess_mismatch
serves it with a WARNING; a cache that records none is served with an INFO line."""

from __future__ import annotations

import json
import shutil

import tritonclient.grpc as grpcclient

from tests.interop.conftest import DIGITS

SERVED = {"size": [8, 8], "resize": "stretch", "interpolation": "area", "color": "GRAY",
          "scale": [0.00392156862745098], "layout": "NCHW"}


def _model(root, name: str, recorded: dict | None, extra: str = "") -> None:
    model = root / name
    shutil.copytree(DIGITS, model)
    cache = json.loads((DIGITS / "calib.json").read_text())
    cache["preprocess"] = recorded
    (model / "calib.json").write_text(json.dumps(cache))
    text = (model / "config.toml").read_text().replace(
        'precision = "fp32"', f'precision = "int8"\ncalibration_cache = "calib.json"\n{extra}')
    (model / "config.toml").write_text(text)


def test_cache_preprocessing_must_match_what_is_served(server_factory, tmp_path):
    root = tmp_path / "repo"
    _model(root, "same", SERVED)
    _model(root, "bgr", {**SERVED, "color": "BGR", "scale": [0.0625]})
    _model(root, "allowed", {**SERVED, "size": [16, 16]}, "allow_preprocess_mismatch = true")
    _model(root, "tensors", None)
    server = server_factory(repository=root, args=("--exit-on-error=false",))
    with grpcclient.InferenceServerClient(server.url) as c:
        index = {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}
        assert index["same"][0] == "READY" and index["tensors"][0] == "READY" and index["allowed"][0] == "READY", index
        state, reason = index["bgr"]
        assert state == "UNAVAILABLE", index
        for words in ("calibrated with other preprocessing", "color: cache BGR, served GRAY",
                      "normalisation: cache scale=[0.0625], served scale=[0.00392156862745098]",
                      "allow_preprocess_mismatch = true", "tegrad calibrate --config"):
            assert words in reason, (words, reason)
    log = server.log()
    assert "WARNING" in log and "model allowed: calibration cache calib.json" in log
    assert "size: cache [16, 16], served [8, 8]" in log
    assert "model tensors: calibration cache calib.json records no preprocessing" in log
