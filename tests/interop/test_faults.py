"""Disk, database, config and permission faults against a daemon in its own process.

Each test breaks something under a model that is serving, asks for a load or reload, and
checks the status and its message (no absolute server path in it), the repository index,
and that the version serving before still answers right afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.interop.conftest import DIGITS, Server

X4 = np.arange(1, 5, dtype=np.float32)[None, :]
NO_SPACE = re.compile(r"no space left on the engine cache \(\d+(\.\d)? (B|KiB|MiB|GiB) free, "
                      r"\d+(\.\d)? (B|KiB|MiB|GiB) needed\)")


# -- helpers --------------------------------------------------------------------------------------------


def _version(repo: Path, version: int, factor: float) -> None:
    path = repo / "scale" / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".incoming.onnx")
    partial(onnx_models.scale, factor=factor)(tmp)
    os.replace(tmp, path)


@pytest.fixture
def scale_repo(tmp_path) -> Path:
    """scale: version 1 answers x * 2; the latest version serves."""
    repo = tmp_path / "repo"
    _version(repo, 1, 2.0)
    (repo / "scale" / "config.toml").write_text("max_batch = 8\n")
    return repo


def _start(server_factory, repo: Path, *args: str, **kwargs) -> Server:
    return server_factory(repository=repo, args=("--model-control", "explicit", "--load-model", "scale", *args),
                          **kwargs)


def _factor(c: grpcclient.InferenceServerClient) -> float:
    inp = grpcclient.InferInput("x", list(X4.shape), "FP32")
    inp.set_data_from_numpy(X4)
    return float((c.infer("scale", [inp]).as_numpy("y") / X4)[0, 0])


def _index(c) -> dict[str, tuple[str, str]]:
    return {m.version: (m.state, m.reason) for m in c.get_model_repository_index().models if m.name == "scale"}


def _refused(c, status: str, *words: str, repo: Path) -> str:
    with pytest.raises(InferenceServerException) as info:
        c.load_model("scale")
    message = info.value.message()
    assert str(info.value.status()).removeprefix("StatusCode.") == status, message
    for word in words:
        assert word in message, message
    assert str(repo) not in message, message  # the server's own paths are its business
    return message


def _no_loading(c) -> None:
    assert all(state != "LOADING" for state, _ in _index(c).values()), _index(c)


@pytest.fixture
def small_fs(tmp_path):
    """Mount small tmpfs file systems to fill (root only); unmounted after the test's servers stopped."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill ({done.stderr.strip() or 'mount failed'}): needs root")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path, leave: int = 0) -> Path:
    """Take all but about ``leave`` bytes of the file system holding ``directory``."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 16)
        try:
            while shutil.disk_usage(directory).free > leave + len(chunk):
                f.write(chunk)
                f.flush()
            f.write(b"\0" * max(0, shutil.disk_usage(directory).free - leave))
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            pass
    return filler


def _unprivileged() -> list[str]:
    """A command prefix under which file modes apply (root without CAP_DAC_OVERRIDE/READ_SEARCH)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, which ignores file modes, and setpriv (util-linux) is not installed")
    caps = "-dac_override,-dac_read_search"
    prefix = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE here: {probe.stderr.strip()}")
    return prefix


# -- row 7: the state directory on a full file system ----------------------------------------------------


def test_reload_on_a_full_state_dir_is_refused_and_the_old_version_serves(small_fs, server_factory, scale_repo):
    state = small_fs("state", "16m")
    server = _start(server_factory, scale_repo, state_dir=state)
    c = grpcclient.InferenceServerClient(server.url)
    assert _factor(c) == 2.0
    _version(scale_repo, 2, 3.0)
    filler = _fill(state)

    message = _refused(c, "RESOURCE_EXHAUSTED", "no space left on the ", repo=scale_repo)
    assert "disk is full" not in message  # SQLite's words are mapped, not passed on
    index = _index(c)
    assert index["1"] == ("READY", "")
    assert index["2"][0] == "UNAVAILABLE" and "no space left on the " in index["2"][1], index
    _no_loading(c)
    assert _factor(c) == 2.0  # the old version keeps serving

    filler.unlink()  # space again: the same reload now succeeds
    c.load_model("scale")
    assert _factor(c) == 3.0
    assert _index(c)["2"] == ("READY", "")


