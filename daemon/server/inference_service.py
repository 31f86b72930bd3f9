"""KServe v2 ``inference.GRPCInferenceService`` on grpc.aio."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc

from daemon import __version__
from daemon.errors import InvalidArgument, NotFound, TegradError, Unavailable, Unimplemented
from daemon.pipeline.processed import ProcessedEngine
from daemon.protogen import grpc_service_pb2 as pb
from daemon.protogen import grpc_service_pb2_grpc as pb_grpc
from daemon.repository import names
from daemon.repository.manager import LoadedVersion, ModelManager
from daemon.server import tensors, triton_config, wire
from daemon.server.admission import RequestBytesBudget
from daemon.server.errors import abort, outcome_of, release_frames, status_of
from daemon.server.ratelimit import RateLimitedLog, source_of
from daemon.server.shared_memory import NO_REGIONS, SharedMemoryRegistry
from daemon.telemetry import metrics

log = logging.getLogger("tegrad.server")

_ECHOED_ID_BYTES = 4096  # of an unreadable stream request's id, echoed with its error

# What tegrad supports of Triton's protocol extensions, and nothing more.
EXTENSIONS = ["classification", "model_repository", "model_configuration", "statistics", "parameters"]


def _deadline_ns(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext | None, default_us: int) -> int | None:
    """Earliest of the gRPC deadline and the request's ``timeout`` parameter (microseconds)."""
    now = time.perf_counter_ns()
    deadlines = []
    remaining = context.time_remaining() if context is not None else None
    if remaining is not None:
        deadlines.append(now + int(remaining * 1e9))
    param = request.parameters.get("timeout")
    timeout_us = 0
    if param is not None:
        which = param.WhichOneof("parameter_choice")
        if which not in ("int64_param", "uint64_param"):
            raise InvalidArgument("parameter 'timeout' must be an integer number of microseconds")
        timeout_us = getattr(param, which)
        if timeout_us < 0:
            raise InvalidArgument("parameter 'timeout' must not be negative")
    timeout_us = timeout_us or default_us
    if timeout_us:
        deadlines.append(now + timeout_us * 1000)
    return min(deadlines) if deadlines else None


def _batch_size(lv: LoadedVersion, inputs: dict) -> None:
    if not lv.batched:
        return
    sizes = {name: int(a.shape[0]) for name, a in inputs.items()}
    distinct = set(sizes.values())
    if len(distinct) > 1:
        raise InvalidArgument(f"model {lv.name}: inputs disagree on the batch size (first dimension): {sizes}")
    size = distinct.pop() if distinct else 0
    if not 1 <= size <= lv.config.max_batch:
        raise InvalidArgument(f"model {lv.name}: batch size {size} is outside 1..{lv.config.max_batch} (max_batch)")


