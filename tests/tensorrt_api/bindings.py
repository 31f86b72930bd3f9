"""TensorRT's real Python bindings on a machine without TensorRT: the binding wheels from the
registry (cached under ``.cache/tensorrt-bindings/<version>``) plus stub ``libnvinfer``,
``libnvonnxparser`` and ``libnvinfer_plugin`` built with gcc, so ``import tensorrt`` works and
every class, enum and signature docstring is the real one. Nothing in them can execute: the
stubs' factories return null.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("TEGRAD_TRT_BINDINGS_CACHE", ROOT / ".cache" / "tensorrt-bindings"))
# version -> the wheel's distribution name (the CUDA major is part of it)
VERSIONS = {"10.3.0": "tensorrt-cu12-bindings", "11.4.0.106": "tensorrt-cu13-bindings"}

# The C entry points the bindings' tensorrt.so imports (nm -D --undefined-only), by library.
# Signatures do not matter to the dynamic linker; the stubs return null / 0.
_STUBS = {
    "libnvinfer": [
        "void *createInferBuilder_INTERNAL(void *logger, int version) { return 0; }",
        "void *createInferRuntime_INTERNAL(void *logger, int version) { return 0; }",
        "void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return 0; }",
        "void *getPluginRegistry(void) { return 0; }",
        "void *getBuilderPluginRegistry(int capability) { return 0; }",
    ],
    "libnvonnxparser": [
        "void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return 0; }",
        "void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return 0; }",
        "int getNvOnnxParserVersion(void) { return 0; }",
    ],
    "libnvinfer_plugin": [
        "int initLibNvInferPlugins(void *logger, const char *ns) { return 1; }",
    ],
}


@dataclass(frozen=True)
class Bindings:
    version: str
    site: Path  # holds the package ``tensorrt`` (the wheel's tensorrt_bindings, as JetPack names it)
    stubs: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.site), env.get("PYTHONPATH")]))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.stubs), env.get("LD_LIBRARY_PATH")]))
        return env

    def python(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], env=self.env(), capture_output=True, text=True,
                              timeout=120, **kwargs)


def _major(version: str) -> str:
    return version.split(".", 1)[0]


def build_stubs(directory: Path, major: str) -> Path:
    """The three libraries with the sonames the binding links against (libnvinfer.so.10 …)."""
    if shutil.which("gcc") is None:
        pytest.skip("the tensorrt_api tests build stub TensorRT libraries and need gcc (apt install gcc)")
    directory.mkdir(parents=True, exist_ok=True)
    for lib, functions in _STUBS.items():
        soname = f"{lib}.so.{major}"
        if (directory / soname).is_file():
            continue
        source = directory / f"{lib}.c"
        source.write_text("\n".join(functions) + "\n", encoding="utf-8")
        tmp = directory / f".{soname}.tmp"
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp), f"-Wl,-soname,{soname}", str(source)],
                       check=True, capture_output=True, text=True)
        tmp.replace(directory / soname)
    return directory


def install(version: str) -> Bindings:
    if sys.version_info[:2] not in ((3, 10), (3, 11)):
        pytest.skip(f"TensorRT {version}'s binding wheels exist for CPython 3.10 and 3.11, not {sys.version.split()[0]}")
    target = CACHE / version
    site = target / "site"
    if not (site / "tensorrt" / "__init__.py").is_file():
        tmp = CACHE / f".{version}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        spec = f"{VERSIONS[version]}=={version}"
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "--target", str(tmp / "site"), spec],
            capture_output=True, text=True, timeout=300,
        )
        if done.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.skip(f"could not install {spec} from the package registry (offline?): "
                        f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        # JetPack's python3-libnvinfer installs the same module as the package ``tensorrt``.
        (tmp / "site" / "tensorrt_bindings").rename(tmp / "site" / "tensorrt")
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(target)
    return Bindings(version, site, build_stubs(target / "stubs", _major(version)))
