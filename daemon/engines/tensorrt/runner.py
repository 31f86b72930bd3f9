"""Runs a TensorRT engine plan: one execution context and one CUDA stream per instance slot.

All CUDA work happens in the device's primary context, the one TensorRT's runtime API uses
too, pushed around every block of calls because slots run on different threads. Buffers are
allocated once per slot, sized for the optimization profile's largest shapes. On an integrated
GPU (Jetson) outputs live in mapped pinned host memory the GPU writes directly; inputs stay in
device memory because mapped memory is uncached for GPU reads on some Tegra chips.

Besides ``infer`` (host arrays in and out) a slot has a device-side path for GPU
pre/post-processing: a preprocessing kernel writes straight into ``input_buffer``,
``infer_device`` only enqueues the execution, and a postprocessing kernel on the same
``stream`` reads the outputs in place, so one request's pipeline needs no host sync before its
results while other slots' streams keep the GPU busy.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from daemon.device_tensor import DeviceTensor
from daemon.engines.tensorrt import layers
from daemon.engines.tensorrt.builder import logged_errors, require_cuda, require_tensorrt, trt_logger
from daemon.engines.tensorrt.faults import is_sticky, report_sticky_fault
from daemon.errors import ConfigError, InvalidArgument, TegradError, Unavailable
from daemon.tensor_spec import TensorSpec, datatype_of

log = logging.getLogger("tegrad.engines.tensorrt")

if TYPE_CHECKING:  # annotations only: tests/tensorrt_api checks the calls on them against the real bindings
    import tensorrt as trt

# TensorRT DataType name -> numpy dtype for tensors that cross the engine boundary.
_IO_TYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
    "UINT8": np.uint8,
}


def numpy_dtype(trt, datatype, name: str) -> np.dtype:
    for attr, np_type in _IO_TYPES.items():
        if getattr(trt.DataType, attr, None) == datatype:
            return np.dtype(np_type)
    raise ConfigError(
        f"engine tensor {name!r} has TensorRT type {datatype}, which tegrad cannot pass in or out "
        "(BF16, FP8 and INT4 are not supported at the model boundary); cast it in the ONNX graph"
    )


_primary = None
_primary_lock = threading.Lock()


def _primary_context(cuda):
    """Device 0's primary context, retained once for the life of the process.

    Never released: TensorRT's CUDA runtime keeps it alive anyway, and pycuda's detach of a
    primary context leaves it current on the calling thread.
    """
    global _primary
    with _primary_lock:
        if _primary is None:
            _primary = cuda.Device(0).retain_primary_context()
        return _primary


class _Buffer:
    """A pinned host array plus the device address TensorRT reads or writes."""

    __slots__ = ("host", "device", "ptr")

    def __init__(self, cuda, elements: int, dtype: np.dtype, mapped: bool) -> None:
        n = max(int(elements), 1)  # zero-byte allocations fail
        if mapped:
            self.host = cuda.pagelocked_empty(n, dtype, mem_flags=cuda.host_alloc_flags.DEVICEMAP)
            self.device = None
            self.ptr = int(self.host.base.get_device_pointer())
        else:
            self.host = cuda.pagelocked_empty(n, dtype)
            self.device = cuda.mem_alloc(self.host.nbytes)
            self.ptr = int(self.device)

    def free(self) -> None:
        if self.device is not None:
            self.device.free()
        self.host.base.free()


class _Slot:
    __slots__ = ("lock", "context", "stream", "buffers", "started", "done")

    def __init__(self, cuda, context: trt.IExecutionContext, stream) -> None:
        self.lock = threading.Lock()
        self.context = context
        self.stream = stream
        self.buffers: dict[str, _Buffer] = {}
        # Around every execution: ``done`` is what a postprocessing stream, or the next slot using
        # the shared activation memory, waits on; the pair times the infer stage on the GPU itself.
        self.started, self.done = cuda.Event(), cuda.Event()

    def release(self) -> None:
        """Drop the last references while the caller holds the context current on this thread:
        pycuda then destroys events and stream in their context at once, never later from the
        garbage collector on another thread ("out-of-thread context could not be cleaned up")."""
        for buf in self.buffers.values():
            buf.free()
        self.buffers.clear()
        self.started = self.done = None
        self.context = None
        self.stream = None


class _SharedMemory:
    """One block of activation memory for every execution context of an engine. Executions that
    use it are ordered on the GPU (each waits for the previous user's ``done`` event), not on
    the host: a slot queues its work and returns, as before."""

    def __init__(self, cuda, size: int) -> None:
        self.block = cuda.mem_alloc(max(int(size), 1))
        self.size = int(size)
        self.lock = threading.Lock()
        self.last = None  # the ``done`` event of the slot that used the block last

    def free(self) -> None:
        self.block.free()
        self.last = None


class TrtEngine:
    backend = "tensorrt"

    def __init__(self, cuda, inputs: list[TensorSpec], outputs: list[TensorSpec], *, precision: str, engine_id: str) -> None:
        self._cuda = cuda
        self.inputs = inputs
        self.outputs = outputs
        self.precision = precision
        self.engine_id = engine_id
        self._ctx = _primary_context(cuda)
        self._runtime = None
        self._engine = None
        self._slots: list[_Slot] = []
        self._in_types: dict[str, np.dtype] = {}
        self._out_types: dict[str, np.dtype] = {}  # every engine output: TensorRT needs an address for each
        self._zero_copy = False
        self._closed = False
        self._shared: _SharedMemory | None = None
        self._resolve = None
        self._prebuilt = False
        self.layer_counts: dict[str, int] = {}  # a prebuilt engine's inspector, when it was built to tell
        self._failure = ""  # the first sticky CUDA error: the engine is UNAVAILABLE from then on
        self._static_batch = 0

    @classmethod
    def load(
        cls,
        plan_path: Path,
        *,
        inputs: list[TensorSpec] | None,
        outputs: list[TensorSpec] | None,
        instances: int,
        max_batch: int,
        precision: str,
        engine_id: str,
        dla_core: int = -1,
        share_memory: bool = True,
        resolve: Callable[[list[TensorSpec], list[TensorSpec]], tuple[list[TensorSpec], list[TensorSpec]]] | None = None,
        prebuilt: bool = False,
    ) -> TrtEngine:
        """``resolve``: for a plan without its ONNX (``prebuilt``), turns the engine's own I/O into
        the model's specs (checked against config.toml) instead of ``inputs``/``outputs``."""
        trt = require_tensorrt()
        cuda = require_cuda()
        self = cls(cuda, inputs or [], outputs or [], precision=precision, engine_id=engine_id)
        self._resolve, self._prebuilt = resolve, prebuilt
        try:
            self._ctx.push()
            try:
                self._open(trt, Path(plan_path), instances, max_batch, dla_core, share_memory and instances > 1)
            finally:
                cuda.Context.pop()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def slots(self) -> int:
        return len(self._slots)

    def _open(self, trt, plan_path: Path, instances: int, max_batch: int, dla_core: int, share: bool) -> None:
        cuda = self._cuda
        logger = trt_logger()
        logger.errors.clear()
        self._runtime = trt.Runtime(logger)
        if dla_core >= 0:
            self._runtime.DLA_core = dla_core
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            device = cuda.Device(0)
            here = f"TensorRT {trt.__version__} on {device.name()} (compute capability {'.'.join(map(str, device.compute_capability()))})"
            said = " | ".join(logger.errors) or "no reason given"
            if self._prebuilt:
                raise ConfigError(f"{plan_path}: this engine was not built by {here}, which is what runs here "
                                  f"(TensorRT says: {said}); build it on this device with this TensorRT, or put the "
                                  "model's ONNX in the version directory and let tegrad build it")
            raise ConfigError(f"{plan_path}: {here} cannot load this engine plan (built by another TensorRT version "
                              f"or for another GPU?); delete it to rebuild: {said}")
        engine = self._engine
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            io[name] = (is_input, numpy_dtype(trt, engine.get_tensor_dtype(name), name), tuple(engine.get_tensor_shape(name)))
        if self._resolve is not None:
            graph = {flag: [TensorSpec(n, datatype_of(dt), shape) for n, (is_in, dt, shape) in io.items() if is_in == flag]
                     for flag in (True, False)}
            self.inputs, self.outputs = self._resolve(graph[True], graph[False])
        self._check_specs(io, plan_path)
        self._in_types = {n: dt for n, (is_in, dt, _) in io.items() if is_in}
        self._out_types = {n: dt for n, (is_in, dt, _) in io.items() if not is_in}
        profile = {n: engine.get_tensor_profile_shape(n, 0) for n in self._in_types}
        max_in = {n: tuple(p[2]) for n, p in profile.items()}
        if max_batch > 0 and profile and all(p[0] and tuple(p[0]) == tuple(p[2]) for p in profile.values()):
            # A DLA engine takes one batch size: larger batches run in chunks, smaller ones padded.
            self._static_batch = int(next(iter(max_in.values()))[0])
        elif max_batch > 0:
            short = {n: s[0] for n, s in max_in.items() if s and s[0] < max_batch}
            if short:
                fix = "set max_batch to at most that" if self._prebuilt else "delete the plan to rebuild it"
                raise ConfigError(f"{plan_path}: the engine takes batches up to {min(short.values())} but max_batch is "
                                  f"{max_batch}; {fix}")
        if self._prebuilt:
            try:
                self.layer_counts = layers.counts(layers.of_engine(trt, engine))
            except Exception as exc:  # the counts are for show: a plan that runs is served without them
                log.warning("%s: TensorRT engine inspector: %s", plan_path, exc)
        device = cuda.Device(0)
        self._zero_copy = bool(device.get_attribute(cuda.device_attribute.INTEGRATED)) and bool(
            device.get_attribute(cuda.device_attribute.CAN_MAP_HOST_MEMORY)
        )
        max_out: dict[str, int] = {}
        if share:
            self._shared = _SharedMemory(cuda, engine.device_memory_size_v2)
        for _ in range(instances):
            context = self._create_context(trt, engine)
            if context is None:
                raise RuntimeError(f"{plan_path}: TensorRT could not create an execution context (out of GPU memory?)")
            slot = _Slot(cuda, context, cuda.Stream())
            self._slots.append(slot)
            if not max_out:  # output sizes at the largest input shapes; _fit grows a buffer if ever needed
                for name, shape in max_in.items():
                    context.set_input_shape(name, shape)
                for name in self._out_types:
                    shape = tuple(context.get_tensor_shape(name))
                    if any(d < 0 for d in shape):
                        raise ConfigError(f"{plan_path}: output {name!r} has a data-dependent shape {list(shape)}, "
                                          "which tegrad's TensorRT runner does not support")
                    max_out[name] = math.prod(shape)
            for name, dtype in self._in_types.items():
                slot.buffers[name] = _Buffer(cuda, math.prod(max_in[name]), dtype, mapped=False)
            for name, dtype in self._out_types.items():
                slot.buffers[name] = _Buffer(cuda, max_out[name], dtype, mapped=self._zero_copy)

    def _create_context(self, trt, engine: trt.ICudaEngine) -> trt.IExecutionContext | None:
        if self._shared is None:
            return engine.create_execution_context()
        if hasattr(engine, "create_execution_context_without_device_memory"):  # TensorRT 10
            context = engine.create_execution_context_without_device_memory()
        else:  # TensorRT 11 replaced it with the allocation strategy
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is not None:
            context.set_device_memory(int(self._shared.block), self._shared.size)
        return context

    def _check_specs(self, io: dict, plan_path: Path) -> None:
        where = f"{plan_path}:"
        for specs, want_input, kind in ((self.inputs, True, "input"), (self.outputs, False, "output")):
            for spec in specs:
                if spec.name not in io:
                    raise ConfigError(f"{where} the engine has no tensor {spec.name!r}; its tensors are {', '.join(io)}")
                is_input, dtype, shape = io[spec.name]
                if is_input != want_input:
                    raise ConfigError(f"{where} {spec.name!r} is an {'input' if is_input else 'output'} of the engine, "
                                      f"not an {kind}")
                if dtype != spec.dtype:
                    raise ConfigError(f"{where} {kind} {spec.name!r} is {dtype} in the engine but {spec.datatype} "
                                      "in the model config")
                if len(shape) != len(spec.shape):
                    raise ConfigError(f"{where} {kind} {spec.name!r} has shape {list(shape)} in the engine but "
                                      f"{list(spec.shape)} in the model config")
        fed = {s.name for s in self.inputs}
        unfed = [n for n, (is_input, _, _) in io.items() if is_input and n not in fed]
        if unfed:
            raise ConfigError(f"{where} engine inputs {', '.join(map(repr, unfed))} are missing from the model's inputs")

    def _usable(self) -> None:
        if self._failure:
            raise Unavailable(f"TensorRT engine {self.engine_id} is UNAVAILABLE after a CUDA error: {self._failure}")
        if self._closed:
            raise Unavailable(f"TensorRT engine {self.engine_id} is closed")

    def _slot(self, slot: int) -> _Slot:
        self._usable()
        s = self._slots[slot] if 0 <= slot < len(self._slots) else None
        if s is None:
            raise Unavailable(f"TensorRT engine {self.engine_id} has no slot {slot}")
        return s

    @property
    def failure(self) -> str:
        """The CUDA error that made the engine UNAVAILABLE; empty while it serves."""
        return self._failure

    def infer(self, feeds: dict[str, np.ndarray], slot: int = 0) -> dict[str, np.ndarray]:
        s = self._slot(slot)
        with s.lock:
            self._usable()
            self._ctx.push()
            try:
                if self._static_batch:
                    return self._run_static(s, feeds)
                return self._run(s, feeds)
            except TegradError:
                s.stream.synchronize()  # queued copies still read the pinned buffers the next batch refills
                raise
            except Exception as exc:
                self._fault(s, exc)
                raise
            finally:
                self._cuda.Context.pop()

    def _run_static(self, s: _Slot, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = self._static_batch
        n = {len(a) for a in feeds.values()}
        if not n:
            return self._run(s, feeds)  # which names the missing input
        if len(n) != 1:
            raise InvalidArgument(f"inputs have different batch sizes {sorted(n)}")
        total = n.pop()
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, total, size):
            count = min(size, total - start)
            chunk = {}
            for name, arr in feeds.items():
                part = arr[start:start + count]
                if count < size:
                    part = np.concatenate([part, np.zeros((size - count, *arr.shape[1:]), arr.dtype)])
                chunk[name] = part
            parts.append({k: v[:count] for k, v in self._run(s, chunk).items()})
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _fault(self, s: _Slot, exc: Exception) -> None:
        """After an error from CUDA or TensorRT: a sticky one makes the engine UNAVAILABLE with it
        (and is reported once, for the process to restart); any other one leaves it serving."""
        message = str(exc) or type(exc).__name__
        logged = logged_errors()
        sticky = is_sticky(message) or is_sticky(logged)
        if not sticky:
            try:
                s.stream.synchronize()  # queued copies still read the pinned buffers the next batch refills
                return
            except Exception as again:  # the context broke meanwhile; synchronizing only repeats it
                sticky = True
                message = f"{message}; then {again}"
        self._failure = message + (f" (TensorRT: {logged})" if logged and logged not in message else "")
        report_sticky_fault(f"TensorRT engine {self.engine_id}: {self._failure}")
        raise Unavailable(f"TensorRT engine {self.engine_id} is UNAVAILABLE after a CUDA error: {self._failure}") from None

    def _fit(self, slot: _Slot, name: str, elements: int, dtype: np.dtype, mapped: bool) -> _Buffer:
        buf = slot.buffers[name]
        if buf.host.size < elements:  # an output larger at some shape than at the profile's maximum
            slot.stream.synchronize()  # work queued by the device path may still use the old buffer
            buf.free()
            buf = slot.buffers[name] = _Buffer(self._cuda, elements, dtype, mapped)
        return buf

    def _set_shape(self, context: trt.IExecutionContext, name: str, shape: tuple[int, ...]) -> None:
        if not context.set_input_shape(name, shape):
            lo, _, hi = self._engine.get_tensor_profile_shape(name, 0)
            raise InvalidArgument(f"input {name!r} shape {list(shape)} is outside the engine's range "
                                  f"{list(lo)} to {list(hi)}")

    def _run(self, s: _Slot, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, context = self._cuda, s.context
        for name, dtype in self._in_types.items():  # every check before the first copy is queued
            arr = feeds.get(name)
            if arr is None:
                raise InvalidArgument(f"input {name!r} is missing")
            if arr.dtype != dtype:
                raise InvalidArgument(f"input {name!r} is {arr.dtype}, the engine takes {dtype}")
            self._set_shape(context, name, arr.shape)
        for name, dtype in self._in_types.items():
            arr = feeds[name]
            buf = self._fit(s, name, arr.size, dtype, mapped=False)
            staged = buf.host[: arr.size]
            np.copyto(staged.reshape(arr.shape), arr)
            cuda.memcpy_htod_async(buf.ptr, staged, s.stream)
            context.set_tensor_address(name, buf.ptr)
        results = []
        for name, dtype in self._out_types.items():
            shape = tuple(context.get_tensor_shape(name))
            n = math.prod(shape)
            buf = self._fit(s, name, n, dtype, mapped=self._zero_copy)
            context.set_tensor_address(name, buf.ptr)
            results.append((name, shape, buf.host[:n]))
        self._execute(s)
        if not self._zero_copy:
            for name, _, host in results:
                cuda.memcpy_dtoh_async(host, s.buffers[name].ptr, s.stream)
        s.stream.synchronize()
        wanted = {o.name for o in self.outputs}
        # Copies: the pinned buffers belong to the slot and the next batch overwrites them.
        return {name: host.reshape(shape).copy() for name, shape, host in results if name in wanted}

    # ------------------------------------------------------------ device-side path, one slot

    def stream(self, slot: int):
        """The slot's pycuda stream, for processors that queue their kernels around the engine's."""
        return self._slot(slot).stream

    def input_buffer(self, slot: int, name: str) -> int:
        """Device address of the slot's buffer for input ``name``, sized for the profile's maximum.

        Whatever writes it must be ordered before ``infer_device`` and after the previous
        execution of the slot: the slot's stream does both.
        """
        if name not in self._in_types:
            raise InvalidArgument(f"the engine has no input {name!r}")
        return self._slot(slot).buffers[name].ptr

    def done_event(self, slot: int):
        """Recorded after the slot's last ``infer_device`` execution."""
        return self._slot(slot).done

    def infer_device(self, slot: int, shapes: dict[str, tuple[int, ...]], wait_for=None) -> dict[str, DeviceTensor]:
        """Queue one execution on the slot's stream over what its input buffers hold; returns at once.

        ``wait_for`` is an event (e.g. a preprocessor's ``done`` on another stream) to start after.
        The outputs are views of the slot's buffers, valid until its next execution; they are
        ready once ``done_event(slot)`` has been reached.
        """
        s = self._slot(slot)
        with s.lock:
            self._usable()
            self._ctx.push()
            try:
                return self._enqueue(s, shapes, wait_for)
            except TegradError:
                raise
            except Exception as exc:
                self._fault(s, exc)
                raise
            finally:
                self._cuda.Context.pop()

    def _enqueue(self, s: _Slot, shapes: dict[str, tuple[int, ...]], wait_for) -> dict[str, DeviceTensor]:
        context = s.context
        rows = None
        if self._static_batch:  # the buffers hold the static batch; rows past the request's are ignored
            rows = {int(shape[0]) for shape in shapes.values()}.pop() if shapes else 0
            if rows > self._static_batch:
                raise InvalidArgument(f"this DLA engine runs batches of exactly {self._static_batch}; got {rows} "
                                      f"(set max_batch <= tensorrt.dla_batch for GPU preprocessing)")
            shapes = {k: (self._static_batch, *v[1:]) for k, v in shapes.items()}
        for name in self._in_types:
            if name not in shapes:
                raise InvalidArgument(f"input {name!r} is missing")
            self._set_shape(context, name, tuple(shapes[name]))
            # Within the profile the input fits the buffer, which was sized for its maximum.
            context.set_tensor_address(name, s.buffers[name].ptr)
        wanted = {o.name for o in self.outputs}
        outputs = {}
        for name, dtype in self._out_types.items():
            shape = tuple(context.get_tensor_shape(name))
            buf = self._fit(s, name, math.prod(shape), dtype, mapped=self._zero_copy)
            context.set_tensor_address(name, buf.ptr)
            if name in wanted:
                outputs[name] = DeviceTensor(buf.ptr, shape if rows is None else (rows, *shape[1:]), dtype)
        if wait_for is not None:
            s.stream.wait_for_event(wait_for)
        self._execute(s)
        return outputs

    def _execute(self, s: _Slot) -> None:
        shared = self._shared
        if shared is None:
            self._launch(s)
            return
        with shared.lock:  # held only while queueing: the GPU, not the host, waits for the block
            if shared.last is not None and shared.last is not s.done:
                s.stream.wait_for_event(shared.last)
            self._launch(s)
            shared.last = s.done

    def _launch(self, s: _Slot) -> None:
        s.started.record(s.stream)
        if not s.context.execute_async_v3(s.stream.handle):
            raise RuntimeError(f"TensorRT could not run engine {self.engine_id}: {' | '.join(trt_logger().errors)}")
        s.done.record(s.stream)

    def infer_ms(self, slot: int) -> float:
        """GPU milliseconds of the slot's last ``infer_device`` execution (waits for it to finish)."""
        s = self._slot(slot)
        self._ctx.push()
        try:
            s.done.synchronize()
            return float(s.started.time_till(s.done))
        finally:
            self._cuda.Context.pop()

    def close(self) -> None:
        """Free buffers, streams and execution contexts now, inside the primary context."""
        slots = list(self._slots)
        for s in slots:
            s.lock.acquire()  # waits for a batch in flight on that slot
        try:
            if self._closed:
                return
            self._closed = True
            self._ctx.push()
            try:
                try:
                    for s in slots:
                        if not self._failure:  # on a poisoned context synchronizing only raises again
                            s.stream.synchronize()  # the device path returns before its work is done
                        s.release()
                    if self._shared is not None:  # after the contexts that use it
                        self._shared.free()
                except Exception:
                    if not self._failure:
                        raise
                    # A poisoned context refuses frees too; the process restart reclaims everything.
                    log.warning("TensorRT engine %s: freeing on a failed CUDA context", self.engine_id, exc_info=True)
                self._slots = []
                self._shared = None
                self._engine = None  # contexts before engine before runtime, as TensorRT requires
                self._runtime = None
            finally:
                self._cuda.Context.pop()
        finally:
            for s in slots:
                s.lock.release()


load = TrtEngine.load