_REFUSED_BEFORE_PARSE = {
    ("admission", grpc.StatusCode.RESOURCE_EXHAUSTED): "queue_full",
    ("admission", grpc.StatusCode.UNAVAILABLE): "unloading",
    ("budget", grpc.StatusCode.RESOURCE_EXHAUSTED): "inflight_bytes",
}


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer and ModelStreamInfer take the serialized request (see ``binding``);
    the other methods take parsed messages."""

    def __init__(self, models: ModelManager, lifecycle, inflight_bytes: RequestBytesBudget | None = None,
                 shared_memory: SharedMemoryRegistry | None = None) -> None:
        self.models = models
        self.lifecycle = lifecycle
        self.inflight_bytes = inflight_bytes or RequestBytesBudget(1 << 30)
        self.client_errors = RateLimitedLog(log)
        self.shared_memory = shared_memory or SharedMemoryRegistry(enabled=False)
        self.extensions = EXTENSIONS + (["system_shared_memory"] if self.shared_memory.enabled else [])

    def unparsable(self, context, exc: InvalidArgument) -> None:
        """A request that is not a protobuf message: one WARNING per client host and minute."""
        peer = context.peer() if context is not None else None
        self.client_errors.warning(source_of(peer), "refused a request from %s: %s", peer or "?", exc)

    # -- health and metadata --------------------------------------------------------------------

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.lifecycle.ready())

    async def ModelReady(self, request, context):
        try:
            self.models.resolve(request.name, request.version)
        except TegradError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.lifecycle.draining)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="tegrad", version=__version__, extensions=self.extensions)

    async def ModelMetadata(self, request, context):
        try:
            lv = self.models.resolve(request.name, request.version)
            return triton_config.metadata(lv, self.models.versions(request.name))
        except Exception as exc:
            await abort(context, exc)

    async def ModelConfig(self, request, context):
        try:
            lv = self.models.resolve(request.name, request.version)
            return pb.ModelConfigResponse(config=triton_config.model_config(lv))
        except Exception as exc:
            await abort(context, exc)

    async def ModelStatistics(self, request, context):
        try:
            if request.name:
                self.models.resolve(request.name, request.version)
            chosen = [
                lv for lv in self.models.loaded()
                if (not request.name or lv.name == request.name) and (not request.version or str(lv.version) == request.version)
            ]
            return pb.ModelStatisticsResponse(model_stats=[_statistics(lv) for lv in sorted(chosen, key=lambda v: (v.name, v.version))])
        except Exception as exc:
            await abort(context, exc)

    # -- repository -------------------------------------------------------------------------------

    async def RepositoryIndex(self, request, context):
        rows = self.models.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=s, reason=r) for n, v, s, r in rows]
        )

    async def RepositoryModelLoad(self, request, context):
        try:
            if request.parameters:
                raise InvalidArgument(
                    f"load parameters {sorted(request.parameters)} are not supported: edit config.toml in the repository instead"
                )
            self._check_repository(request.repository_name)
            self.models.check_control()
            with self.lifecycle.working():
                await self.models.load(request.model_name)
            return pb.RepositoryModelLoadResponse()
        except Exception as exc:
            await abort(context, exc)

    async def RepositoryModelUnload(self, request, context):
        try:
            self._check_repository(request.repository_name)
            self.models.check_control()
            with self.lifecycle.working():
                await self.models.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()
        except Exception as exc:
            await abort(context, exc)

    def _check_repository(self, name: str) -> None:
        if name and name not in (self.models.root.name, str(self.models.root)):
            raise NotFound(f"repository {name!r} is unknown; this server serves the repository {self.models.root.name!r}")

    # -- inference --------------------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest, context, lv: LoadedVersion) -> pb.ModelInferResponse:
        if self.lifecycle.draining:  # again: it may have begun while the request waited for the byte budget
            raise Unavailable("tegrad is shutting down and accepts no new requests; retry on another instance")
        with self.lifecycle.working():
            return await self._infer_admitted(request, context, lv)

    async def _infer_bytes(self, data: bytes, context, unary: bool) -> pb.ModelInferResponse:
        """Admission on the raw bytes (model name, queue), then the full parse within the
        daemon's byte budget, then inference. Refusals before the parse cost microseconds.
        A unary call's deadline applies to its request; a stream's does not to each message."""
        timeout_s = context.time_remaining() if unary else None
        start = time.perf_counter_ns()
        lv: LoadedVersion | None = None
        stage = "admission"
        try:
            if self.lifecycle.draining:
                raise Unavailable("tegrad is shutting down and accepts no new requests; retry on another instance")
            head = wire.peek(data)
            if head is not None:
                try:
                    version = bytes(head.model_version[:names.MAX_BYTES]).decode("utf-8", "replace")
                    lv = self.models.resolve(names.check(head.model_name), version)
                except TegradError:
                    pass  # the full parse comes first: unparsable bytes are told so, not "unknown model"
                if lv is not None:
                    lv.scheduler.check_admission()
            stage = "budget"
            async with self.inflight_bytes.hold(len(data), timeout_s):
                stage = "parse"
                try:
                    request = wire.parse(pb.ModelInferRequest, data)
                except InvalidArgument as exc:
                    self.unparsable(context, exc)
                    raise
                lv = None  # the parsed names decide now, not what the scan read
                lv = self.models.resolve(names.check(request.model_name), request.model_version)
                stage = "run"  # from here _infer_admitted counts the outcome
                return await self._infer(request, context if unary else None, lv)
        except Exception as exc:
            if stage != "run":
                code, _ = status_of(exc)
                if lv is None:
                    metrics.count_unattributed_request(outcome_of(code))
                else:
                    lv.stats.request_failed(outcome_of(code), time.perf_counter_ns() - start)
                    reason = _REFUSED_BEFORE_PARSE.get((stage, code))
                    if reason:
                        metrics.ADMISSION_REJECTIONS.labels(lv.name, str(lv.version), reason).inc()
            raise

    async def _infer_admitted(self, request: pb.ModelInferRequest, context, lv: LoadedVersion) -> pb.ModelInferResponse:
        """Run ``request`` on ``lv``, the version resolved from its parsed names (pinned from here on)."""
        start = time.perf_counter_ns()
        lv.acquire()
        lv.stats.inflight.inc()
        regions = NO_REGIONS
        try:
            # Raw frames for an integrated GPU stay in their region: the kernel reads them in place.
            regions = self.shared_memory.attach(request, in_place=getattr(lv.engine, "in_place_inputs", ()))
            inputs = tensors.decode_inputs(request, lv.inputs, regions.inputs)
            if isinstance(lv.engine, ProcessedEngine):
                inputs = await lv.engine.admit(inputs)
            _batch_size(lv, inputs)
            wanted = tensors.requested_outputs(request, lv.outputs)
            deadline = _deadline_ns(request, context, lv.config.dynamic_batching.default_timeout_us)
            decoded = time.perf_counter_ns()
            outputs, timing = await lv.scheduler.infer(inputs, deadline)
            encode_start = time.perf_counter_ns()
            response = pb.ModelInferResponse(model_name=lv.name, model_version=str(lv.version), id=request.id)
            tensors.encode_response(response, wanted, outputs, lv.batched, regions.outputs)
            end = time.perf_counter_ns()
            batch = int(next(iter(inputs.values())).shape[0]) if lv.batched else 1
            lv.stats.request_done(
                batch_size=batch,
                queue_ns=timing.queue_ns,
                input_ns=timing.input_ns + (decoded - start),
                infer_ns=timing.infer_ns,
                output_ns=timing.output_ns + (end - encode_start),
                total_ns=end - start,
            )
            return response
        except BaseException as exc:
            code, _ = status_of(exc) if isinstance(exc, Exception) else (grpc.StatusCode.CANCELLED, "")
            lv.stats.request_failed(outcome_of(code), time.perf_counter_ns() - start)
            raise
        finally:
            regions.release()
            lv.stats.inflight.dec()
            lv.release()

    async def ModelInfer(self, data: bytes, context):
        try:
            return await self._infer_bytes(data, context, unary=True)
        except Exception as exc:
            del data  # this frame outlives the call in grpc's reference to the exception (see release_frames)
            await abort(context, exc)

    async def ModelStreamInfer(self, request_iterator, context):
        # Requests in one stream run concurrently; responses carry the request id so
        # clients match them, as with Triton. A request that fails, even one that is
        # not a message at all, is answered with error_message and the stream goes on.
        results: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()

        async def one(data: bytes):
            try:
                results.put_nowait(pb.ModelStreamInferResponse(infer_response=await self._infer_bytes(data, context, unary=False)))
            except Exception as exc:
                _, message = status_of(exc)
                release_frames(exc)
                echo = pb.ModelInferResponse()
                head = wire.peek(data)
                if head is not None:  # what the client can match the error with, if it is readable
                    echo.id = bytes(head.id[:_ECHOED_ID_BYTES]).decode("utf-8", "replace")
                    echo.model_name = bytes(head.model_name[:names.MAX_BYTES]).decode("utf-8", "replace")
                results.put_nowait(pb.ModelStreamInferResponse(error_message=message, infer_response=echo))

        async def reader():
            async for data in request_iterator:
                task = asyncio.ensure_future(one(data))
                pending.add(task)
                task.add_done_callback(pending.discard)
            while pending:
                await asyncio.wait(set(pending))
            results.put_nowait(None)

        read_task = asyncio.ensure_future(reader())
        try:
            while True:
                item = await results.get()
                if item is None:
                    break
                yield item
        finally:
            read_task.cancel()
            for task in pending:
                task.cancel()

    # -- system shared memory (Triton's extension; daemon/server/shared_memory.py) ---------------------

    async def SystemSharedMemoryStatus(self, request, context):
        try:
            regions = self.shared_memory.status(request.name)
            Status = pb.SystemSharedMemoryStatusResponse.RegionStatus
            return pb.SystemSharedMemoryStatusResponse(regions={
                r.name: Status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size) for r in regions
            })
        except Exception as exc:
            await abort(context, exc)

    async def SystemSharedMemoryRegister(self, request, context):
        try:
            region = self.shared_memory.register(request.name, request.key, request.offset, request.byte_size)
            log.info("shared memory region %r registered: key %s, bytes %d..%d", region.name, region.key,
                     region.offset, region.offset + region.byte_size)
            return pb.SystemSharedMemoryRegisterResponse()
        except Exception as exc:
            await abort(context, exc)

    async def SystemSharedMemoryUnregister(self, request, context):
        try:
            self.shared_memory.unregister(request.name)
            return pb.SystemSharedMemoryUnregisterResponse()
        except Exception as exc:
            await abort(context, exc)

    async def _no_cuda_shared_memory(self, context):
        if os.path.exists("/etc/nv_tegra_release"):
            why = "a Jetson (Tegra) has no CUDA IPC, so there is no CUDA shared memory to map"
        else:
            why = ("tegrad opens no CUDA IPC handles; on a discrete GPU system shared memory costs one "
                   "host-to-device copy per tensor")
        await abort(context, Unimplemented(
            f"tegrad does not support CUDA shared memory: {why}; register system shared memory instead "
            "(SystemSharedMemoryRegister, with tegrad serve --allow-shared-memory)"))

    async def CudaSharedMemoryStatus(self, request, context):
        await self._no_cuda_shared_memory(context)

    async def CudaSharedMemoryRegister(self, request, context):
        await self._no_cuda_shared_memory(context)

    async def CudaSharedMemoryUnregister(self, request, context):
        await self._no_cuda_shared_memory(context)

    # -- not offered ---------------------------------------------------------------------------------

    async def TraceSetting(self, request, context):
        await abort(context, Unimplemented("tegrad does not support trace settings; use the Prometheus metrics on the metrics port"))

    async def LogSettings(self, request, context):
        await abort(context, Unimplemented("tegrad does not support log settings over gRPC; use --log-level"))


def _duration(d) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def _statistics(lv: LoadedVersion) -> pb.ModelStatistics:
    s = lv.stats
    with s.lock:
        return pb.ModelStatistics(
            name=lv.name,
            version=str(lv.version),
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
            inference_stats=pb.InferStatistics(
                success=_duration(s.success),
                fail=_duration(s.fail),
                queue=_duration(s.queue),
                compute_input=_duration(s.compute_input),
                compute_infer=_duration(s.compute_infer),
                compute_output=_duration(s.compute_output),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=_duration(b.compute_input),
                    compute_infer=_duration(b.compute_infer),
                    compute_output=_duration(b.compute_output),
                )
                for size, b in sorted(s.batches.items())
            ],
        )
