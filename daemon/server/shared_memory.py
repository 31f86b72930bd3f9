"""Triton's system shared-memory extension: the registry of client regions and per-request I/O.

A client creates a POSIX shared-memory object (``shm_open``, e.g. with
``tritonclient.utils.shared_memory``), registers a window of it under a region name
(``SystemSharedMemoryRegister``: name, key, offset, byte_size), and then names the region
in the ``shared_memory_region`` / ``shared_memory_offset`` / ``shared_memory_byte_size``
parameters of inputs and requested outputs instead of sending tensor bytes.

Why the CPU side reads with ``pread`` and writes with ``pwrite`` instead of through a
mapping: the object belongs to the client, which may shrink it (``ftruncate``) at any time,
and touching a mapped page past the end of a file kills the whole daemon with SIGBUS, a
signal Python cannot turn into an exception. With ``pread`` the kernel does the bounds
check: a shrunk object gives a short read, which fails only that request. Reading a
1920x1080 frame that way is one memory copy into the tensor the engine is fed (no protobuf
decode, no socket); it is the "one copy at most" the CPU backend and discrete GPUs allow.

Zero-copy on integrated GPUs (Jetson): when the model takes raw frames and preprocesses them
on an integrated GPU, ``attach`` reads nothing for that input; it hands back a
:class:`~daemon.processing.images.RegionFrames` (region, offset, shape, sizes checked against
``fstat``), and the preprocessing kernel reads the frames through the region's window,
page-locked and mapped into the GPU once (:meth:`Region.mapped`) and kept until the region is
closed. No host code reads that mapping: pinned pages cannot fault the GPU, but a host read
past the end of an object the client shrank would kill the daemon. The residual risk, a client
that truncates its object while it is pinned, is stale frames, not a crash (see
:class:`~daemon.processing.device.MappedHostWindow`).

Lifetime: every request holds a reference to each region it names from the moment its
parameters are resolved until its response is built. Unregistering removes the name at
once (new requests get NOT_FOUND, the name can be registered again) but the descriptor is
closed only when the last request holding the region lets go, as Triton does.
"""

from __future__ import annotations

import math
import os
import re
import stat
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from daemon.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted, Unimplemented
from daemon.processing.images import RegionFrames
from daemon.telemetry import metrics

__all__ = ["Limits", "NO_REGIONS", "Region", "RequestRegions", "SharedMemoryRegistry", "OutputWindow"]

# glibc's shm_open is open("/dev/shm/<name without the leading '/'>", O_NOFOLLOW | O_CLOEXEC).
SHM_DIR = "/dev/shm"
# A portable POSIX shm name: one leading '/', then no '/' (glibc also accepts it without the
# slash, as Triton does). The character set is narrowed so a key can never name '.', '..'
# or anything outside SHM_DIR.
_KEY = re.compile(r"/?(?!\.{1,2}$)[A-Za-z0-9._-]{1,250}")
_NAME_MAX = 255
_PARAMS = ("shared_memory_region", "shared_memory_offset", "shared_memory_byte_size")
DISABLED = (
    "this server does not support system shared memory unless started with tegrad serve --allow-shared-memory "
    "(Triton: --allow-client-shm=true); send the tensor data in the request instead"
)

# Element sizes of the fixed-size KServe datatypes (BYTES is variable-length).
_ITEMSIZE = {
    "BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8,
}


@dataclass(frozen=True)
class Limits:
    max_regions: int = 64
    max_bytes: int = 1 << 30


