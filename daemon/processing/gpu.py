"""Preprocessing on the GPU with pycuda: one fused kernel per batch (see kernels/preprocess.cu).

One :class:`GpuPreprocessor` belongs to one instance slot and is used by that slot's thread
only: it owns a CUDA stream (or shares the slot's), two pinned staging buffers used in turn
(the next batch is packed while the previous one is still uploading), the device copy of the
frames and the output buffer. Stage boundaries are CUDA events: ``done`` is recorded after the
kernel, so an inference stream can ``wait_for_event(pre.done)`` instead of the host waiting.

Decoding stays on the CPU (:mod:`daemon.processing.images`), ahead of the GPU work.
The post-processing kernels live in :mod:`daemon.processing.gpu_post`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calib.preprocess import Transform
from daemon.device_tensor import DeviceTensor
from daemon.errors import InvalidArgument
from daemon.processing.device import Gpu, elapsed_ms
from daemon.processing.geometry import plan
from daemon.processing.gpu_post import GpuPostprocessor
from daemon.processing.spec import PreprocessConfig

__all__ = ["GpuPostprocessor", "GpuPreprocessor", "SPEC_DTYPE", "IMAGE_DTYPE"]

# Mirrors of the kernel's structs (same field order; every field naturally aligned).
SPEC_DTYPE = np.dtype(
    [("out_h", "<i4"), ("out_w", "<i4"), ("channels", "<i4"), ("color", "<i4"), ("interp", "<i4"),
     ("layout", "<i4"), ("half", "<i4"), ("norm", "<i4"), ("a", "<f4", 3), ("b", "<f4", 3), ("pad", "<i4", 3)]
)
IMAGE_DTYPE = np.dtype(
    [("src_offset", "<i8"), ("src_h", "<i4"), ("src_w", "<i4"), ("rh", "<i4"), ("rw", "<i4"),
     ("off_y", "<i4"), ("off_x", "<i4"), ("scale_y", "<f8"), ("scale_x", "<f8")]
)
_GPU_INTERPOLATIONS = {"linear": 0, "nearest": 1}
_ALIGN = 256


def _per_channel(values: tuple[float, ...] | None, default: float) -> list[float]:
    if values is None:
        return [default] * 3
    return list(values) * 3 if len(values) == 1 else list(values)


def spec_struct(config: PreprocessConfig) -> np.ndarray:
    spec = config.to_spec()
    if spec.interpolation not in _GPU_INTERPOLATIONS:
        raise ValueError(
            f"preprocess.interpolation: {spec.interpolation!r} has no GPU kernel; use 'linear' or 'nearest', "
            "or serve this model with CPU preprocessing"
        )
    s = np.zeros((), SPEC_DTYPE)
    s["out_h"], s["out_w"] = spec.size
    s["channels"] = spec.channels
    s["color"] = ("BGR", "RGB", "GRAY").index(spec.color)
    s["interp"] = _GPU_INTERPOLATIONS[spec.interpolation]
    s["layout"] = 0 if spec.layout == "NCHW" else 1
    s["half"] = int(spec.dtype == "float16")
    if spec.mean is not None:
        s["norm"] = 1
        s["a"], s["b"] = _per_channel(spec.mean, 0.0), _per_channel(spec.std, 1.0)
    else:
        s["norm"] = (2 if spec.scale is not None else 0) | (4 if spec.offset is not None else 0)
        s["a"], s["b"] = _per_channel(spec.scale, 1.0), _per_channel(spec.offset, 0.0)
    s["pad"] = [int(round(p)) for p in _per_channel(spec.pad_value, 0.0)]
    return s


class _Staging:
    """Pinned host memory for one upload, and the event after which it may be rewritten."""

    def __init__(self, gpu: Gpu, nbytes: int) -> None:
        self.host = gpu.pinned(nbytes, np.uint8)
        self.uploaded = gpu.cuda.Event()
        self.pending = False

    def wait(self) -> None:
        if self.pending:
            self.uploaded.synchronize()
            self.pending = False


class GpuPreprocessor:
    """Decoded BGR frames to the model's input tensor on the GPU (one slot's worth of resources).

    ``max_image_hw`` sizes the staging buffers for the usual frame; a larger batch grows them.
    ``stream`` lets the slot share one stream between preprocessing and inference.
    """

    def __init__(
        self,
        config: PreprocessConfig,
        max_batch: int,
        max_image_hw: tuple[int, int] = (1080, 1920),
        device: int = 0,
        stream=None,
    ) -> None:
        self.config = config
        self.spec = config.to_spec()
        self.max_batch = max(1, int(max_batch))
        self._spec = spec_struct(config)
        self.sample_shape = self.spec.input_shape
        self.dtype = np.dtype(np.float16 if self.spec.dtype == "float16" else np.float32)
        self._sample_bytes = int(np.prod(self.sample_shape)) * self.dtype.itemsize
        self._header = -(-self.max_batch * IMAGE_DTYPE.itemsize // _ALIGN) * _ALIGN
        self.gpu = Gpu(device)
        self._freed = False
        with self.gpu.active() as cuda:
            self._kernel = self.gpu.function("preprocess.cu", "preprocess", "PPPP")
            self.stream = stream if stream is not None else cuda.Stream()
            h, w = max_image_hw
            self._capacity = 0
            self._staging: list[_Staging] = []
            self._src = None
            # One usual frame to start with; larger batches grow the buffers once. Sizing for
            # max_batch frames up front pinned ~0.8 GB per slot for max_batch 64 on 1080p.
            self._grow(cuda, self._header + h * w * 3)
            self._spec_dev = cuda.to_device(self._spec.tobytes())
            self.output = cuda.mem_alloc(self.max_batch * self._sample_bytes)
            self._host_out = self.gpu.pinned(self.max_batch * self._sample_bytes // self.dtype.itemsize, self.dtype)
            self.start, self.uploaded, self.done = cuda.Event(), cuda.Event(), cuda.Event()
        self._turn = 0

    def _grow(self, cuda, nbytes: int) -> None:
        if nbytes <= self._capacity:
            return
        nbytes = -(-nbytes // (1 << 20)) * (1 << 20)
        if self._src is not None:
            self.stream.synchronize()  # the old buffers may still be read by queued work
            self._src.free()
            for st in self._staging:
                st.host.base.free()
        self._staging = [_Staging(self.gpu, nbytes), _Staging(self.gpu, nbytes)]
        self._src = cuda.mem_alloc(nbytes)
        self._capacity = nbytes

    def _layout(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Transform], int]:
        header = np.zeros(len(images), IMAGE_DTYPE)
        transforms = []
        offset = self._header
        for i, img in enumerate(images):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
                raise InvalidArgument(f"image {i}: expected a non-empty HxWx3 uint8 BGR array, got "
                                      f"{img.dtype} {list(img.shape)}")
            src_h, src_w = img.shape[:2]
            p = plan((src_h, src_w), self.spec)
            rh, rw = p.resized_hw
            header[i] = (offset, src_h, src_w, rh, rw, p.offset_yx[0], p.offset_yx[1],
                         1.0 / (rh / src_h), 1.0 / (rw / src_w))
            transforms.append(p.transform)
            offset += img.size
        return header, transforms, offset

    def enqueue(self, images: Sequence[np.ndarray], out_ptr: int | None = None) -> tuple[DeviceTensor, list[Transform]]:
        """Queue upload + kernel on the stream and return at once; the tensor is ready when
        ``done`` has been reached. ``out_ptr`` (an engine's input buffer) defaults to ``output``."""
        n = len(images)
        if not 0 < n <= self.max_batch:
            raise InvalidArgument(f"batch of {n} images; this model takes 1 to {self.max_batch}")
        header, transforms, total = self._layout(images)
        with self.gpu.active() as cuda:
            self._grow(cuda, total)
            st = self._staging[self._turn]
            self._turn ^= 1
            st.wait()
            host = st.host
            host[: header.nbytes] = header.view(np.uint8)
            for img, start in zip(images, header["src_offset"].tolist()):
                np.copyto(host[start : start + img.size].reshape(img.shape), img)
            self.start.record(self.stream)
            cuda.memcpy_htod_async(self._src, host[:total], self.stream)
            st.uploaded.record(self.stream)
            st.pending = True
            self.uploaded.record(self.stream)
            dst = int(self.output) if out_ptr is None else int(out_ptr)
            H, W = self.spec.size
            grid = ((W + 31) // 32, (H + 7) // 8, n)
            src = int(self._src)
            self._kernel.prepared_async_call(grid, (32, 8, 1), self.stream, src, src, int(self._spec_dev), dst)
            self.done.record(self.stream)
        return DeviceTensor(dst, (n, *self.sample_shape), self.dtype), transforms

    def run(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Transform]]:
        """Preprocess and copy the tensor back to the host (for CPU engines and for tests)."""
        tensor, transforms = self.enqueue(images)
        n = len(images)
        with self.gpu.active() as cuda:
            host = self._host_out[: n * self._sample_bytes // self.dtype.itemsize]
            cuda.memcpy_dtoh_async(host, tensor.ptr, self.stream)
            self.stream.synchronize()
        return host.reshape(tensor.shape).copy(), transforms

    def timings(self) -> dict[str, float]:
        """Milliseconds of the last batch's upload and kernel, from CUDA events (waits for them)."""
        with self.gpu.active():
            self.done.synchronize()
            return {"upload_ms": elapsed_ms(self.start, self.uploaded), "kernel_ms": elapsed_ms(self.uploaded, self.done)}

    def close(self) -> None:
        if self._freed:
            return
        self._freed = True
        with self.gpu.active():
            self.stream.synchronize()
            for st in self._staging:
                st.host.base.free()
            self._src.free()
            self.output.free()
            self._spec_dev.free()
            self._host_out.base.free()
            # The last references, dropped with the context current: pycuda destroys the events and
            # our stream here and now, not later from the garbage collector on another thread.
            for st in self._staging:
                st.uploaded = None
            self.start = self.uploaded = self.done = None
            self.stream = None
        self.gpu.close()
