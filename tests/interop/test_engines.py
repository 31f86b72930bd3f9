"""Engines built on the device, seen from outside: precision over gRPC, the engine cache across
restarts, a damaged cache entry, a build worker killed mid-build, and precision in metrics."""

from __future__ import annotations

import os
import re
import shutil
import signal
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.interop.conftest import DIGITS
from tests.waiting import wait_until

INT8 = 'precision = "int8"\ncalibration_cache = "calib.json"\n'


def _repo(root, *models: tuple[str, str]):
    """Copies of the digits model under the given names, each with extra config lines."""
    for name, extra in models:
        dst = root / name
        shutil.copytree(DIGITS, dst, ignore=shutil.ignore_patterns("data", "README.md"))
        text = (dst / "config.toml").read_text().replace('precision = "fp32"\n', "")
        (dst / "config.toml").write_text(extra + text)  # top-level keys go before any [table]
    return root


def _accuracy(c, model: str) -> float:
    held = np.load(DIGITS / "data" / "heldout.npz")
    x = (held["x"].astype(np.float32) / 16.0)[:, None]
    correct = 0
    for i in range(0, len(x), 64):
        inp = grpcclient.InferInput("input", list(x[i : i + 64].shape), "FP32")
        inp.set_data_from_numpy(x[i : i + 64])
        correct += int((c.infer(model, [inp]).as_numpy("logits").argmax(1) == held["y"][i : i + 64]).sum())
    return correct / len(x)


def _metric(server, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_int8_model_served_with_fp32_accuracy_and_its_precision_visible(server_factory, tmp_path):
    root = _repo(tmp_path / "repo", ("fp32", ""), ("int8", INT8))
    server = server_factory(repository=root)
    with grpcclient.InferenceServerClient(server.url) as c:
        fp32, int8 = _accuracy(c, "fp32"), _accuracy(c, "int8")
        assert fp32 > 0.98 and abs(int8 - fp32) <= 0.01, (fp32, int8)
        cfg = c.get_model_config("int8").config
        assert cfg.parameters["precision"].string_value == "int8"
        assert len(cfg.parameters["engine_id"].string_value) == 16
        assert len(cfg.parameters["calibration_cache_id"].string_value) == 16
        assert cfg.parameters["layers_int8"].string_value not in ("", "0")
        assert c.get_model_config("fp32").config.parameters["calibration_cache_id"].string_value == ""
        assert c.get_model_metadata("int8").platform == "onnxruntime_onnx"
    assert _metric(server, "tegrad_engine_layers", model="int8", precision="int8") > 0
    assert _metric(server, "tegrad_engine_layers", model="int8", precision="fp32") == 0
    assert _metric(server, "tegrad_model_info", model="int8", precision="int8", backend="onnxruntime") == 1
    assert _metric(server, "tegrad_engine_builds_total", precision="int8", result="success") == 1
    assert _metric(server, "tegrad_engine_build_duration_seconds_count", backend="onnxruntime", precision="int8") == 1


def test_int8_without_calibration_cache_does_not_load_and_says_why(server_factory, tmp_path):
    root = _repo(tmp_path / "repo", ("good", ""), ("nocache", 'precision = "int8"\ncalibration_cache = "missing.json"\n'))
    server = server_factory(repository=root, args=("--exit-on-error=false",))
    with grpcclient.InferenceServerClient(server.url) as c:
        index = {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}
        assert index["nocache"][0] == "UNAVAILABLE" and "missing.json" in index["nocache"][1]
        assert "does not exist" in index["nocache"][1]
        assert c.is_model_ready("good")


def test_warm_restart_serves_from_the_cache_and_a_damaged_entry_is_rebuilt(server_factory, tmp_path):
    root = _repo(tmp_path / "repo", ("digits", INT8))
    state = tmp_path / "state"
    first = server_factory(repository=root, state_dir=state)
    with grpcclient.InferenceServerClient(first.url) as c:
        engine_id = c.get_model_config("digits").config.parameters["engine_id"].string_value
        reference = _accuracy(c, "digits")
    assert _metric(first, "tegrad_engine_builds_total", result="success") == 1
    assert first.stop() == 0

    warm = server_factory(repository=root, state_dir=state)
    with grpcclient.InferenceServerClient(warm.url) as c:
        assert c.get_model_config("digits").config.parameters["engine_id"].string_value == engine_id
        assert _accuracy(c, "digits") == reference
    assert _metric(warm, "tegrad_engine_builds_total") == 0, "a warm start builds nothing"
    assert _metric(warm, "tegrad_engine_cache_lookups_total", result="hit") == 1
    assert warm.stop() == 0

    [artifact] = (state / "engines" / "entries").glob("*/engine.onnx")
    artifact.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])  # truncated
    healed = server_factory(repository=root, state_dir=state)
    with grpcclient.InferenceServerClient(healed.url) as c:
        assert c.get_model_config("digits").config.parameters["engine_id"].string_value == engine_id
        assert _accuracy(c, "digits") == reference
    assert _metric(healed, "tegrad_engine_cache_lookups_total", result="corrupt") == 1
    assert _metric(healed, "tegrad_engine_builds_total", result="success") == 1


