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
from daemon.repository.manager import LoadedVersion, ModelManager
from daemon.server import tensors, triton_config
from daemon.server.errors import abort, outcome_of, status_of
from daemon.server.shared_memory import NO_REGIONS, SharedMemoryRegistry

log = logging.getLogger("tegrad.server")

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


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: ModelManager, lifecycle, shared_memory: SharedMemoryRegistry | None = None) -> None:
        self.models = models
        self.lifecycle = lifecycle
        self.shared_memory = shared_memory or SharedMemoryRegistry(enabled=False)
        self.extensions = EXTENSIONS + (["system_shared_memory"] if self.shared_memory.enabled else [])

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
            raise NotFound(f"repository {name!r} is unknown; this server serves {self.models.root}")

    # -- inference --------------------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        if self.lifecycle.draining:
            raise Unavailable("tegrad is shutting down and accepts no new requests; retry on another instance")
        with self.lifecycle.working():
            return await self._infer_admitted(request, context)

    async def _infer_admitted(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        start = time.perf_counter_ns()
        lv = self.models.resolve(request.model_name, request.model_version)
        lv.acquire()
        lv.stats.inflight.inc()
        regions = NO_REGIONS
        try:
            regions = self.shared_memory.attach(request)
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

    async def ModelInfer(self, request, context):
        try:
            return await self._infer(request, context)
        except Exception as exc:
            await abort(context, exc)

    async def ModelStreamInfer(self, request_iterator, context):
        # Requests in one stream run concurrently; responses carry the request id so
        # clients match them, as with Triton.
        results: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()

        async def one(request):
            try:
                results.put_nowait(pb.ModelStreamInferResponse(infer_response=await self._infer(request, None)))
            except Exception as exc:
                _, message = status_of(exc)
                results.put_nowait(pb.ModelStreamInferResponse(
                    error_message=message, infer_response=pb.ModelInferResponse(id=request.id, model_name=request.model_name)))

        async def reader():
            async for request in request_iterator:
                task = asyncio.ensure_future(one(request))
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
