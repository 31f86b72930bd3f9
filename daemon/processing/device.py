"""CUDA plumbing for the GPU processors: the device's primary context, kernels, host buffers.

Everything runs in the device's primary context, the one TensorRT's runtime uses, so device
pointers pass freely between the engine and these kernels. The daemon calls from one worker
thread per instance slot, so every block of CUDA calls pushes the context and pops it after
(``Gpu.active``) instead of relying on a context bound to the importing thread
(``pycuda.autoinit``). pycuda is imported only inside functions: a CPU-only install imports
this module.
"""

from __future__ import annotations

import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).parent / "kernels"
_compile_lock = threading.Lock()
_modules: dict[tuple[int, str], tuple[object, object]] = {}


def kernel_cache_dir() -> str | bool:
    """Where compiled kernels are kept across restarts; False (no cache) when it cannot be created."""
    path = os.environ.get("TEGRAD_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tegrad", "kernels")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return False
    return path


def _nvcc() -> str:
    # A systemd service on JetPack has no /usr/local/cuda/bin on its PATH.
    found = os.environ.get("TEGRAD_NVCC") or shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return "nvcc"


class Gpu:
    """A retained reference to one device's primary context; ``close`` releases it."""

    def __init__(self, ordinal: int = 0) -> None:
        import pycuda.driver as cuda

        cuda.init()
        self.cuda = cuda
        self.ordinal = ordinal
        self.device = cuda.Device(ordinal)
        self.context = self.device.retain_primary_context()
        attr = cuda.device_attribute
        # Jetson: CPU and GPU share DRAM, so small results are read in place instead of copied.
        self.integrated = bool(self.device.get_attribute(attr.INTEGRATED)) and bool(
            self.device.get_attribute(attr.CAN_MAP_HOST_MEMORY)
        )
        self._closed = False

    @contextmanager
    def active(self):
        self.context.push()
        try:
            yield self.cuda
        finally:
            self.cuda.Context.pop()

    def function(self, filename: str, name: str, arg_types: str):
        """A prepared kernel from ``kernels/<filename>``, compiled once per process (and cached on
        disk by pycuda across processes, keyed by source, options, GPU architecture and nvcc)."""
        key = (self.ordinal, filename)
        with _compile_lock:
            entry = _modules.get(key)
            if entry is None:
                from pycuda.compiler import SourceModule

                source = (KERNEL_DIR / filename).read_text(encoding="utf-8")
                # The kernels declare extern "C" themselves so that cuda_fp16.h (C++) can be included.
                module = SourceModule(
                    source, nvcc=_nvcc(), options=["-O3"], no_extern_c=True, cache_dir=kernel_cache_dir()
                )
                # A loaded module dies with its context, and the primary context is destroyed when
                # its last holder lets go (every processor closed): the cache holds its own reference.
                entry = _modules[key] = (module, self.device.retain_primary_context())
        return entry[0].get_function(name).prepare(arg_types)

    def pinned(self, count: int, dtype, mapped: bool = False) -> np.ndarray:
        flags = self.cuda.host_alloc_flags.DEVICEMAP if mapped else 0
        return self.cuda.pagelocked_empty(max(int(count), 1), dtype, mem_flags=flags)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            # pycuda releases a primary context in detach() only when it is current: off the thread
            # that retained it detach() is a no-op (a leak), on it detach() would push it and leave
            # it pushed. Made current here first, it is released and popped on any thread.
            self.context.push()
            self.context.detach()


class HostResult:
    """Where a kernel's small result lands for the host to read: mapped pinned memory the GPU
    writes in place on integrated GPUs, else a device buffer copied into pinned memory."""

    def __init__(self, gpu: Gpu, nbytes: int) -> None:
        self.host = gpu.pinned(nbytes, np.uint8, mapped=gpu.integrated)
        if gpu.integrated:
            self.device = None
            self.ptr = int(self.host.base.get_device_pointer())
        else:
            self.device = gpu.cuda.mem_alloc(self.host.nbytes)
            self.ptr = int(self.device)

    def fetch(self, cuda, nbytes: int, stream) -> None:
        if self.device is not None:
            cuda.memcpy_dtoh_async(self.host[:nbytes], self.ptr, stream)

    def free(self) -> None:
        if self.device is not None:
            self.device.free()
        self.host.base.free()


def elapsed_ms(start, end) -> float:
    return float(start.time_till(end))


class MappedHostWindow:
    """A window ``[offset, offset + nbytes)`` of a file (a client's shared-memory object), mapped
    into this process, page-locked and mapped into the GPU (``cuMemHostRegister`` with
    ``DEVICEMAP``), so kernels read the client's bytes in place at ``device_ptr``.

    On an integrated GPU (Jetson) this is the zero-copy path: CPU and GPU share DRAM and the
    kernel reads the frame where the app wrote it. Only the window is mapped. The host side
    must not read ``host`` (the serving path never does): a client that shrinks its object
    makes host access past the new end fault (SIGBUS), while the GPU keeps reading the pages
    it pinned. Residual risk: a client that truncates the object while it is pinned here and
    grows it again leaves the GPU reading the old, orphaned pages (stale frames, no crash)
    until the region is registered again. ``close`` unregisters and unmaps, in this context.
    """

    def __init__(self, gpu: Gpu, fd: int, offset: int, nbytes: int) -> None:
        import mmap

        if nbytes <= 0:
            raise ValueError("a mapped window needs at least one byte")
        # mmap offsets must be page multiples: map from the page the window starts in.
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        self._skip = offset - start
        self.gpu = gpu
        self.nbytes = nbytes
        self._map = mmap.mmap(fd, self._skip + nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=start)
        whole = None
        try:
            with gpu.active() as cuda:
                whole = np.frombuffer(self._map, np.uint8)
                self._registered = cuda.register_host_memory(whole, flags=cuda.mem_host_register_flags.DEVICEMAP)
                self.device_ptr = int(self._registered.base.get_device_pointer()) + self._skip
        except BaseException:
            whole = None  # noqa: F841  (the view pins the mapping's buffer; mmap will not close under it)
            self._map.close()
            raise
        self.host = self._registered[self._skip:]
        self._closed = False
        self._owns_gpu = False

    @classmethod
    def open(cls, fd: int, offset: int, nbytes: int, ordinal: int = 0) -> MappedHostWindow:
        """A window that holds its own reference to the device's primary context, so it can
        outlive the processors that use it (a registered region's cache); ``close`` drops it."""
        gpu = Gpu(ordinal)
        try:
            window = cls(gpu, fd, offset, nbytes)
        except BaseException:
            gpu.close()
            raise
        window._owns_gpu = True
        return window

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self.gpu.active() as cuda:
            # Work queued by any slot may still read these pages; unregistering under a running
            # kernel is undefined, so wait for the context to go idle (this runs once per region).
            cuda.Context.synchronize()
            self._registered.base.unregister()
        # The numpy views export the mapping's buffer; mmap refuses to close while they live.
        self.host = self._registered = None
        self._map.close()
        if self._owns_gpu:
            self.gpu.close()
