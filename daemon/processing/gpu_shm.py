"""The GPU preprocessing kernel fed straight from a client's shared-memory window.

:meth:`GpuPreprocessor.enqueue` packs frames into pinned staging memory and uploads them;
here the frames already sit in a :class:`~daemon.processing.device.MappedHostWindow` (a
registered region, page-locked and mapped into the GPU), so only the small per-image header
is uploaded and the kernel reads the pixels in place: on a Jetson, from the very DRAM the app
wrote them to. Same kernel, same spec, same results as the staged path and the CPU.

:func:`enqueue_frames` is what serving calls: a batch the scheduler assembled may hold frames
from several regions and decoded images side by side, so each run of neighbours from one
source gets one kernel launch writing its rows of the one output tensor.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from calib.preprocess import Transform
from daemon.device_tensor import DeviceTensor
from daemon.errors import InvalidArgument
from daemon.processing.device import MappedHostWindow
from daemon.processing.geometry import plan
from daemon.processing.gpu import IMAGE_DTYPE, GpuPreprocessor
from daemon.processing.images import FrameInRegion


def enqueue_from_window(
    pre: GpuPreprocessor,
    window: MappedHostWindow,
    frames: Sequence[tuple[int, int, int]],
    out_ptr: int | None = None,
) -> tuple[DeviceTensor, list[Transform]]:
    """Queue the kernel over ``frames`` = (byte offset in the window, height, width) of BGR uint8
    HxWx3 frames; returns like ``pre.enqueue``: the tensor is ready when ``pre.done`` is reached."""
    n = len(frames)
    if not 0 < n <= pre.max_batch:
        raise InvalidArgument(f"batch of {n} frames; this model takes 1 to {pre.max_batch}")
    header = np.zeros(n, IMAGE_DTYPE)
    transforms = []
    for i, (offset, src_h, src_w) in enumerate(frames):
        if src_h <= 0 or src_w <= 0 or offset < 0 or offset + src_h * src_w * 3 > window.nbytes:
            raise InvalidArgument(f"frame {i}: {src_h}x{src_w}x3 at byte {offset} does not lie inside the "
                                  f"{window.nbytes}-byte shared memory window")
        p = plan((src_h, src_w), pre.spec)
        rh, rw = p.resized_hw
        # The same expressions as GpuPreprocessor._layout, so the scales match to the last bit.
        header[i] = (offset, src_h, src_w, rh, rw, p.offset_yx[0], p.offset_yx[1],
                     1.0 / (rh / src_h), 1.0 / (rw / src_w))
        transforms.append(p.transform)
    with pre.gpu.active() as cuda:
        st = pre._staging[pre._turn]
        pre._turn ^= 1
        st.wait()
        st.host[: header.nbytes] = header.view(np.uint8)
        pre.start.record(pre.stream)
        cuda.memcpy_htod_async(pre._src, st.host[: header.nbytes], pre.stream)
        st.uploaded.record(pre.stream)
        st.pending = True
        pre.uploaded.record(pre.stream)
        dst = int(pre.output) if out_ptr is None else int(out_ptr)
        H, W = pre.spec.size
        grid = ((W + 31) // 32, (H + 7) // 8, n)
        pre._kernel.prepared_async_call(grid, (32, 8, 1), pre.stream, window.device_ptr, int(pre._src),
                                        int(pre._spec_dev), dst)
        pre.done.record(pre.stream)
    return DeviceTensor(dst, (n, *pre.sample_shape), pre.dtype), transforms


def run_from_window(pre: GpuPreprocessor, window: MappedHostWindow,
                    frames: Sequence[tuple[int, int, int]]) -> tuple[np.ndarray, list[Transform]]:
    """:func:`enqueue_from_window`, then the tensor copied to the host (for CPU engines and tests)."""
    tensor, transforms = enqueue_from_window(pre, window, frames)
    with pre.gpu.active() as cuda:
        host = np.empty(tensor.shape, tensor.dtype)
        cuda.memcpy_dtoh_async(host, tensor.ptr, pre.stream)
        pre.stream.synchronize()
    return host, transforms


def window_of(pre: GpuPreprocessor, frame: FrameInRegion) -> MappedHostWindow:
    """The frame's region mapped into the GPU, registered on first use and cached by the region."""
    ordinal = pre.gpu.ordinal
    return frame.region.mapped(lambda fd, offset, nbytes: MappedHostWindow.open(fd, offset, nbytes, ordinal))


def _source(item) -> object:
    return item.region if isinstance(item, FrameInRegion) else None


def enqueue_frames(pre: GpuPreprocessor, images: Sequence, out_ptr: int | None = None) -> tuple[DeviceTensor, list[Transform]]:
    """Like ``pre.enqueue`` for a batch of decoded images and :class:`FrameInRegion` items: frames
    in a region are read by the kernel through the mapped window, never by the host."""
    n = len(images)
    if not 0 < n <= pre.max_batch:
        raise InvalidArgument(f"batch of {n} images; this model takes 1 to {pre.max_batch}")
    dst = int(pre.output) if out_ptr is None else int(out_ptr)
    row = int(np.prod(pre.sample_shape)) * pre.dtype.itemsize
    transforms: list[Transform] = []
    for source, run in itertools.groupby(images, key=_source):
        run = list(run)
        at = dst + len(transforms) * row
        if source is None:
            _, part = pre.enqueue(run, out_ptr=at)
        else:
            _, part = enqueue_from_window(pre, window_of(pre, run[0]), [(f.offset, f.height, f.width) for f in run], at)
        transforms.extend(part)
    return DeviceTensor(dst, (n, *pre.sample_shape), pre.dtype), transforms


def run_frames(pre: GpuPreprocessor, images: Sequence) -> tuple[np.ndarray, list[Transform]]:
    """:func:`enqueue_frames`, then the tensor copied to the host (for engines without device I/O)."""
    tensor, transforms = enqueue_frames(pre, images)
    with pre.gpu.active() as cuda:
        host = np.empty(tensor.shape, tensor.dtype)
        cuda.memcpy_dtoh_async(host, tensor.ptr, pre.stream)
        pre.stream.synchronize()
    return host, transforms
