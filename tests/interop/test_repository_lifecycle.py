"""Model lifecycle seen from outside: explicit control, reloads under load, version
policies, broken configs, state across restarts, deadlines, queue limits, dynamic
batching, SIGTERM drain, ``make serve`` and the ``tegrad`` client commands."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.interop.conftest import DIGITS, ROOT, Server, launch
from tests.waiting import wait_until

X4 = np.arange(1, 5, dtype=np.float32)[None, :]  # [1, 4]; y / x gives the model's factor exactly


# -- helpers --------------------------------------------------------------------------------------------


def _replace(target: Path, build) -> None:
    """Write a model next to its final name and rename it, as a deployment would."""
    tmp = target.with_name(".incoming.onnx")
    build(tmp)
    os.replace(tmp, target)


def _scale_model(root: Path, version: int, factor: float, config: str = "max_batch = 8\n", name: str = "scale") -> None:
    path = root / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, partial(onnx_models.scale, factor=factor))
    (root / name / "config.toml").write_text(config)


def _scale_input(x: np.ndarray = X4) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def _factor(c, model: str = "scale", version: str = "") -> float:
    y = c.infer(model, [_scale_input()], model_version=version).as_numpy("y")
    return float((y / X4)[0, 0])


def _digits_input(n: int = 1) -> grpcclient.InferInput:
    data = np.load(DIGITS / "data" / "heldout.npz")
    x = (data["x"][:n].astype(np.float32) / 16.0)[:, None, :, :]
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def _status(err: InferenceServerException) -> str:
    return str(err.status()).removeprefix("StatusCode.")


def _expect(call, status: str, *words: str) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert _status(info.value) == status, info.value
    for word in words:
        assert word in info.value.message(), info.value.message()
    return info.value


def _index(c) -> list[tuple[str, str, str, str]]:
    return [(m.name, m.version, m.state, m.reason) for m in c.get_model_repository_index().models]


def _health(url: str) -> int:
    with grpc.insecure_channel(url) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _stats(c, model: str):
    return c.get_inference_statistics(model).model_stats[0]


# -- explicit model control ------------------------------------------------------------------------------


def test_explicit_control_load_infer_unload(server_factory, repo):
    server = server_factory(repository=repo, args=("--model-control", "explicit"))
    with grpcclient.InferenceServerClient(server.url) as c:
        assert _index(c) == [("digits", "", "UNAVAILABLE", "not loaded")]
        assert not c.is_model_ready("digits")
        _expect(lambda: c.infer("digits", [_digits_input()]), "FAILED_PRECONDITION", "not loaded", "RepositoryModelLoad")
        _expect(lambda: c.load_model("nope"), "NOT_FOUND", "'nope'")

        c.load_model("digits")
        assert c.is_model_ready("digits")
        assert _index(c) == [("digits", "1", "READY", "")]
        assert c.infer("digits", [_digits_input(3)]).as_numpy("logits").shape == (3, 10)

        c.unload_model("digits")
        assert not c.is_model_ready("digits")
        assert _index(c) == [("digits", "1", "UNAVAILABLE", "unloaded")]
        _expect(lambda: c.infer("digits", [_digits_input()]), "FAILED_PRECONDITION", "no ready version", "unloaded")

        c.load_model("digits")
        assert c.is_model_ready("digits")
        assert c.infer("digits", [_digits_input()]).as_numpy("logits").shape == (1, 10)


def test_model_control_none_refuses_load_and_unload(client):
    for call in (lambda: client.load_model("digits"), lambda: client.unload_model("digits")):
        _expect(call, "FAILED_PRECONDITION", "--model-control explicit")
    assert client.is_model_ready("digits")
    assert client.infer("digits", [_digits_input()]).as_numpy("logits").shape == (1, 10)


# -- reload under load ----------------------------------------------------------------------------------


class Hammer(threading.Thread):
    """Sends requests back to back (bounded in count and time) and records every answer."""

    def __init__(self, url: str, max_requests: int = 5000, max_seconds: float = 30) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.halt = threading.Event()
        self.answers: list[tuple[str, float]] = []  # (model version, factor)
        self.mixed: list[np.ndarray] = []
        self.failures: list[Exception] = []

    def run(self) -> None:
        end = time.monotonic() + self.max_seconds
        with grpcclient.InferenceServerClient(self.url) as c:
            while not self.halt.is_set() and len(self.answers) + len(self.failures) < self.max_requests and time.monotonic() < end:
                try:
                    result = c.infer("scale", [_scale_input()])
                except Exception as exc:  # every failure is a finding, whatever its type
                    self.failures.append(exc)
                    continue
                ratio = result.as_numpy("y") / X4
                if not np.all(ratio == ratio[0, 0]):
                    self.mixed.append(ratio)
                self.answers.append((result.get_response().model_version, float(ratio[0, 0])))

    def wait_for(self, version: str, factor: float, timeout: float = 20) -> None:
        wait_until(lambda: bool(self.answers) and self.answers[-1] == (version, factor) or bool(self.failures),
              timeout, f"answers from version {version} with factor {factor}")
        assert not self.failures, self.failures[:3]


def test_reload_and_version_changes_while_inferring(server_factory, tmp_path):
    root = tmp_path / "repo"
    _scale_model(root, 1, 1.0)
    server = server_factory(repository=root, args=("--model-control", "explicit", "--load-model", "scale"))
    hammer = Hammer(server.url)
    with grpcclient.InferenceServerClient(server.url) as c:
        hammer.start()
        try:
            hammer.wait_for("1", 1.0)
            steps = [("1", 2.0), ("1", 3.0)]
            for version, factor in steps:
                _replace(root / "scale" / "1" / "model.onnx", partial(onnx_models.scale, factor=factor))
                c.load_model("scale")
                hammer.wait_for(version, factor)
                c.load_model("scale")  # unchanged files: nothing rebuilt, nothing interrupted
            # A second version under the default policy (latest 1) takes over from version 1.
            _scale_model(root, 2, 10.0, "max_batch = 8\n[version_policy]\nlatest = 1\n")
            c.load_model("scale")
            hammer.wait_for("2", 10.0)
            assert c.get_model_metadata("scale").versions == ["2"]
            _expect(lambda: c.infer("scale", [_scale_input()], model_version="1"), "FAILED_PRECONDITION", "version 1")
            # Serving every version brings version 1 back beside 2; unversioned requests stay on 2.
            (root / "scale" / "config.toml").write_text("max_batch = 8\n[version_policy]\nall = true\n")
            c.load_model("scale")
            assert c.get_model_metadata("scale").versions == ["1", "2"]
            assert _factor(c, version="1") == 3.0
            assert _factor(c, version="2") == 10.0
            count = len(hammer.answers)
            wait_until(lambda: len(hammer.answers) > count + 20, 20, what="more answers after the last reload")
        finally:
            hammer.halt.set()
            hammer.join(30)
    assert not hammer.failures, hammer.failures[:3]
    assert not hammer.mixed, hammer.mixed[:3]
    # Answers move forward through the models in the order they were deployed, never back.
    seen = [a for i, a in enumerate(hammer.answers) if i == 0 or a != hammer.answers[i - 1]]
    assert seen == [("1", 1.0), ("1", 2.0), ("1", 3.0), ("2", 10.0)], seen
    assert len(hammer.answers) >= 50


# -- version policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy, versions, default_factor, missing", [
    ("", ["3"], 3.0, "1"),
    ("latest = 2", ["2", "3"], 3.0, "1"),
    ("all = true", ["1", "2", "3"], 3.0, None),
    ("specific = [1, 2]", ["1", "2"], 2.0, "3"),
])
def test_version_policy(server_factory, tmp_path, policy, versions, default_factor, missing):
    root = tmp_path / "repo"
    config = "max_batch = 8\n" + (f"[version_policy]\n{policy}\n" if policy else "")
    for v in (1, 2, 3):
        _scale_model(root, v, float(v), config)
    server = server_factory(repository=root)
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.get_model_metadata("scale").versions == versions
        assert _factor(c) == default_factor
        for v in versions:
            assert c.is_model_ready("scale", v)
            assert _factor(c, version=v) == float(v)
        if missing:
            assert not c.is_model_ready("scale", missing)
            _expect(lambda: c.infer("scale", [_scale_input()], model_version=missing), "NOT_FOUND", f"version {missing}")


# -- broken configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, words", [
    (lambda text: text.replace("max_batch = 64", "max_batch = 64\nmax_batchh = 3"), ["max_batchh", "unknown key"]),
    (lambda text: text.replace('datatype = "FP32"', 'datatype = "FP33"', 1), ["input.0.datatype", "FP33"]),
    (lambda text: text + "\n[dynamic_batching\n", ["not valid TOML"]),
])
def test_broken_config_fails_the_load_and_keeps_the_ready_version(server_factory, repo, edit, words):
    server = server_factory(repository=repo, args=("--model-control", "explicit", "--load-model", "digits"))
    config = repo / "digits" / "config.toml"
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.is_model_ready("digits")
        config.write_text(edit(config.read_text()))
        _expect(lambda: c.load_model("digits"), "INVALID_ARGUMENT", "digits/config.toml", *words)
        assert c.is_model_ready("digits")
        assert _index(c) == [("digits", "1", "READY", "")]
        assert c.infer("digits", [_digits_input(2)]).as_numpy("logits").shape == (2, 10)
        assert c.is_server_ready()


def test_broken_model_file_fails_the_reload_and_keeps_the_ready_version(server_factory, repo):
    server = server_factory(repository=repo, args=("--model-control", "explicit", "--load-model", "digits"))
    model = repo / "digits" / "1" / "model.onnx"
    with grpcclient.InferenceServerClient(server.url) as c:
        before = c.infer("digits", [_digits_input(2)]).as_numpy("logits")
        model.write_bytes(b"not an onnx model")
        _expect(lambda: c.load_model("digits"), "INVALID_ARGUMENT", "digits/1/model.onnx", "version 1")
        np.testing.assert_array_equal(c.infer("digits", [_digits_input(2)]).as_numpy("logits"), before)
        assert c.is_model_ready("digits") and c.is_server_ready()


# -- state across restarts ------------------------------------------------------------------------------


def test_loaded_models_come_back_after_restart(server_factory, repo, tmp_path):
    state = tmp_path / "state"
    args = ("--model-control", "explicit")
    first = server_factory(repository=repo, state_dir=state, args=args)
    with grpcclient.InferenceServerClient(first.url) as c:
        c.load_model("digits")
    assert first.stop() == 0, first.log()

    second = server_factory(repository=repo, state_dir=state, args=args)
    with grpcclient.InferenceServerClient(second.url) as c:
        assert c.is_model_ready("digits")
        assert _index(c) == [("digits", "1", "READY", "")]
        assert c.infer("digits", [_digits_input()]).as_numpy("logits").shape == (1, 10)
        c.unload_model("digits")
    assert second.stop() == 0, second.log()

    third = server_factory(repository=repo, state_dir=state, args=args)
    with grpcclient.InferenceServerClient(third.url) as c:
        assert not c.is_model_ready("digits")


# -- scheduling: deadlines, queue limit, dynamic batching ------------------------------------------------


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory) -> Path:
    return onnx_models.slow(tmp_path_factory.mktemp("slow") / "model.onnx")


def _slow_repo(root: Path, slow_onnx: Path, config: str) -> Path:
    (root / "slow" / "1").mkdir(parents=True)
    shutil.copy(slow_onnx, root / "slow" / "1" / "model.onnx")
    (root / "slow" / "config.toml").write_text(config)
    return root


def _slow_input(rows: int) -> grpcclient.InferInput:
    inp = grpcclient.InferInput("x", [rows, 256], "FP32")
    inp.set_data_from_numpy(np.full((rows, 256), 0.01, np.float32))
    return inp


def _rows_for(c, seconds: float) -> int:
    """Rows that keep the slow model busy for about ``seconds`` on this machine."""
    c.infer("slow", [_slow_input(64)])
    start = time.perf_counter()
    for _ in range(3):
        c.infer("slow", [_slow_input(256)])
    per_row = (time.perf_counter() - start) / 3 / 256
    return int(min(20000, max(256, seconds / per_row)))


def _fire(c, model: str, inputs, n: int, **kwargs) -> queue.Queue:
    """Sends ``n`` requests at once; each answer lands in the queue as (index, result, error, seconds)."""
    answers: queue.Queue = queue.Queue()
    start = time.perf_counter()
    for i in range(n):
        # tritonclient calls back with keywords result= and error=.
        def done(result, error, i=i):
            answers.put((i, result, error, time.perf_counter() - start))

        c.async_infer(model, inputs(i), done, **kwargs)
    return answers


def _collect(answers: queue.Queue, n: int, timeout: float = 30) -> list:
    return sorted((answers.get(timeout=timeout) for _ in range(n)), key=lambda a: a[0])


def test_request_whose_deadline_passes_in_the_queue_is_not_executed(server_factory, tmp_path, slow_onnx):
    root = _slow_repo(tmp_path / "repo", slow_onnx, "max_batch = 0\ninstances = 1\n")
    server = server_factory(repository=root)
    with grpcclient.InferenceServerClient(server.url) as c:
        rows = _rows_for(c, 0.25)
        before = _stats(c, "slow")
        flood = _fire(c, "slow", lambda i: [_slow_input(rows)], 3)
        time.sleep(0.03)
        # Both wait behind ~0.75 s of work: one with the timeout parameter (µs), one with a gRPC deadline.
        # The gRPC deadline is generous enough that the request reaches the handler even on a loaded
        # 2-core machine (a deadline that passes in transit is never seen by the server, so not counted).
        late = _fire(c, "slow", lambda i: [_slow_input(1)], 1, timeout=20_000)
        with pytest.raises(InferenceServerException) as info:
            c.infer("slow", [_slow_input(1)], client_timeout=0.25)
        assert _status(info.value) == "DEADLINE_EXCEEDED", info.value
        [(_, _, error, _)] = _collect(late, 1)
        assert error is not None and _status(error) == "DEADLINE_EXCEEDED", error
        assert "deadline passed" in error.message() and "in the queue" in error.message()
        assert all(e is None for _, _, e, _ in _collect(flood, 3))

        flood = _fire(c, "slow", lambda i: [_slow_input(rows)], 2)
        time.sleep(0.03)
        assert c.infer("slow", [_slow_input(1)], timeout=30_000_000).as_numpy("y").shape == (1, 256)
        assert all(e is None for _, _, e, _ in _collect(flood, 2))

        def settled():
            s = _stats(c, "slow")
            return s.inference_stats.fail.count - before.inference_stats.fail.count == 2
        wait_until(settled, 20, what="both expired requests to count as failures")
        after = _stats(c, "slow")
    assert after.inference_stats.success.count - before.inference_stats.success.count == 6
    assert after.execution_count - before.execution_count == 6  # 5 flood + 1 generous; the expired never ran
    assert after.inference_count - before.inference_count == 6


def test_full_queue_refuses_quickly_and_stays_healthy(server_factory, tmp_path, slow_onnx):
    config = "max_batch = 0\ninstances = 1\n[dynamic_batching]\nmax_queue_size = 2\n"
    server = server_factory(repository=_slow_repo(tmp_path / "repo", slow_onnx, config))
    with grpcclient.InferenceServerClient(server.url) as c:
        rows = _rows_for(c, 0.1)
        n = 10
        answers = _collect(_fire(c, "slow", lambda i: [_slow_input(rows)], n), n)
        ok = [a for a in answers if a[2] is None]
        refused = [a for a in answers if a[2] is not None]
        assert all(_status(e) == "RESOURCE_EXHAUSTED" and "queue is full" in e.message() for _, _, e, _ in refused), refused
        assert len(refused) >= 1 and len(ok) >= 2, answers
        assert max(t for *_, t in refused) < max(t for *_, t in ok)
        for _, result, _, _ in ok:
            assert result.as_numpy("y").shape == (rows, 256)
        assert c.is_server_ready() and _health(server.url) == health_pb2.HealthCheckResponse.SERVING
        assert c.infer("slow", [_slow_input(1)]).as_numpy("y").shape == (1, 256)


def test_dynamic_batching_merges_concurrent_requests(server_factory, tmp_path):
    root = tmp_path / "repo"
    _scale_model(root, 1, 2.0, "max_batch = 8\ninstances = 1\n[dynamic_batching]\nmax_queue_delay_us = 20000\n")
    server = server_factory(repository=root)
    xs = [np.full((1, 4), i + 1, np.float32) * X4 for i in range(8)]
    with grpcclient.InferenceServerClient(server.url) as c:
        answers = _collect(_fire(c, "scale", lambda i: [_scale_input(xs[i])], 8), 8)
        for i, result, error, _ in answers:
            assert error is None, error
            np.testing.assert_array_equal(result.as_numpy("y"), xs[i] * 2)
        stats = _stats(c, "scale")
    assert stats.inference_count == 8 and stats.inference_stats.success.count == 8
    assert any(b.batch_size > 1 for b in stats.batch_stats), stats.batch_stats
    assert stats.execution_count < 8
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == 8


# -- SIGTERM drain --------------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(server_factory, tmp_path, slow_onnx):
    root = _slow_repo(tmp_path / "repo", slow_onnx, "max_batch = 0\ninstances = 1\n")
    server = server_factory(repository=root, args=("--drain-timeout", "20"))
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    c = grpcclient.InferenceServerClient(server.url)
    watch_channel = grpc.insecure_channel(server.url)
    try:
        # A load balancer's health watch, open across the shutdown.
        watch = health_pb2_grpc.HealthStub(watch_channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == serving
        rows = _rows_for(c, 0.4)
        flood = _fire(c, "slow", lambda i: [_slow_input(rows)], 3)
        time.sleep(0.1)  # the first is running, two wait in the queue
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == not_serving
        assert _health(server.url) == not_serving
        with grpcclient.InferenceServerClient(server.url) as fresh:
            assert not fresh.is_server_ready()
            _expect(lambda: fresh.infer("slow", [_slow_input(1)]), "UNAVAILABLE", "shutting down")
        answers = _collect(flood, 3)
        assert all(e is None for _, _, e, _ in answers), answers
        for _, result, _, _ in answers:
            assert result.as_numpy("y").shape == (rows, 256)
        assert server.proc.wait(20) == 0, server.log()
        # Idle streams (the watch) must not hold the exit until the drain timeout.
        assert time.monotonic() - signalled < 10, server.log()
    finally:
        watch_channel.close()
        c.close()
    assert "tegrad stopped" in server.log()
    with pytest.raises(grpc.RpcError) as err:
        _health(server.url)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# -- make serve and the tegrad client commands ----------------------------------------------------------


def _make_serve(state_dir: Path, timeout: float = 90) -> Server:
    """``make serve`` as the README gives it; SERVE_ARGS carries what start_server would append."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "tegrad").exists():
        pytest.skip(f"tegrad is not installed in {venv}")
    serve_args = f"--host 127.0.0.1 --grpc-port 0 --metrics-port 0 --state-dir {state_dir}"
    # -o: the test runs tegrad from this checkout as installed, never pip inside a test.
    cmd = ["make", "-s", "-o", f"{venv}/.installed", "serve", f"VENV={venv}", f"SERVE_ARGS={serve_args}"]
    return launch(cmd, timeout=timeout, start_new_session=True)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def test_make_serve_answers_and_stops_cleanly(tmp_path):
    server = _make_serve(tmp_path / "state")
    try:
        with grpcclient.InferenceServerClient(server.url) as c:
            assert c.is_server_ready()
            data = np.load(DIGITS / "data" / "heldout.npz")
            result = c.infer("digits", [_digits_input(8)])
            assert list(result.as_numpy("logits").argmax(1)) == [int(v) for v in data["y"][:8]]
        # make does not pass SIGTERM on to its recipe, so signal tegrad itself, as systemd
        # or a terminal would by signalling the whole group; make then exits with its status.
        tegrad = _children(server.proc.pid)
        assert len(tegrad) == 1, tegrad
        os.kill(tegrad[0], signal.SIGTERM)
        assert server.proc.wait(30) == 0, server.log()
        assert "tegrad stopped" in server.log()
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
    wait_until(lambda: not _group_alive(server.proc.pid), 10, "make's process group to exit")