def test_first_load_on_a_full_state_dir_leaves_nothing_loading(small_fs, server_factory, scale_repo):
    state = small_fs("state", "16m")
    server = server_factory(repository=scale_repo, state_dir=state, args=("--model-control", "explicit"))
    c = grpcclient.InferenceServerClient(server.url)
    _fill(state)
    _refused(c, "RESOURCE_EXHAUSTED", "no space left on the ", repo=scale_repo)
    state1 = _index(c)["1"]
    assert state1[0] == "UNAVAILABLE" and "no space left on the " in state1[1], state1
    assert not c.is_model_ready("scale")


# -- row 8: an engine build with too little disk ---------------------------------------------------------


@pytest.mark.parametrize("leave, stage", [(32 << 10, "lowering"), (200 << 10, "building")])
def test_engine_build_with_too_little_disk_says_so_with_the_numbers(small_fs, server_factory, scale_repo, leave, stage):
    """32 KiB free: the lowered ONNX does not fit; 200 KiB: it does, the engine after it does not
    (where ONNX Runtime used to fail with "INVALID_PROTOBUF : Protobuf serialization failed")."""
    cache = small_fs("engines", "8m")
    server = _start(server_factory, scale_repo, "--engine-cache-dir", str(cache))
    c = grpcclient.InferenceServerClient(server.url)
    assert _factor(c) == 2.0
    (scale_repo / "scale" / "2").mkdir()
    shutil.copy(DIGITS / "1" / "model.onnx", scale_repo / "scale" / "2" / "model.onnx")  # 97 KB
    _fill(cache, leave=leave)

    message = _refused(c, "RESOURCE_EXHAUSTED", f"(while {stage})", repo=scale_repo)
    assert NO_SPACE.search(message), message
    assert "Protobuf" not in message
    index = _index(c)
    assert index["2"][0] == "UNAVAILABLE" and NO_SPACE.search(index["2"][1]), index
    _no_loading(c)
    assert _factor(c) == 2.0
    assert not [p for p in (cache / "tmp").iterdir()]  # the build's scratch space was cleaned up


# -- row 9: a damaged state database ---------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "random":
        path.write_bytes(os.urandom(len(data)))
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    elif how == "header-zeroed":
        path.write_bytes(b"\0" * 100 + data[100:])


@pytest.mark.parametrize("how", ["random", "truncated", "header-zeroed"])
def test_damaged_state_database_is_moved_aside_and_the_daemon_serves(server_factory, scale_repo, tmp_path, how):
    state = tmp_path / "state"
    # Explicit control with nothing named at startup: only the state knows that scale was loaded.
    server = server_factory(repository=scale_repo, state_dir=state, args=("--model-control", "explicit"))
    with grpcclient.InferenceServerClient(server.url) as c:
        c.load_model("scale")
        assert _factor(c) == 2.0
    assert server.stop() == 0
    db = state / "state.sqlite3"
    _damage(db, how)

    again = server_factory(repository=scale_repo, state_dir=state, args=("--model-control", "explicit"))
    errors = [line for line in again.lines if " ERROR " in line]
    assert len(errors) == 1 and "state database" in errors[0] and "unreadable" in errors[0], again.log()
    lost = errors
    assert "moved aside to state.sqlite3.damaged-" in lost[0] and "restored the copy saved at" in lost[0], lost[0]
    assert "Traceback" not in again.log()
    assert [p.name for p in state.iterdir() if p.name.startswith("state.sqlite3.damaged-")]
    with grpcclient.InferenceServerClient(again.url) as c:
        assert _factor(c) == 2.0  # loaded again: the backup remembered it
        assert _index(c)["1"] == ("READY", "")


# -- row 10: hostile config files ------------------------------------------------------------------------


