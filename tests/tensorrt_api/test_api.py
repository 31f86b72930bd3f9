"""Every TensorRT name and call in daemon/ and calib/ against the real 10.3 and 11.4 bindings.

The uses are found in the code by ``scan.py`` (new code is covered without touching this file);
uses under ``if hasattr(...)`` count only in the versions where that branch runs, and every such
branch must be the one some version takes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.tensorrt_api.bindings import ROOT, VERSIONS, install

pytestmark = pytest.mark.tensorrt_api
SCAN = Path(__file__).with_name("scan.py")


def _sources() -> list[str]:
    files = subprocess.run(["git", "ls-files", "daemon/*.py", "calib/*.py"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    if not files:  # not a git checkout (an sdist): every file on disk
        files = [str(p.relative_to(ROOT)) for d in ("daemon", "calib") for p in (ROOT / d).rglob("*.py")]
    return sorted(f for f in files if "/protogen/" not in f)


def _scan(bindings, paths: list[str]) -> dict:
    done = bindings.python(str(SCAN), *paths, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


_reports: dict[str, dict] = {}


def report(version: str) -> dict:
    if version not in _reports:
        _reports[version] = _scan(install(version), _sources())
    return _reports[version]


def _applies(use: dict, report_: dict) -> bool:
    entered = {(b["guard"], b["branch"]): b["entered"] for b in report_["branches"]}
    return all(entered.get((g, branch), True) for g, branch in use["guards"])


def test_the_real_bindings_import_on_stubs(bindings):
    done = bindings.python("-c", "import tensorrt as trt; print(trt.__version__); print(trt.Builder.__init__.__doc__)")
    assert done.returncode == 0, done.stderr
    version, doc = done.stdout.split("\n", 1)
    assert version == bindings.version
    assert "logger: tensorrt.tensorrt.ILogger" in doc  # pybind11's signature, as the real library documents it


def test_every_tensorrt_name_and_call_the_code_uses_exists(bindings):
    r = report(bindings.version)
    assert r["version"] == bindings.version
    wrong = [f"{u['file']}:{u['line']}: {u['expr']}: {u['problem']}" for u in r["uses"]
             if not u["ok"] and _applies(u, r)]
    assert not wrong, f"TensorRT {bindings.version}:\n" + "\n".join(wrong)


def test_the_scan_reaches_the_tensorrt_code(bindings):
    r = report(bindings.version)
    calls = {u["expr"].rsplit(".", 1)[-1] for u in r["uses"] if u["kind"] == "call"}
    # The calls every build and every inference make: if the scan lost track of the objects, these go first.
    for name in ("create_network", "build_serialized_network", "deserialize_cuda_engine", "set_input_shape",
                 "set_tensor_address", "execute_async_v3", "set_memory_pool_limit", "get_tensor_profile_shape"):
        assert name in calls, f"scan found no call of {name}; found {sorted(calls)}"


def test_every_version_specific_branch_is_taken_by_a_version_it_targets():
    reports = [report(v) for v in sorted(VERSIONS)]
    for r in reports:
        if not r["branches"]:
            pytest.fail("no version-specific branch found; the scan of hasattr() guards is broken")
    dead = []
    for key in {(b["guard"], b["branch"]) for r in reports for b in r["branches"]}:
        seen = [b for r in reports for b in r["branches"] if (b["guard"], b["branch"]) == key]
        if seen[0]["uses"] and not any(b["entered"] for b in seen):
            dead.append(f"{seen[0]['file']}:{seen[0]['line']}: branch {key[1]} of {key[0]}")
    assert not dead, "branches no supported TensorRT version takes:\n" + "\n".join(sorted(dead))


def test_probed_names_exist_in_some_version():
    present: dict[str, list[bool]] = {}
    for v in sorted(VERSIONS):
        for u in report(v)["uses"]:
            if u["kind"] == "probe":
                present.setdefault(f"{u['file']}:{u['line']}: {u['expr']}", []).append(u["present"])
    missing = [k for k, seen in present.items() if not any(seen)]
    assert present and not missing, f"probed in no supported TensorRT version: {missing}"


BAD = '''
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import tensorrt as trt

def build(logger, onnx):
    trt = require_tensorrt()
    builder = trt.Builder(logger, 3)
    network = builder.create_netwrk(0)
    config = builder.create_builder_config()
    config.num_optimization_profiles = 2
    config.set_flag(trt.BuilderFlag.NOT_A_FLAG)
    if hasattr(builder, "no_such_method"):
        builder.no_such_method()

def run(context: trt.IExecutionContext, stream):
    context.execute_async_v3(stream, 0)
    context.execute_async_v3(stream_handle=stream)

class Log(trt.ILogger):
    def log(self, msg):
        pass
'''


def test_the_scan_catches_wrong_names_arities_and_dead_branches(bindings, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(BAD, encoding="utf-8")
    r = _scan(bindings, [str(bad)])
    problems = {(u["line"], u["expr"]) for u in r["uses"] if not u["ok"] and _applies(u, r)}
    assert problems == {
        (8, "trt.Builder"),  # two arguments where the binding takes one
        (9, "builder.create_netwrk"),
        (11, "config.num_optimization_profiles"),  # read-only property
        (12, "trt.BuilderFlag.NOT_A_FLAG"),
        (17, "context.execute_async_v3"),
        (21, "ILogger.log"),  # TensorRT calls log(severity, msg)
    }
    ok_calls = {u["line"] for u in r["uses"] if u["ok"] and u["kind"] == "call"}
    assert 18 in ok_calls  # keyword by its pybind11 name
    (branch,) = r["branches"]
    assert branch["entered"] is False and branch["uses"] >= 1
