"""The ``tegrad.v1.Admin`` servicer: protobuf in, :class:`~daemon.rollout.controller.Rollouts` calls, protobuf out."""

from __future__ import annotations

import logging
import math
import time

from daemon.errors import InvalidArgument, TegradError
from daemon.protogen import admin_pb2 as pb
from daemon.protogen import admin_pb2_grpc as pb_grpc
from daemon.repository.state import ACTIVE, OperationRecord, RolloutVersion
from daemon.rollout.controller import Rollouts
from daemon.server.errors import abort
from daemon.telemetry import metrics

log = logging.getLogger("tegrad.admin")


def _report(d: dict | None) -> pb.ValidationReport | None:
    if not d:
        return None
    return pb.ValidationReport(
        passed=bool(d["passed"]), task=d["task"], samples=int(d["samples"]),
        scores={k: (math.nan if v is None else v) for k, v in d["scores"].items()},
        thresholds=d["thresholds"], failures=d["failures"])


def operation_pb(op: OperationRecord) -> pb.Operation:
    return pb.Operation(
        id=op.id, kind=op.kind, model=op.model, version=op.version,
        state=pb.OperationState.Value(f"OPERATION_STATE_{op.state}"), done=op.done, progress=op.progress,
        error=op.error, upload_sha256=op.upload_sha256, auto_activate=op.auto_activate,
        stage_seconds=op.stage_seconds, validation=_report(op.report), created=op.created, updated=op.updated)


def _upload_pb(state) -> pb.UploadStatus:
    return pb.UploadStatus(sha256=state.sha256, total_size=state.total_size, received=state.received,
                           complete=state.complete)


def _model(name: str) -> str:
    if not name:
        raise InvalidArgument("give the model's name")
    return name


def _version(v: int) -> int:
    if v <= 0:
        raise InvalidArgument("give the version, a positive integer")
    return v


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, rollouts: Rollouts) -> None:
        self.r = rollouts

    def _status(self, name: str) -> pb.ListModelsResponse:
        out = pb.ListModelsResponse()
        manager = self.r.manager
        for model, active, previous, versions in self.r.models(name):
            loaded = {lv.version: lv for lv in manager.loaded() if lv.name == model}
            ms = out.models.add(name=model, active_version=active, previous_version=previous)
            newest = max(loaded) if loaded else 0
            for version, rec in versions:
                serving, reason = manager.serving_state(model, version)
                vs = ms.versions.add(version=version, serving_state=serving, reason=reason)
                state = rec.state if rec else (ACTIVE if not active and version == newest else "")
                if state:
                    vs.state = pb.VersionState.Value(f"VERSION_STATE_{state}")
                if rec is not None:
                    _fill(vs, rec)
                lv = loaded.get(version)
                if lv is not None:
                    vs.precision = lv.engine.precision
                    vs.engine_id = lv.engine.engine_id
                    vs.calibration_cache_id = lv.prepared.calibration_cache_id
        return out

    def _one(self, name: str) -> pb.ModelStatus:
        return self._status(name).models[0]

    # -- uploads ---------------------------------------------------------------------------------

    async def Upload(self, request_iterator, context):
        start = time.monotonic()
        try:
            state = await self.r.uploads.receive(request_iterator)
        except TegradError as exc:
            await abort(context, exc)
        metrics.ROLLOUT_STAGE_DURATION.labels("upload").observe(time.monotonic() - start)
        return _upload_pb(state)

    async def GetUpload(self, request, context):
        try:
            state = self.r.uploads.state(request.sha256)
        except TegradError as exc:
            await abort(context, exc)
        return _upload_pb(state)

    async def CheckBundle(self, request, context):
        try:
            received, limit = self.r.check_bundle(request.model, request.version, request.total_size,
                                                  request.sha256)
        except TegradError as exc:
            await abort(context, exc)
        return pb.CheckBundleResponse(received=received, max_bundle_bytes=limit)

    # -- operations ------------------------------------------------------------------------------

    async def Stage(self, request, context):
        try:
            op = self.r.stage(request.upload_sha256, request.auto_activate or None)
        except TegradError as exc:
            await abort(context, exc)
        return operation_pb(op)

    async def GetOperation(self, request, context):
        try:
            return operation_pb(self.r.board.get(request.id))
        except TegradError as exc:
            await abort(context, exc)

    async def ListOperations(self, request, context):
        return pb.ListOperationsResponse(operations=[operation_pb(op) for op in self.r.board.list(request.model)])

    async def WatchOperations(self, request, context):
        try:
            self.r.board.get(request.id) if request.id else None
        except TegradError as exc:
            await abort(context, exc)
        async for op in self.r.board.watch(request.id, request.model):
            yield operation_pb(op)

    # -- versions --------------------------------------------------------------------------------

    async def Activate(self, request, context):
        try:
            await self.r.activate(_model(request.model), _version(request.version))
            return self._one(request.model)
        except TegradError as exc:
            await abort(context, exc)

    async def Rollback(self, request, context):
        try:
            await self.r.rollback(_model(request.model))
            return self._one(request.model)
        except TegradError as exc:
            await abort(context, exc)

    async def ListModels(self, request, context):
        try:
            return self._status(request.model)
        except TegradError as exc:
            await abort(context, exc)

    async def DeleteVersion(self, request, context):
        try:
            await self.r.delete(_model(request.model), _version(request.version))
            return self._one(request.model)
        except TegradError as exc:
            await abort(context, exc)


def _fill(vs: pb.VersionStatus, rec: RolloutVersion) -> None:
    vs.reason = rec.reason or vs.reason
    vs.precision = rec.precision
    vs.engine_id = rec.engine_key[:16]
    vs.calibration_cache_id = rec.calibration_cache_id
    vs.signer = rec.signer
    vs.bundle_sha256 = rec.bundle_sha256
    vs.staged = rec.staged
    vs.activated = rec.activated
    report = _report(rec.report)
    if report is not None:
        vs.validation.CopyFrom(report)