class Region:
    """One registered window ``[offset, offset + byte_size)`` of a client's shm object."""

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int, st: os.stat_result) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        self.fd = fd
        self.identity = (st.st_dev, st.st_ino)  # two regions over one object share it
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()
        self._mapped = None  # the window mapped into the GPU, opened by the first zero-copy request

    # -- lifetime ---------------------------------------------------------------------------

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._retired and self._users == 0
        if last:
            self._close()

    def retire(self) -> None:
        """Unregistered: close now, or when the last request using the region finishes."""
        with self._lock:
            self._retired = True
            idle = self._users == 0
        if idle:
            self._close()

    @property
    def users(self) -> int:
        return self._users

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def _close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
            mapped, self._mapped = self._mapped, None
        try:
            if mapped is not None:
                mapped.close()
        finally:
            if fd >= 0:
                os.close(fd)

    def mapped(self, open_window: Callable[[int, int, int], object]):
        """The region's window mapped into the GPU: ``open_window(fd, offset, byte_size)`` on the
        first call (e.g. :meth:`MappedHostWindow.open`), the same window after, until the region
        is closed. Only a request holding the region may call it."""
        with self._lock:
            if self.fd < 0:
                raise NotFound(f"shared memory region '{self.name}' was unregistered; register it again")
            if self._mapped is None:
                # The object may have shrunk since registration: check before pinning its pages.
                self._check_object(0, self.byte_size)
                self._mapped = open_window(self.fd, self.offset, self.byte_size)
            return self._mapped

    # -- I/O ----------------------------------------------------------------------------------

    def check(self, offset: int, nbytes: int) -> None:
        """Refuse if the object was removed or no longer holds ``nbytes`` at ``offset`` (fstat only)."""
        self._check_object(offset, nbytes)

    def _check_object(self, offset: int, nbytes: int) -> None:
        st = os.fstat(self.fd)
        if st.st_nlink == 0:
            raise NotFound(
                f"the shared memory object '{self.key}' behind region '{self.name}' was removed by its owner; "
                "unregister the region and register a new object"
            )
        end = self.offset + offset + nbytes
        if st.st_size < end:
            raise InvalidArgument(
                f"shared memory region '{self.name}': the object '{self.key}' is now {st.st_size} bytes, too small "
                f"for bytes {self.offset + offset}..{end} (its owner shrank it); register it again"
            )

    def read(self, offset: int, nbytes: int) -> np.ndarray:
        """``nbytes`` from ``offset`` (relative to the window) as a new uint8 array."""
        self._check_object(offset, nbytes)
        out = np.empty(nbytes, np.uint8)
        view = memoryview(out)
        done = 0
        while done < nbytes:
            # A shrink between the check and here gives a short read, never a fault.
            got = os.preadv(self.fd, [view[done:]], self.offset + offset + done)
            if got == 0:
                self._check_object(offset, nbytes)
                raise InvalidArgument(f"shared memory region '{self.name}': the object '{self.key}' shrank during the read")
            done += got
        return out

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self._check_object(offset, len(view))
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset + offset + done)


@dataclass(frozen=True)
class _Window:
    tensor: str  # "input 'x'" / "output 'y'", for messages
    region: Region
    offset: int
    byte_size: int

    def overlaps(self, other: _Window) -> bool:
        if self.region.identity != other.region.identity or not self.byte_size or not other.byte_size:
            return False
        a = self.region.offset + self.offset
        b = other.region.offset + other.offset
        return a < b + other.byte_size and b < a + self.byte_size


class OutputWindow:
    """Where one requested output goes; ``write`` checks the output fits."""

    def __init__(self, name: str, window: _Window) -> None:
        self.name, self._w = name, window

    def write(self, data) -> None:
        nbytes = data.nbytes if isinstance(data, np.ndarray) else len(data)
        w = self._w
        if nbytes > w.byte_size:
            raise InvalidArgument(
                f"output '{self.name}' is {nbytes} bytes, more than the {w.byte_size} bytes its shared memory "
                f"window in region '{w.region.name}' (offset {w.offset}) holds; give a larger shared_memory_byte_size"
            )
        w.region.write(w.offset, data)


@dataclass
class RequestRegions:
    """The regions one request uses: input bytes already read (or frames left in place for the
    GPU), output windows to write."""

    inputs: dict[str, np.ndarray | RegionFrames] = field(default_factory=dict)
    outputs: dict[str, OutputWindow] = field(default_factory=dict)
    held: list[Region] = field(default_factory=list)

    def release(self) -> None:
        held, self.held = self.held, []
        for region in held:
            region.release()


NO_REGIONS = RequestRegions()


def _uses_shared_memory(tensors: Sequence) -> bool:
    return any(p in t.parameters for t in tensors for p in _PARAMS)


def _int_param(tensor, key: str) -> int | None:
    if key not in tensor.parameters:
        return None
    param = tensor.parameters[key]
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise InvalidArgument(f"invalid value type for '{key}' parameter for tensor '{tensor.name}', expected int64_param")
    value = getattr(param, kind)
    if value < 0:
        raise InvalidArgument(f"'{key}' of tensor '{tensor.name}' is {value}; it must not be negative")
    return value


