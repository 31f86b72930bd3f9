"""Hypothesis profiles and the daemon the fuzz suite attacks (its own process, real gRPC).

CI runs the ``ci`` profile: a few hundred cases in all, derandomized (the same cases on every
run), no example database on disk. ``TEGRAD_FUZZ_EXAMPLES=N`` runs N cases per test with fresh
random seeds (``TEGRAD_FUZZ_SEED`` pins one), for a longer hunt on a workstation.
"""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

from tests import onnx_models
from tests.interop.conftest import DIGITS, start_server

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("long", derandomize=False, deadline=None, database=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.load_profile("long" if os.environ.get("TEGRAD_FUZZ_EXAMPLES") else "ci")


def budget(ci_examples: int) -> int:
    """Cases for one test: its CI share, or TEGRAD_FUZZ_EXAMPLES when set."""
    return int(os.environ.get("TEGRAD_FUZZ_EXAMPLES") or ci_examples)


def build_repository(root) -> None:
    shutil.copytree(DIGITS, root / "digits", ignore=shutil.ignore_patterns("data", "README.md"))
    onnx_models.add_sub(root / "add_sub" / "1" / "model.onnx")
    (root / "add_sub" / "config.toml").write_text("max_batch = 4\n")
    for name, datatype in (("id_bytes", "BYTES"), ("id_int8", "INT8"), ("id_fp16", "FP16"), ("id_bool", "BOOL")):
        onnx_models.identity(root / name / "1" / "model.onnx", datatype)
        (root / name / "config.toml").write_text("max_batch = 8\n")
    # No batch dimension: every dim is the model's own.
    onnx_models.identity(root / "flat" / "1" / "model.onnx", "FP32", shape=(4,))
    (root / "flat" / "config.toml").write_text("max_batch = 0\n")


class Daemon:
    """The server under attack, with a short repr: hypothesis prints it with every failing case."""

    def __init__(self, server) -> None:
        self.server = server
        self.proc = server.proc
        self.repository = server.repository
        self.url = server.url

    def log(self) -> str:
        return self.server.log()

    def __repr__(self) -> str:
        return f"<tegrad pid {self.proc.pid} at {self.url}>"


@pytest.fixture(scope="session")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_repo")
    build_repository(root)
    server = start_server(repository=root, state_dir=tmp_path_factory.mktemp("fuzz_state"))
    yield Daemon(server)
    assert server.stop() == 0, server.log()
    # Client mistakes are answered, not crashed on: no exception escaped into the log either
    # (a swallowed task error or a handler traceback would show here and nowhere else).
    log = server.log()
    at = log.find("Traceback")
    assert at < 0, "the daemon logged a traceback while being fuzzed:\n" + log[max(0, at - 300):at + 1500]


@pytest.fixture(scope="session")
def channel(fuzz_server):
    import grpc

    # Fuzzed requests stay far below the default 4 MiB, so the client never refuses to send one.
    with grpc.insecure_channel(fuzz_server.url) as ch:
        yield ch
