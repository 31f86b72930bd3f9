"""Whether CUDA (through pycuda) and TensorRT can be used here, and if not, why: one sentence
for `tegrad selftest`, the tensorrt backend's errors and the skip reasons of gpu/tensorrt tests."""

from __future__ import annotations


def cuda_unavailable() -> str | None:
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device is visible"
    except Exception as exc:  # ImportError, or a driver error without a GPU
        return f"needs a CUDA GPU with pycuda ({type(exc).__name__}: {exc})"
    return None


def tensorrt_unavailable() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"needs the tensorrt Python package ({exc}; on JetPack: apt install python3-libnvinfer)"
    return cuda_unavailable()
