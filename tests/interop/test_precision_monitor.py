"""Live precision monitoring against a tegrad in its own process: the FP32 shadow comparison
agrees with an offline one, shifted inputs raise drift and saturation, a bad INT8 version that a
rollout activated is rolled back on its own (a good one is not), and dropping samples under load
never fails a live request."""

from __future__ import annotations

import re
import shutil
import threading
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from calib import algorithms
from calib.cache import CalibrationCache
from calib.observe import observe
from tests.interop.conftest import DIGITS
from tests.interop.rollout_support import (
    heldout_digits,
    make_bundle,
    make_keys,
    op_state,
    push,
    start_device,
    version_states,
)
from tests.waiting import wait_until

MODEL = DIGITS / "1" / "model.onnx"


def _calibration_cache(path: Path, divide: float = 1.0) -> Path:
    """Entropy calibration on the shipped calibration split, with input statistics; ranges / ``divide``."""
    with np.load(DIGITS / "data" / "calib.npz") as z:
        x = (z["x"].astype(np.float32) / 16).reshape(-1, 1, 8, 8)
    obs = observe(MODEL, x, batch_size=64, progress=False)
    amax = {k: v / divide for k, v in algorithms.compute_all(obs, "entropy").items()}
    CalibrationCache(amax, "entropy", num_samples=obs.num_samples, model_sha256=obs.model_sha256,
                     source=dict(obs.source or {})).save(path)
    return path


def _model_dir(root: Path, monitor: str, divide: float = 1.0) -> Path:
    d = root / "digits"
    d.mkdir(parents=True)
    shutil.copy(MODEL, d / "model.onnx")
    shutil.copy(DIGITS / "labels.txt", d / "labels.txt")
    _calibration_cache(d / "calib.json", divide)
    config = (DIGITS / "config.toml").read_text().replace(
        'precision = "fp32"', 'precision = "int8"\ncalibration_cache = "calib.json"')
    (d / "config.toml").write_text(config + "\n[monitor]\n" + monitor)
    return d


def _repository(root: Path, monitor: str) -> Path:
    model = _model_dir(root / "src", monitor)
    repo = root / "repo"
    (repo / "digits" / "1").mkdir(parents=True)
    shutil.move(str(model / "model.onnx"), repo / "digits" / "1" / "model.onnx")
    for f in model.iterdir():
        shutil.move(str(f), repo / "digits" / f.name)
    return repo


def _metrics(server) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name):line.index("}") + 1]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _samples(server, result: str, version: str = "1") -> float:
    return _value(_metrics(server), "tegrad_precision_samples_total", model="digits", version=version,
                  result=result) or 0.0


def _infer(client, x: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("digits", [inp]).as_numpy("logits")


def _one_by_one(server, client, xs: np.ndarray, version: str = "1") -> np.ndarray:
    """Each sample in its own request, the next only after the monitor compared the previous one."""
    out = []
    for x in xs:
        before = _samples(server, "compared", version)
        out.append(_infer(client, x[None])[0])
        wait_until(lambda b=before: _samples(server, "compared", version) > b, timeout=30, interval=0.02)
    return np.stack(out)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    from tests.interop.conftest import start_server

    root = tmp_path_factory.mktemp("monitor")
    repo = _repository(root, "shadow_rate = 1.0\nshadow_max_cpu = 1.0\nwindow = 64\n")
    server = start_server(repository=repo, state_dir=root / "state")
    yield server
    assert server.stop() == 0, server.log()


def test_live_agreement_equals_the_offline_comparison(monitored):
    x, _ = heldout_digits()
    xs = x[:64]
    with grpcclient.InferenceServerClient(monitored.url) as client:
        served = _one_by_one(monitored, client, xs)
    ref = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).run(["logits"], {"input": xs})[0]
    top1 = float((served.argmax(1) == ref.argmax(1)).mean())
    s, r = served.astype(np.float64), ref.astype(np.float64)
    cosine = float(np.mean((s * r).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(r, axis=1))))
    text = _metrics(monitored)
    assert _value(text, "tegrad_precision_agreement", model="digits", version="1",
                  metric="top1_agreement") == pytest.approx(top1, abs=1e-9)
    assert _value(text, "tegrad_precision_agreement", model="digits", version="1",
                  metric="cosine") == pytest.approx(cosine, abs=1e-6)
    assert _value(text, "tegrad_input_drift_score", model="digits", version="1") < 0.25
    assert _samples(monitored, "failed") == 0


