"""A client of the admin API (``tegrad.v1.Admin``), used by ``tegrad push`` and ``tegrad rollout``.

:meth:`AdminClient.upload` sends a bundle in chunks and, when the connection
breaks or the device restarts, asks the device how much it holds and continues
from there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from calib.cache import sha256_file
from daemon.protogen import admin_pb2 as pb
from daemon.protogen import admin_pb2_grpc as pb_grpc
from daemon.state_dir import default_state_dir

log = logging.getLogger("tegrad.push")

CHUNK = 1 << 20
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL)


def default_address(state_dir: Path | None = None) -> str:
    """The admin socket of the daemon whose ``--state-dir`` is ``state_dir`` (default: the same default)."""
    return f"unix:{(state_dir or default_state_dir()) / 'admin.sock'}"


class AdminClient:
    def __init__(self, address: str | None = None, *, ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None) -> None:
        self.address = address or default_address()
        options = [("grpc.max_send_message_length", 16 << 20)]
        if ca or cert or key:
            from daemon.server import tls

            if not (ca and cert and key):
                raise ValueError("TLS needs --tls-ca, --tls-cert and --tls-key together")
            self.channel = grpc.secure_channel(self.address, tls.channel_credentials(ca, cert, key), options)
        else:
            self.channel = grpc.insecure_channel(self.address, options)
        self.stub = pb_grpc.AdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- upload -----------------------------------------------------------------------------------

    def upload_status(self, sha: str) -> pb.UploadStatus | None:
        try:
            return self.stub.GetUpload(pb.GetUploadRequest(sha256=sha), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def upload(self, path: Path, *, chunk: int = CHUNK, retries: int = 5, stop_after: int | None = None,
               progress: Callable[[int, int], None] = lambda sent, total: None) -> pb.UploadStatus:
        """Send ``path``; resume after broken connections (up to ``retries`` times in a row).

        ``stop_after``: give up after sending this many bytes in this call (tests of resumption).
        """
        path = Path(path)
        sha, total = sha256_file(path), path.stat().st_size
        failures = 0
        while True:
            status = self.upload_status(sha)
            offset = status.received if status is not None else 0
            if status is not None and status.complete:
                return status
            try:
                return self.stub.Upload(_chunks(path, sha, total, offset, chunk, stop_after, progress), timeout=3600)
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE or failures >= retries or stop_after is not None:
                    raise
                failures += 1
                log.warning("upload interrupted (%s: %s); resuming (%d/%d)", exc.code().name, exc.details(),
                            failures, retries)
                time.sleep(min(2.0 ** failures, 30.0))
                self.wait_ready(60)

    def check_bundle(self, model: str, version: int, total: int, sha: str) -> pb.CheckBundleResponse | None:
        """The device's pre-flight answer for a bundle; None from a tegrad too old to have it."""
        try:
            return self.stub.CheckBundle(pb.CheckBundleRequest(model=model, version=version, total_size=total,
                                                               sha256=sha), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            raise

    def wait_ready(self, timeout: float) -> None:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            pass

    # -- operations and versions -----------------------------------------------------------------

    def stage(self, sha: str, auto_activate: bool = False) -> pb.Operation:
        return self.stub.Stage(pb.StageRequest(upload_sha256=sha, auto_activate=auto_activate), timeout=60)

    def watch(self, op_id: str = "", model: str = "") -> Iterator[pb.Operation]:
        yield from self.stub.WatchOperations(pb.WatchOperationsRequest(id=op_id, model=model))

    def wait(self, op_id: str, on_change: Callable[[pb.Operation], None] = lambda op: None) -> pb.Operation:
        last = None
        for op in self.watch(op_id):
            on_change(op)
            last = op
        assert last is not None
        return last

    def operations(self, model: str = "") -> list[pb.Operation]:
        return list(self.stub.ListOperations(pb.ListOperationsRequest(model=model), timeout=30).operations)

    def activate(self, model: str, version: int) -> pb.ModelStatus:
        return self.stub.Activate(pb.ActivateRequest(model=model, version=version), timeout=3600)

    def rollback(self, model: str) -> pb.ModelStatus:
        return self.stub.Rollback(pb.RollbackRequest(model=model), timeout=3600)

    def delete(self, model: str, version: int) -> pb.ModelStatus:
        return self.stub.DeleteVersion(pb.DeleteVersionRequest(model=model, version=version), timeout=60)

    def models(self, model: str = "") -> list[pb.ModelStatus]:
        return list(self.stub.ListModels(pb.ListModelsRequest(model=model), timeout=30).models)


def _chunks(path: Path, sha: str, total: int, offset: int, size: int, stop_after: int | None,
            progress: Callable[[int, int], None]) -> Iterator[pb.UploadChunk]:
    sent = 0
    with open(path, "rb") as f:
        f.seek(offset)
        first = True
        while True:
            data = f.read(size)
            if not data and not first:
                return
            if stop_after is not None and sent >= stop_after:
                return
            yield pb.UploadChunk(sha256=sha if first else "", total_size=total if first else 0, offset=offset, data=data)
            first = False
            offset += len(data)
            sent += len(data)
            progress(offset, total)
            if not data:
                return


def state_name(value: int, enum=pb.OperationState) -> str:
    prefix = "OPERATION_STATE_" if enum is pb.OperationState else "VERSION_STATE_"
    name = enum.Name(value).removeprefix(prefix)
    return "" if name == "UNSPECIFIED" else name