def test_build_worker_killed_leaves_the_serving_version_untouched(server_factory, tmp_path):
    root = _repo(tmp_path / "repo", ("digits", ""))
    server = server_factory(repository=root, args=("--model-control", "explicit", "--load-model", "digits"))
    with grpcclient.InferenceServerClient(server.url) as c:
        before = _accuracy(c, "digits")
        shutil.copytree(root / "digits" / "1", root / "digits" / "2")
        (root / "digits" / "config.toml").write_text(INT8 + (root / "digits" / "config.toml").read_text())
        errors: list[Exception] = []

        def load():
            try:
                c.load_model("digits")
            except InferenceServerException as exc:
                errors.append(exc)

        import threading

        loader = threading.Thread(target=load)
        loader.start()

        def building_pid():
            for m in c.get_model_repository_index().models:
                found = re.search(r"worker pid (\d+)", m.reason)
                if m.version == "2" and found:
                    return int(found.group(1))
            return None

        os.kill(wait_until(building_pid, 60, what="version 2 to report its build worker"), signal.SIGKILL)
        loader.join(60)
        assert errors and "SIGKILL" in errors[0].message(), errors
        index = {(m.name, m.version): (m.state, m.reason) for m in c.get_model_repository_index().models}
        assert index[("digits", "2")][0] == "UNAVAILABLE" and "killed by SIGKILL" in index[("digits", "2")][1]
        assert index[("digits", "1")][0] == "READY"
        assert _accuracy(c, "digits") == before, "version 1 keeps serving"
        with pytest.raises(InferenceServerException):
            c.infer("digits", [], model_version="2")
    assert _metric(server, "tegrad_engine_builds_total", result="killed") == 1


def test_reload_picks_up_a_new_calibration_cache(server_factory, tmp_path):
    import json

    root = _repo(tmp_path / "repo", ("digits", INT8))
    server = server_factory(repository=root, args=("--model-control", "explicit", "--load-model", "digits"))
    with grpcclient.InferenceServerClient(server.url) as c:
        params = c.get_model_config("digits").config.parameters
        before = (params["engine_id"].string_value, params["calibration_cache_id"].string_value)
        cache = root / "digits" / "calib.json"
        data = json.loads(cache.read_text())
        data["amax"] = {k: v * 1.05 for k, v in data["amax"].items()}  # recalibrated: same model, other ranges
        cache.write_text(json.dumps(data))
        c.load_model("digits")
        params = c.get_model_config("digits").config.parameters
        after = (params["engine_id"].string_value, params["calibration_cache_id"].string_value)
        assert after[0] != before[0] and after[1] != before[1], (before, after)
        assert _accuracy(c, "digits") > 0.97
