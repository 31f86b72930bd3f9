"""Model version → engine through the cache: cold build, warm hit, damaged entry rebuilt, refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from daemon.config import load_model_config
from daemon.engines.cache import EngineCache
from daemon.engines.factory import EngineFactory
from daemon.engines.worker import BuildPool
from daemon.errors import ConfigError
from tests.engines.conftest import DIGITS


def _config(digits_dir: Path, extra: str):
    text = (digits_dir / "config.toml").read_text().replace('precision = "fp32"\n', "")
    (digits_dir / "config.toml").write_text(extra + text)  # top-level keys go before any [table]
    return load_model_config(digits_dir)


def _prepare(factory: EngineFactory, digits_dir: Path, config):
    return asyncio.run(factory.prepare(config, digits_dir, 1, digits_dir / "1" / "model.onnx"))


def _accuracy(engine) -> float:
    held = np.load(DIGITS / "data" / "heldout.npz")
    x = (held["x"].astype(np.float32) / 16.0)[:, None]
    logits = np.concatenate([engine.infer({"input": x[i : i + 64]}, 0)["logits"] for i in range(0, len(x), 64)])
    return float((logits.argmax(1) == held["y"]).mean())


def test_cold_build_then_warm_hit_then_damaged_entry_rebuilt(digits_dir, tmp_path):
    factory = EngineFactory(EngineCache(tmp_path / "cache", 1 << 30), BuildPool())
    config = _config(digits_dir, 'precision = "int8"\ncalibration_cache = "calib.json"\n')
    cold = _prepare(factory, digits_dir, config)
    assert not cold.cache_hit and cold.build_seconds > 0
    assert cold.engine.precision == "int8" and cold.engine.engine_id == cold.key[:16]
    assert cold.layers["int8"] > 0 and cold.layers["fp32"] == 0
    assert len(cold.calibration_cache_id) == 16
    assert _accuracy(cold.engine) >= 0.98

    warm = _prepare(factory, digits_dir, config)
    assert warm.cache_hit and warm.build_seconds is None and warm.key == cold.key

    artifact = next((tmp_path / "cache" / "entries" / cold.key).glob("engine.*"))
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    rebuilt = _prepare(factory, digits_dir, config)
    assert not rebuilt.cache_hit and rebuilt.key == cold.key
    assert _accuracy(rebuilt.engine) == _accuracy(cold.engine)


def test_precision_and_calibration_change_the_engine(digits_dir, tmp_path):
    factory = EngineFactory(EngineCache(tmp_path / "cache", 1 << 30), BuildPool())
    fp32 = _prepare(factory, digits_dir, load_model_config(digits_dir))
    int8 = _prepare(factory, digits_dir, _config(digits_dir, 'precision = "int8"\ncalibration_cache = "calib.json"\n'))
    assert fp32.key != int8.key and fp32.calibration_cache_id == ""
    assert fp32.layers["fp32"] == int8.layers["int8"]


def test_int8_without_its_cache_file_is_refused_before_any_build(digits_dir, tmp_path):
    factory = EngineFactory(EngineCache(tmp_path / "cache", 1 << 30), BuildPool())
    config = _config(digits_dir, 'precision = "int8"\ncalibration_cache = "nope.json"\n')
    with pytest.raises(ConfigError, match=r"calibration_cache: precision 'int8' needs the calibration cache .*nope.json"):
        _prepare(factory, digits_dir, config)
    assert not any((tmp_path / "cache" / "entries").iterdir())


def test_serving_options_do_not_change_the_engine(digits_dir, tmp_path):
    factory = EngineFactory(EngineCache(tmp_path / "cache", 1 << 30), BuildPool())
    first = _prepare(factory, digits_dir, load_model_config(digits_dir))
    tuned = load_model_config(digits_dir).model_copy(update={"instances": 1, "inline_below_us": 0})
    second = _prepare(factory, digits_dir, tuned)
    assert second.cache_hit and second.key == first.key, "instances and scheduling are not part of the engine"