def _tegrad(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_cli_health_models_infer(digits_server):
    url = ("--url", digits_server.url)
    health = _tegrad("health", *url)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING", health

    models = _tegrad("models", *url)
    assert models.returncode == 0, models
    header, *rows = models.stdout.splitlines()
    assert header.split() == ["MODEL", "VERSION", "STATE", "BACKEND", "PRECISION", "ENGINE", "CALIBRATION",
                              "LAYERS(i8/f16/f32)", "AGREEMENT", "DRIFT", "REASON"]
    [row] = [r.split() for r in rows]
    # fp32 serves unmonitored: no live agreement or drift
    assert row[:5] == ["digits", "1", "READY", "onnxruntime", "fp32"] and row[6:] == ["-", "0/0/5", "-", "-"]
    assert re.fullmatch(r"[0-9a-f]{16}", row[5]), row

    infer = _tegrad("infer", "-k", "3", *url)
    assert infer.returncode == 0, infer
    lines = infer.stdout.splitlines()
    assert lines[0] == "model digits version 1"
    classes = lines[1].removeprefix("logits: ").split()
    assert lines[1].startswith("logits: ") and len(classes) == 3
    scores = [float(c.split(":")[0]) for c in classes]
    assert scores == sorted(scores, reverse=True)
    assert all(c.split(":")[1] == c.split(":")[2] for c in classes)  # digits' labels are the indices

    bad = _tegrad("infer", "-m", "nope", *url)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "'nope'" in bad.stderr


def test_cli_health_fails_when_not_ready_or_unreachable(server_factory, repo, tmp_path):
    (repo / "digits" / "1" / "model.onnx").write_bytes(b"broken")
    server = server_factory(repository=repo, args=("--model-control", "explicit", "--load-model", "digits",
                                                   "--exit-on-error=false"))
    health = _tegrad("health", "--url", server.url)
    assert health.returncode == 1 and health.stdout.strip() == "NOT_SERVING", health
    models = _tegrad("models", "--url", server.url)
    assert models.returncode == 0 and "UNAVAILABLE" in models.stdout and "cannot load" in models.stdout, models

    port = server.grpc_port
    assert server.stop() == 0, server.log()
    gone = _tegrad("health", "--url", f"127.0.0.1:{port}", "--timeout", "2")
    assert gone.returncode == 1 and "UNAVAILABLE" in gone.stderr, gone
