"""Startup with a model that fails to load (Triton's --exit-on-error and --strict-readiness), and the
HTTP port's paths: /metrics, Triton's /v2/health/live and /v2/health/ready, 404 for anything else."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request

import pytest
import tritonclient.grpc as grpcclient

from tests.interop.conftest import DIGITS


def _repo(root):
    shutil.copytree(DIGITS, root / "digits")
    bad = root / "bad"
    shutil.copytree(DIGITS, bad)
    (bad / "config.toml").write_text((bad / "config.toml").read_text() + "\nmax_batchh = 4\n")
    return root


def _get(server, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_model_failing_at_startup_stops_the_daemon_by_default(server_factory, tmp_path):
    server = server_factory(repository=_repo(tmp_path / "repo"))
    assert server.proc.wait(60) == 1, server.log()
    log = server.log()
    assert "failed to load at startup" in log and "--exit-on-error" in log, log
    assert "bad" in log and "max_batchh: unknown key" in log, log
    assert "tegrad ready" not in log


def test_exit_on_error_false_serves_the_others_and_strict_readiness_says_not_ready(server_factory, tmp_path):
    server = server_factory(repository=_repo(tmp_path / "repo"), args=("--exit-on-error=false",))
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.is_model_ready("digits") and not c.is_model_ready("bad")
        assert not c.is_server_ready(), "strict readiness: a model that should load is not READY"
    assert _get(server, "/v2/health/live")[0] == 200
    assert _get(server, "/v2/health/ready")[0] == 400
    assert "ready=False" in server.log()


def test_strict_readiness_false_is_ready_whatever_the_models(server_factory, tmp_path):
    server = server_factory(repository=_repo(tmp_path / "repo"),
                            args=("--exit-on-error=false", "--strict-readiness=false"))
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.is_server_ready() and not c.is_model_ready("bad")
    assert _get(server, "/v2/health/ready")[0] == 200


def test_metrics_port_answers_only_its_paths(server_factory, tmp_path):
    server = server_factory(state_dir=tmp_path / "state")
    status, body = _get(server, "/metrics")
    assert status == 200 and b"# TYPE tegrad_" in body, (status, body[:200])
    assert _get(server, "/v2/health/live")[0] == 200
    assert _get(server, "/v2/health/ready")[0] == 200
    for path in ("/", "/healthz", "/metrics/extra", "/v2/health"):
        status, body = _get(server, path)
        assert status == 404 and b"/metrics" in body, (path, status, body)


@pytest.mark.parametrize("flag", ["--strict-readiness=maybe", "--exit-on-error=2"])
def test_bad_switch_values_are_refused_with_the_choices(flag, tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "daemon", "serve", flag], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "expected true or false" in done.stderr, done
