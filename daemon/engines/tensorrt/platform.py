"""Which Jetson software this is — L4T release (and so JetPack), TensorRT and CUDA versions — read
from files and module versions, without a GPU; and the one rule tegrad has about them.

JetPack 6.0 ships TensorRT 8.6, whose ONNX parser cannot build the strongly typed Q/DQ networks
tegrad lowers to; JetPack 6.1 and later ship TensorRT 10.3.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from daemon.errors import ConfigError

NV_TEGRA_RELEASE = Path("/etc/nv_tegra_release")
CUDA_ROOT = Path("/usr/local/cuda")
MIN_TENSORRT_MAJOR = 10
TOO_OLD = "tegrad needs TensorRT ≥ 10 (JetPack ≥ 6.1)"

# L4T release -> JetPack, for the releases whose TensorRT matters to tegrad (NVIDIA's release notes).
_JETPACK = {
    "36.2.0": "6.0 DP",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
}
_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)")


def l4t_release(path: Path = NV_TEGRA_RELEASE) -> str | None:
    """``36.4.0`` from ``# R36 (release), REVISION: 4.0, …``; None off a Jetson."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    m = _RELEASE.search(text)
    if not m:
        return None
    revision = m.group(2).split(".")
    revision += ["0"] * (2 - len(revision))
    return ".".join([m.group(1), *revision[:2]])


def jetpack_of(l4t: str) -> str:
    if l4t in _JETPACK:
        return _JETPACK[l4t]
    major = l4t.split(".", 1)[0]
    return {"35": "5.x", "36": "6.x", "38": "7.x"}.get(major, "unknown")


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(getattr(tensorrt, "__version__", "unknown"))


def cuda_version(root: Path = CUDA_ROOT) -> str | None:
    """The CUDA toolkit's version (version.json since CUDA 11.1, version.txt before)."""
    try:
        return str(json.loads((root / "version.json").read_text(encoding="utf-8"))["cuda"]["version"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        m = re.search(r"([\d.]+)", (root / "version.txt").read_text(encoding="utf-8"))
        return m.group(1) if m else None
    except OSError:
        return None


def check_tensorrt_version(version: str) -> None:
    """Refuse a TensorRT older than 10 with the sentence a JetPack 6.0 user needs."""
    try:
        major = int(version.split(".", 1)[0])
    except ValueError:
        return  # a development build with an odd version string: let the API checks speak
    if major < MIN_TENSORRT_MAJOR:
        raise ConfigError(f"{TOO_OLD}; this is TensorRT {version}: upgrade to JetPack 6.1 or later (L4T r36.4), "
                          "or serve the model with backend = \"onnxruntime\"")


def describe() -> str:
    """One line for selftest and the serve log: what tegrad found."""
    l4t = l4t_release()
    trt = tensorrt_version()
    cuda = cuda_version()
    parts = [f"L4T R{l4t} (JetPack {jetpack_of(l4t)})" if l4t else "not a Jetson (no /etc/nv_tegra_release)",
             f"TensorRT {trt}" if trt else "TensorRT absent",
             f"CUDA {cuda}" if cuda else "CUDA toolkit absent"]
    if trt:
        try:
            check_tensorrt_version(trt)
        except ConfigError:
            parts.append(TOO_OLD)
    return ", ".join(parts)
