"""JetPack simulated: TensorRT's real 10.3 bindings in the site directory of a throw-away base
interpreter (standing in for JetPack's system Python with apt's python3-libnvinfer), the venv made
from it by the Makefile's Jetson path, and ``tegrad selftest`` inside that venv.

A venv made from another venv sees the *first* interpreter's site directory, so the stand-in is a
prefix of its own: a copy of the interpreter binary beside links to the standard library, with an
empty site directory of its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.tensorrt_api.bindings import ROOT, install

pytestmark = [pytest.mark.tensorrt_api, pytest.mark.slow]
JETPACK_TENSORRT = "10.3.0"  # JetPack 6.1 and 6.2


def _base_interpreter(prefix: Path) -> tuple[Path, Path]:
    """(python, site directory) of a fresh prefix sharing this interpreter's standard library."""
    real = Path(sys._base_executable).resolve() if hasattr(sys, "_base_executable") else Path(sys.executable).resolve()
    stdlib = Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "installed_base": sys.base_prefix})["stdlib"])
    if not (stdlib / "os.py").is_file():
        pytest.skip(f"cannot find this interpreter's standard library to stand a base interpreter on ({stdlib})")
    ver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    (prefix / "bin").mkdir(parents=True)
    python = prefix / "bin" / ver
    shutil.copy2(real, python)  # a copy, not a link: the prefix is found from the binary's own location
    (prefix / "bin" / "python3").symlink_to(ver)
    lib = prefix / "lib" / ver
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name not in ("site-packages", "dist-packages"):
            (lib / entry.name).symlink_to(entry)
    site_dir = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip()
    site = Path(site_dir)
    if not str(site).startswith(str(prefix)):
        pytest.skip(f"the stand-in interpreter did not take its own prefix (site directory {site})")
    site.mkdir(parents=True, exist_ok=True)
    return python, site


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def test_jetson_venv_sees_jetpacks_tensorrt_and_selftest_reports_it(tmp_path):
    bindings = install(JETPACK_TENSORRT)
    python, site = _base_interpreter(tmp_path / "system")
    shutil.copytree(bindings.site / "tensorrt", site / "tensorrt")  # what apt's python3-libnvinfer installs
    # JetPack's other apt Python packages (numpy, …) stand in as this checkout's venv: tegrad's dependencies.
    (site / "tegrad-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    env = _clean_env(LD_LIBRARY_PATH=str(bindings.stubs))
    probe = "import tensorrt; print(tensorrt.__version__)"

    plain = tmp_path / "plain"
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(plain)], check=True, env=env)
    hidden = subprocess.run([str(plain / "bin" / "python"), "-c", probe], capture_output=True, text=True, env=env)
    assert hidden.returncode != 0 and "No module named 'tensorrt'" in hidden.stderr  # the bug of issue 11

    venv = tmp_path / "jetson"
    made = subprocess.run(["make", "-s", "venv", f"PYTHON={python}", f"VENV={venv}", "JETSON=1"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    if made.returncode != 0 and "pip" in (made.stderr + made.stdout) and not (venv / "bin" / "python").exists():
        pytest.skip(f"make venv could not run pip (offline?): {made.stderr.strip()[-300:]}")
    assert (venv / "bin" / "python").exists(), made.stderr
    seen = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, env=env)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.strip() == JETPACK_TENSORRT

    selftest = subprocess.run([str(venv / "bin" / "python"), "-m", "daemon.cli", "selftest", "--precisions", "fp32"],
                              cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    out = selftest.stdout
    assert f"TensorRT {JETPACK_TENSORRT}" in out, out + selftest.stderr
    assert "no TensorRT rows" not in out
    rows = {tuple(line.split()[:3]) for line in out.splitlines()}
    assert ("onnxruntime", "fp32", "failed") not in rows
    assert any(r[:2] == ("onnxruntime", "fp32") for r in rows)
    assert ("tensorrt", "fp32", "failed") in rows, out  # no GPU here: the row fails, cleanly
    assert "tensorrt fp32 failed:" in out and "CUDA" in out
    assert "Traceback" not in selftest.stderr, selftest.stderr
    assert selftest.returncode == 0, selftest.stderr