def test_shifted_inputs_raise_drift_and_saturation(monitored):
    x, _ = heldout_digits()
    with grpcclient.InferenceServerClient(monitored.url) as client:
        _one_by_one(monitored, client, x[64:128])
        text = _metrics(monitored)
        drift_held = _value(text, "tegrad_input_drift_score", model="digits", version="1")
        sat_held = _value(text, "tegrad_calibration_saturation_max", model="digits", version="1")
        _one_by_one(monitored, client, x[128:192] * 4)  # a full window of inputs four times too bright
        text = _metrics(monitored)
    drift = _value(text, "tegrad_input_drift_score", model="digits", version="1")
    sat = _value(text, "tegrad_calibration_saturation_max", model="digits", version="1")
    assert drift_held < 0.1 and drift >= 0.25, (drift_held, drift)
    assert sat > max(10 * sat_held, 0.05), (sat_held, sat)
    tensors = [line for line in text.splitlines() if line.startswith("tegrad_calibration_saturation_ratio{")]
    assert 1 <= len(tensors) <= 16


def test_dropping_under_load_never_fails_a_live_request(tmp_path, server_factory):
    repo = _repository(tmp_path, "shadow_rate = 1.0\nshadow_max_cpu = 0.05\n")
    server = server_factory(repository=repo)
    x, _ = heldout_digits()
    errors: list[BaseException] = []

    def loop(offset: int) -> None:
        try:
            with grpcclient.InferenceServerClient(server.url) as client:
                for i in range(40):
                    j = (offset * 40 + i) % 440
                    out = _infer(client, x[j:j + 4])
                    assert out.shape == (4, 10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert _samples(server, "dropped") > 0
    outcomes = _metrics(server)
    assert _value(outcomes, "tegrad_requests_total", model="digits", version="1", outcome="success") == 240


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


def _bundle(root: Path, version: int, key: Path, divide: float) -> Path:
    monitor = "shadow_rate = 1.0\nshadow_max_cpu = 1.0\nwindow = 64\nmin_samples = 32\nrollback_below = { top1_agreement = 0.95 }\n"
    source = _model_dir(root / f"v{version}", monitor, divide)
    # The lab's golden samples would have caught it; this fleet's thresholds are what let it through.
    return make_bundle(source, root / f"digits-v{version}.tegrad", version, key,
                       validation={"task": "classification", "min_top1_agreement": 0.0, "min_cosine": 0.0})


def test_a_bad_int8_rollout_is_rolled_back_and_a_good_one_is_not(tmp_path, keys):
    device = start_device(tmp_path, keys.trust_dir)
    x, _ = heldout_digits()
    try:
        bad = push(device.admin(), _bundle(tmp_path, 2, keys.signer, divide=8.0), activate=True)
        assert op_state(bad) == "SUCCEEDED", bad
        assert version_states(device.admin())[2] == "ACTIVE"
        with grpcclient.InferenceServerClient(device.server.url) as client:
            i = 0

            def rolled_back() -> bool:
                nonlocal i
                _infer(client, x[i % 440:i % 440 + 4])
                i += 4
                return version_states(device.admin()).get(1) == "ACTIVE"

            wait_until(rolled_back, timeout=120, interval=0)
        states = version_states(device.admin())
        assert states[1] == "ACTIVE" and states[2] != "ACTIVE", states
        text = _metrics(device.server)
        assert _value(text, "tegrad_precision_rollbacks_total", model="digits") == 1
        assert '"event": "precision_rollback"' in device.server.log()

        good = push(device.admin(), _bundle(tmp_path, 3, keys.signer, divide=1.0), activate=True)
        assert op_state(good) == "SUCCEEDED", good
        with grpcclient.InferenceServerClient(device.server.url) as client:
            _one_by_one(device.server, client, x[:64], version="3")
        assert version_states(device.admin())[3] == "ACTIVE"
        agreement = _value(_metrics(device.server), "tegrad_precision_agreement", model="digits", version="3",
                           metric="top1_agreement")
        assert agreement >= 0.95
        assert _value(_metrics(device.server), "tegrad_precision_rollbacks_total", model="digits") == 1
    finally:
        assert device.server.stop() == 0, device.server.log()
