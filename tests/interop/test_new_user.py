"""A new user's path, as the README gives it, with the ``tegrad`` command in a temporary directory:
the shipped sample image, missing file arguments, bundle create/inspect, push with --state-dir and its
pre-flight, the operations watch, ``make serve``'s state dir and ``tegrad perf``."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.interop.conftest import DIGITS, ROOT
from tests.interop.rollout_support import short_dir

SAMPLES = DIGITS / "samples"
HELDOUT = DIGITS / "data" / "heldout.npz"


def tegrad(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _one_line_refusal(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---- quick start ---------------------------------------------------------------------------------
def test_the_sample_image_ships_and_is_read_as_its_digit(digits_server, tmp_path):
    r = tegrad("infer", "--url", digits_server.url, "--image", str(SAMPLES / "digit-3.png"), "-k", "3",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    top = [line for line in r.stdout.splitlines() if line.startswith("logits")]
    assert top and top[0].split()[1].split(":")[-1] == "3", r.stdout  # score:index:label, best first


MISSING = [
    (["infer", "--image", "digit.png"], "--image digit.png"),
    (["infer", "-i", "input=nothing.npy"], "--input nothing.npy"),
    (["serve", "--model-repository", "no-repo"], "--model-repository no-repo: no such directory"),
    (["bundle", "create", "no-model", "-o", "x.tegrad", "--golden-inputs", str(HELDOUT)], "MODEL no-model"),
    (["bundle", "create", str(DIGITS), "-o", "x.tegrad", "--golden-inputs", "golden.npz"],
     "--golden-inputs golden.npz"),
    (["bundle", "sign", "b.tegrad", "--key", "k.key"], "BUNDLE b.tegrad"),
    (["bundle", "verify", "b.tegrad", "--allow-unsigned"], "BUNDLE b.tegrad"),
    (["bundle", "inspect", "b.tegrad"], "BUNDLE b.tegrad"),
    (["push", "b.tegrad"], "BUNDLE b.tegrad"),
    (["calibrate", "m.onnx", "--data", "imgs/"], "MODEL m.onnx"),
    (["calibrate", str(DIGITS / "1" / "model.onnx"), "--data", "imgs/"], "--data imgs/"),
    (["quantize", str(DIGITS / "1" / "model.onnx"), "--cache", "c.json"], "--cache c.json"),
    (["sensitivity", "m.onnx", "--cache", "c.json", "--data", "d"], "MODEL m.onnx"),
    (["evaluate", str(DIGITS / "1" / "model.onnx"), "cand.onnx", "--data", "d"], "CANDIDATE cand.onnx"),
    (["cache", "convert", "c.json", "c.cache"], "INPUT c.json"),
    (["perf", "digits", "--image", "photos"], "--image photos"),
]


@pytest.mark.parametrize("args,needle", MISSING, ids=[" ".join(a[:2]) + f" {n.split()[0]}" for a, n in MISSING])
def test_a_missing_file_argument_is_one_line_naming_it(tmp_path, args, needle):
    _one_line_refusal(tegrad(*args, cwd=tmp_path), f"tegrad {args[0]}", needle)


# ---- bundles -------------------------------------------------------------------------------------
def test_bundle_create_from_the_shipped_data_and_images(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(DIGITS, repo / "digits", ignore=shutil.ignore_patterns("data", "samples", "README.md"))
    r = tegrad("bundle", "create", "repo/digits/1", "--version", "4", "-o", "digits-4.tegrad",
               "--golden-inputs", str(HELDOUT), "--golden-scale", "0.0625", "--golden-count", "64", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "digits v4 (fp32)" in r.stdout and "64 golden samples" in r.stdout
    r = tegrad("bundle", "inspect", "digits-4.tegrad", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "model       digits version 4" in r.stdout
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.startswith("  ")}
    assert set(rows) == {"model.onnx", "config.toml", "labels.txt", "golden.npz"}
    # 64 samples: 16 KiB of inputs and 2.5 KiB of logits, deflated
    golden = rows["golden.npz"]
    assert golden[2] == "KiB" and float(golden[1]) < 16, golden
    assert sum(float(v[3]) for v in rows.values()) == pytest.approx(100, abs=0.5)

    r = tegrad("bundle", "create", "repo/digits", "--version", "5", "-o", "digits-5.tegrad",
               "--golden-inputs", str(SAMPLES), cwd=tmp_path)
    assert r.returncode == 0 and "8 golden samples" in r.stdout, r.stderr  # --golden-count 8 of the 10
    r = tegrad("bundle", "verify", "digits-5.tegrad", "--allow-unsigned", "--validate", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validation passed" in r.stdout

    r = tegrad("bundle", "create", "repo/digits", "--model-version", "1", "-o", "old.tegrad",
               "--golden-inputs", str(HELDOUT), cwd=tmp_path)
    assert r.returncode == 0 and "digits v1" in r.stdout, r.stderr
    assert "--model-version is deprecated" in r.stderr and "--version 1" in r.stderr

    import numpy as np

    np.savez(tmp_path / "wrong.npz", pixels=np.zeros((4, 64), np.float32), labels=np.zeros(4))
    r = tegrad("bundle", "create", "repo/digits", "-o", "w.tegrad", "--golden-inputs", "wrong.npz", cwd=tmp_path)
    _one_line_refusal(r, "'pixels', 'labels'", "the model's inputs are input")
    assert not (tmp_path / "w.tegrad").exists()


# ---- push, pre-flight, state dir, watch -----------------------------------------------------------
def _bundle(tmp_path: Path, version: int, *key: str) -> Path:
    out = tmp_path / f"digits-{version}.tegrad"
    r = tegrad("bundle", "create", str(DIGITS), "--version", str(version), "-o", str(out),
               "--golden-inputs", str(HELDOUT), "--golden-scale", "0.0625", *key, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return out


def test_push_to_the_embedded_repository_fails_before_uploading(server_factory, tmp_path):
    state = short_dir() / "state"
    try:
        server_factory(state_dir=state)
        bundle = _bundle(tmp_path, 2)
        start = time.monotonic()
        r = tegrad("push", str(bundle), "--state-dir", str(state), cwd=tmp_path)
        _one_line_refusal(r, "tegrad push: FAILED_PRECONDITION", "embedded default repository",
                          "--model-repository DIR")
        assert "uploading" not in r.stderr and "uploaded" not in r.stdout
        uploads = [p for p in state.rglob("*") if p.suffix in (".part", ".tegrad")]
        assert uploads == [], uploads
        assert time.monotonic() - start < 60
    finally:
        shutil.rmtree(state.parent, ignore_errors=True)


def test_push_activate_rollback_with_the_state_dir_and_the_watch(server_factory, repo, tmp_path):
    state = short_dir() / "state"
    watch = None
    try:
        r = tegrad("bundle", "keygen", "--out", "keys", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        (tmp_path / "trust").mkdir()
        shutil.copy(tmp_path / "keys" / "tegrad.pub", tmp_path / "trust")
        server_factory(repository=repo, state_dir=state, args=("--trust-dir", str(tmp_path / "trust")))
        env = {"TEGRAD_STATE_DIR": str(state)}
        watch = subprocess.Popen([sys.executable, "-m", "daemon", "rollout", "operations", "--watch"],
                                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
        seen: list[str] = []
        threading.Thread(target=lambda: seen.extend(watch.stdout), daemon=True).start()
        # An activation of a version that is not there is a FAILED operation: once the watch shows one,
        # it is connected and sees everything after.
        deadline = time.monotonic() + 60
        while not any(line.startswith("activate-") for line in seen):
            assert time.monotonic() < deadline, "".join(seen)
            r = tegrad("rollout", "activate", "digits", "9", cwd=tmp_path, env=env)
            _one_line_refusal(r, "NOT_FOUND")

        r = tegrad("push", str(_bundle(tmp_path, 2, "--key", "keys/tegrad.key")), "--activate", cwd=tmp_path,
                   env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "active: digits v2" in r.stdout
        # pre-flight: the same version again is refused before the upload
        r = tegrad("push", str(tmp_path / "digits-2.tegrad"), "--state-dir", str(state), cwd=tmp_path)
        _one_line_refusal(r, "ALREADY_EXISTS", "version 2")
        assert "uploading" not in r.stderr

        r = tegrad("rollout", "rollback", "digits", "--state-dir", str(state), cwd=tmp_path)
        assert r.returncode == 0 and "rolled back to version 1" in r.stdout, r.stdout + r.stderr
        r = tegrad("rollout", "activate", "digits", "2", cwd=tmp_path, env=env)
        assert r.returncode == 0 and "version 2 active" in r.stdout, r.stdout + r.stderr

        def watched(prefix: str, what: str) -> int:
            return sum(1 for line in seen if line.startswith(prefix) and what in line and "SUCCEEDED" in line)

        deadline = time.monotonic() + 60
        while not (watched("stage-", "digits v2") and watched("rollback-", "digits v1")
                   and watched("activate-", "digits v2") >= 2):
            assert time.monotonic() < deadline, "".join(seen)
            time.sleep(0.1)
        r = tegrad("rollout", "operations", "--state-dir", str(state), cwd=tmp_path)
        kinds = [line.split("-")[0] for line in r.stdout.splitlines() if "SUCCEEDED" in line]
        assert kinds.count("stage") == 1 and kinds.count("activate") == 2 and kinds.count("rollback") == 1, r.stdout
    finally:
        if watch is not None:
            watch.terminate()
            watch.wait(30)
        shutil.rmtree(state.parent, ignore_errors=True)


# ---- make serve ----------------------------------------------------------------------------------
def test_make_serve_keeps_its_state_in_the_checkout(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = Path(sys.prefix)
    r = subprocess.run(["make", "-n", "-o", f"{venv}/.installed", "serve", f"VENV={venv}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"serve --state-dir {ROOT}/.state" in r.stdout, r.stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", ".state/x"], cwd=ROOT, timeout=60)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout: .gitignore cannot be checked")
    assert ignored.returncode == 0, ".state/ must be git-ignored"


# ---- tegrad perf ---------------------------------------------------------------------------------
def test_perf_sweeps_concurrency_against_tegrad(digits_server, tmp_path):
    r = tegrad("perf", "digits", "--url", digits_server.url, "--concurrency", "1,2", "--measurement-interval",
               "1000", "--warmup", "0.3", "--max-trials", "3", "--stability-percentage", "100",
               "--csv", "out.csv", "--json", "out.json", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "concurrency" in r.stdout and "client CPU" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    assert [row["level"] for row in rows] == ["1", "2"]
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["options"]["concurrency"] == [1, 2] and len(doc["results"]) == 2
    for row in doc["results"]:
        assert row["errors"] == 0 and row["windows"] == 3
        assert row["requests"] > 10 and row["throughput_rps"] > 10
        assert row["throughput_rps"] == pytest.approx(row["requests"] / 3, rel=0.3)
        assert 0 < row["latency_p50_us"] <= row["latency_p90_us"] <= row["latency_p99_us"]
        # the server saw the same windows: its count is close to the client's, its time per request below it
        assert row["server_requests"] == pytest.approx(row["requests"], rel=0.2)
        server = sum(row[f"server_{k}_us"] for k in ("queue", "compute_input", "compute_infer", "compute_output"))
        assert 0 < server < row["latency_avg_us"]
        assert row["server_compute_infer_us"] > 0
        assert 0 < row["client_cpu_pct"] < 100 * (os.cpu_count() or 1)


def test_perf_with_images_and_tensors(digits_server, tmp_path):
    for extra in (["--image", str(SAMPLES)], ["--input-data", str(HELDOUT)]):
        r = tegrad("perf", "digits", "--url", digits_server.url, "-b", "2", "--measurement-interval", "500",
                   "--warmup", "0.2", "--max-trials", "3", "--stability-percentage", "100", "--json", "o.json",
                   *extra, cwd=tmp_path, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        (row,) = json.loads((tmp_path / "o.json").read_text())["results"]
        assert row["errors"] == 0 and row["throughput_ips"] == pytest.approx(2 * row["throughput_rps"])
    r = tegrad("perf", "nosuchmodel", "--url", digits_server.url, cwd=tmp_path)
    _one_line_refusal(r, "tegrad perf: error:", "nosuchmodel")