@pytest.mark.parametrize("content, words", [
    (b'max_batch = 8\nname = "\xc3\x28"\n', "scale/config.toml: not valid UTF-8 (byte 22, line 2)"),
    (b"max_batch = " + b"[" * 100_000, "scale/config.toml: not valid TOML: arrays or inline tables nested too deeply"),
    (b"max_batch = 8\n" + b"[" * 100_000, "scale/config.toml: not valid TOML"),
    (b"max_batch = 8\x00\n", "scale/config.toml: not valid TOML"),
], ids=["invalid-utf8", "nested-arrays", "nested-headers", "nul-byte"])
def test_hostile_model_config_is_refused_and_the_old_version_serves(server_factory, scale_repo, content, words):
    server = _start(server_factory, scale_repo)
    c = grpcclient.InferenceServerClient(server.url)
    assert _factor(c) == 2.0
    (scale_repo / "scale" / "config.toml").write_bytes(content)
    _refused(c, "INVALID_ARGUMENT", words, repo=scale_repo)
    assert _index(c)["1"] == ("READY", "")
    assert _factor(c) == 2.0


def test_hostile_version_config_marks_that_version_unavailable(server_factory, scale_repo):
    server = _start(server_factory, scale_repo)
    c = grpcclient.InferenceServerClient(server.url)
    _version(scale_repo, 2, 3.0)
    (scale_repo / "scale" / "2" / "config.toml").write_bytes(b"max_batch = " + b"{a = " * 50_000)
    _refused(c, "INVALID_ARGUMENT", "version 2: scale/2/config.toml: not valid TOML", repo=scale_repo)
    index = _index(c)
    assert index["2"][0] == "UNAVAILABLE" and "scale/2/config.toml" in index["2"][1], index
    assert _factor(c) == 2.0


# -- row 11: unreadable files and directories ------------------------------------------------------------


@pytest.mark.parametrize("target, shown", [
    ("scale/2", "scale/2"),
    ("scale/2/model.onnx", "scale/2/model.onnx"),
    ("scale", "scale"),
    (".", "the model repository"),
], ids=["version-dir", "model-file", "model-dir", "repository-root"])
def test_unreadable_paths_are_named_relative_to_the_repository(server_factory, scale_repo, target, shown):
    server = _start(server_factory, scale_repo, command=[*_unprivileged(), sys.executable, "-m", "daemon", "serve"])
    c = grpcclient.InferenceServerClient(server.url)
    assert _factor(c) == 2.0
    _version(scale_repo, 2, 3.0)
    path = scale_repo / target
    mode = path.stat().st_mode
    path.chmod(0)
    try:
        message = _refused(c, "FAILED_PRECONDITION", "cannot be read by tegrad (permission denied)", repo=scale_repo)
        assert shown in message, message
        index = _index(c)  # answers (no UNKNOWN), listing what it knows
        assert index["1"] == ("READY", "")
        if target.startswith("scale/2"):
            assert index["2"][0] == "UNAVAILABLE" and "permission denied" in index["2"][1], index
        assert _factor(c) == 2.0
    finally:
        path.chmod(mode)
    c.load_model("scale")  # readable again: the reload goes through
    assert _factor(c) == 3.0


def test_unreadable_model_that_never_loaded_is_listed_unavailable_with_the_reason(server_factory, scale_repo):
    other = scale_repo / "other"
    shutil.copytree(scale_repo / "scale", other)
    server = _start(server_factory, scale_repo, command=[*_unprivileged(), sys.executable, "-m", "daemon", "serve"])
    c = grpcclient.InferenceServerClient(server.url)
    other.chmod(0)
    try:
        with pytest.raises(InferenceServerException) as info:
            c.load_model("other")
        assert str(info.value.status()) == "StatusCode.FAILED_PRECONDITION", info.value
        assert info.value.message().startswith("other cannot be read by tegrad (permission denied)")
        rows = [(m.version, m.state, m.reason) for m in c.get_model_repository_index().models if m.name == "other"]
        assert rows == [("", "UNAVAILABLE", info.value.message())], rows
        assert _factor(c) == 2.0
    finally:
        other.chmod(0o755)


def test_unknown_model_is_not_found_without_server_paths(server_factory, scale_repo):
    server = _start(server_factory, scale_repo)
    c = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException) as info:
        c.load_model("nope")
    assert str(info.value.status()) == "StatusCode.NOT_FOUND"
    assert "'nope' is not in the model repository" in info.value.message()
    assert str(scale_repo) not in info.value.message()
    shutil.rmtree(scale_repo / "scale" / "1")
    _refused(c, "INVALID_ARGUMENT", "no version directory under scale/", repo=scale_repo)
    assert _factor(c) == 2.0
