"""Starts ``tegrad serve`` as a separate process on free loopback ports and
drives it with the real Triton client."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "daemon" / "models" / "digits"
_LIVE = re.compile(r"grpc=[^ ]+:(\d+) metrics=[^ ]+:(\d+)")


@dataclass
class Server:
    proc: subprocess.Popen
    grpc_port: int
    metrics_port: int
    repository: Path | None
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def launch(cmd: list[str], *, repository: Path | None = None, env: dict | None = None, wait_ready: bool = True,
           timeout: float = 90, **popen) -> Server:
    """Start a command that runs tegrad serve and wait until it logs readiness (or liveness)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, **popen,
    )
    lines: list[str] = []
    ports: list[int] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            m = _LIVE.search(line)
            if m and not ports:
                ports.extend(int(g) for g in m.groups())
            if "tegrad ready" in line or ("live:" in line and not wait_ready):
                ready.set()
        ready.set()

    def kill() -> None:
        # A wrapper started in its own session (make) takes its tegrad child down with it.
        if popen.get("start_new_session"):
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.1):
        if time.monotonic() > deadline:
            kill()
            raise AssertionError("tegrad did not become ready:\n" + "".join(lines))
    if not ports:
        kill()
        raise AssertionError("tegrad exited before listening:\n" + "".join(lines))
    return Server(proc, ports[0], ports[1], repository, lines)


def start_server(
    command: list[str] | None = None,
    *,
    repository: Path | None = None,
    state_dir: Path,
    args: tuple[str, ...] = (),
    env: dict | None = None,
    wait_ready: bool = True,
    timeout: float = 90,
) -> Server:
    cmd = command or [sys.executable, "-m", "daemon", "serve"]
    cmd = [*cmd, "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--state-dir", str(state_dir)]
    if repository is not None:
        cmd += ["--model-repository", str(repository)]
    cmd += list(args)
    return launch(cmd, repository=repository, env=env, wait_ready=wait_ready, timeout=timeout)


@pytest.fixture
def server_factory(tmp_path):
    started: list[Server] = []

    def start(**kwargs) -> Server:
        kwargs.setdefault("state_dir", tmp_path / f"state{len(started)}")
        server = start_server(**kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            rc = server.stop()
            assert rc == 0, f"tegrad exited with {rc} on SIGTERM:\n{server.log()}"


@pytest.fixture(scope="module")
def digits_server(tmp_path_factory):
    """The embedded default model, served the way `tegrad serve` does with no repository."""
    server = start_server(state_dir=tmp_path_factory.mktemp("state"))
    yield server
    rc = server.stop()
    assert rc == 0, server.log()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A fresh repository holding a copy of the digits model."""
    root = tmp_path / "repo"
    shutil.copytree(DIGITS, root / "digits", ignore=shutil.ignore_patterns("data", "README.md"))
    return root


@pytest.fixture
def client(digits_server):
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(digits_server.url)
    yield c
    c.close()