def _parse(tensor) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) of a tensor that uses shared memory, else None (Triton's rules)."""
    params = tensor.parameters
    offset = _int_param(tensor, "shared_memory_offset")
    byte_size = _int_param(tensor, "shared_memory_byte_size")
    if "shared_memory_region" not in params:
        for key, value in (("shared_memory_offset", offset), ("shared_memory_byte_size", byte_size)):
            if value is not None:
                raise InvalidArgument(
                    f"'{key}' can not be specified without 'shared_memory_region' parameter for tensor '{tensor.name}'"
                )
        return None
    region = params["shared_memory_region"]
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument(
            f"invalid value type for 'shared_memory_region' parameter for tensor '{tensor.name}', expected string_param"
        )
    if byte_size is None:
        raise InvalidArgument(
            f"'shared_memory_byte_size' must be specified along with 'shared_memory_region' parameter "
            f"for tensor '{tensor.name}'"
        )
    return region.string_param, offset or 0, byte_size


def _expected_bytes(inp) -> int | None:
    itemsize = _ITEMSIZE.get(inp.datatype)
    if itemsize is None or any(d < 0 for d in inp.shape):
        return None  # BYTES, or a datatype/shape decode_inputs will refuse with its own message
    return math.prod(inp.shape) * itemsize


class SharedMemoryRegistry:
    """The registered system shared-memory regions of one server (thread-safe)."""

    def __init__(self, enabled: bool = False, limits: Limits = Limits()) -> None:
        self.enabled = enabled
        self.limits = limits
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise Unimplemented(DISABLED)

    # -- the three RPCs -------------------------------------------------------------------------

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        self._require_enabled()
        what = f"failed to register shared memory region '{name}'"
        if not name or len(name) > _NAME_MAX or not name.isprintable():
            raise InvalidArgument(f"shared memory region name {name!r} must be 1 to {_NAME_MAX} printable characters")
        if not _KEY.fullmatch(key):
            raise InvalidArgument(
                f"{what}: key {key!r} is not a POSIX shared memory name: '/' followed by 1 to 250 of "
                "A-Z a-z 0-9 . _ - (no other '/'), as shm_open and tritonclient.utils.shared_memory use"
            )
        if byte_size <= 0:
            raise InvalidArgument(f"{what}: byte_size must be at least 1")
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared memory region '{name}' already in manager; unregister it first")
            if len(self._regions) >= self.limits.max_regions:
                raise ResourceExhausted(
                    f"{what}: {len(self._regions)} regions are registered, the limit (--shared-memory-max-regions); "
                    "unregister some first"
                )
            used = sum(r.byte_size for r in self._regions.values())
            if used + byte_size > self.limits.max_bytes:
                raise ResourceExhausted(
                    f"{what}: {byte_size} more bytes would bring registered regions to {used + byte_size} bytes, "
                    f"above the limit of {self.limits.max_bytes} (--shared-memory-max-mb)"
                )
            region = self._open(name, key, offset, byte_size)
            self._regions[name] = region
            self._export()
        return region

    def _open(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        what = f"failed to register shared memory region '{name}'"
        path = os.path.join(SHM_DIR, key.lstrip("/"))
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{what}: no shared memory object '{key}' exists (shm_open found nothing); "
                           "create it before registering") from None
        except PermissionError:
            raise InvalidArgument(
                f"{what}: tegrad (uid {os.getuid()}) may not open shared memory object '{key}' for reading and "
                "writing; tritonclient creates objects with mode 0600, so give tegrad's user or group access "
                f"(e.g. chgrp and chmod 0660 {path})"
            ) from None
        except OSError as exc:
            raise InvalidArgument(f"{what}: cannot open shared memory object '{key}': {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{what}: '{key}' is not a shared memory object")
            if offset + byte_size > st.st_size:
                raise InvalidArgument(
                    f"{what}: offset {offset} + byte_size {byte_size} = {offset + byte_size} is beyond the end of "
                    f"'{key}' ({st.st_size} bytes)"
                )
            return Region(name, key, offset, byte_size, fd, st)
        except BaseException:
            os.close(fd)
            raise

    def status(self, name: str = "") -> list[Region]:
        self._require_enabled()
        with self._lock:
            if not name:
                return sorted(self._regions.values(), key=lambda r: r.name)
            region = self._regions.get(name)
        if region is None:
            raise NotFound(f"Unable to find system shared memory region: '{name}'")
        return [region]

    def unregister(self, name: str = "") -> None:
        """Unregister one region, or all with an empty name; an unknown name is no error (as in Triton)."""
        self._require_enabled()
        with self._lock:
            if name:
                gone = [self._regions.pop(name)] if name in self._regions else []
            else:
                gone, self._regions = list(self._regions.values()), {}
            self._export()
        for region in gone:
            region.retire()

    def close(self) -> None:
        with self._lock:
            gone, self._regions = list(self._regions.values()), {}
            self._export()
        for region in gone:
            region.retire()

    def _export(self) -> None:
        metrics.SHARED_MEMORY_REGIONS.set(len(self._regions))
        metrics.SHARED_MEMORY_BYTES.set(sum(r.byte_size for r in self._regions.values()))

    # -- per request ---------------------------------------------------------------------------

    def attach(self, request, in_place: Collection[str] = ()) -> RequestRegions:
        """Resolve the request's shared-memory inputs (read now) and outputs (written later).

        Inputs named in ``in_place`` (raw frames a GPU reads through the mapped region) that are
        UINT8 stay where they are, as :class:`RegionFrames`. The caller must ``release()`` the
        result when the response is built. Every check runs before any byte is read, so a bad
        request costs nothing.
        """
        if not (_uses_shared_memory(request.inputs) or _uses_shared_memory(request.outputs)):
            return NO_REGIONS
        self._require_enabled()
        regions = RequestRegions()
        try:
            windows: list[tuple[str, _Window]] = []
            for inp in request.inputs:
                parsed = _parse(inp)
                if parsed is None:
                    continue
                if inp.contents.ListFields():
                    raise InvalidArgument(
                        f"unexpected 'content' provided when using shared memory for input tensor '{inp.name}' "
                        f"for model '{request.model_name}'"
                    )
                window = self._window(regions, f"input '{inp.name}'", *parsed)
                expected = _expected_bytes(inp)
                if expected is not None and expected != window.byte_size:
                    raise InvalidArgument(
                        f"input '{inp.name}': shared_memory_byte_size is {window.byte_size} but shape "
                        f"{list(inp.shape)} of {inp.datatype} needs {expected} bytes"
                    )
                windows.append((inp.name, window))
            placed = [w for _, w in windows]
            for out in request.outputs:
                parsed = _parse(out)
                if parsed is None:
                    continue
                if "classification" in out.parameters:
                    raise InvalidArgument(
                        f"output '{out.name}' can't set both 'shared_memory_region' and 'classification'"
                    )
                window = self._window(regions, f"output '{out.name}'", *parsed)
                for other in placed:
                    if window.overlaps(other):
                        raise InvalidArgument(
                            f"{window.tensor} overlaps {other.tensor} in shared memory (object '{window.region.key}'); "
                            "an output needs a window of its own"
                        )
                placed.append(window)
                regions.outputs[out.name] = OutputWindow(out.name, window)
            datatypes = {inp.name: inp.datatype for inp in request.inputs}
            shapes = {inp.name: tuple(inp.shape) for inp in request.inputs}
            for name, window in windows:
                if name in in_place and datatypes[name] == "UINT8":
                    window.region.check(window.offset, window.byte_size)
                    regions.inputs[name] = RegionFrames(window.region, window.offset, shapes[name])
                else:
                    regions.inputs[name] = window.region.read(window.offset, window.byte_size)
        except BaseException:
            regions.release()
            raise
        return regions

    def _window(self, regions: RequestRegions, tensor: str, name: str, offset: int, byte_size: int) -> _Window:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise NotFound(f"Unable to find shared memory region: '{name}' ({tensor}); register it first")
            region.acquire()
        regions.held.append(region)
        if offset >= region.byte_size:
            raise InvalidArgument(
                f"Invalid offset for shared memory region: '{name}' ({tensor}): offset {offset} is not below the "
                f"region's {region.byte_size} bytes"
            )
        if offset + byte_size > region.byte_size:
            raise InvalidArgument(
                f"Invalid offset + byte size for shared memory region: '{name}' ({tensor}): {offset} + {byte_size} "
                f"is beyond the region's {region.byte_size} bytes"
            )
        return _Window(tensor, region, offset, byte_size)
