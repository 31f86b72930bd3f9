"""Bundle uploads: chunks written to disk as they arrive, resumable after a broken connection or a restart.

An upload is named by the sha256 its sender expects. Its bytes go to
``<dir>/<sha256>.part``; the size of that file is the offset where the next
chunk must start (whatever ``write`` returned before a kill -9 is in the file,
and a torn last chunk is caught by the final hash). When every byte is there,
the file is hashed; a match is fsynced and renamed to ``<sha256>.tegrad``, a
mismatch is deleted. The expected total size is kept in ``<sha256>.json``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from calib.cache import atomic_write_text, sha256_file
from calib.files import fsync_dir
from daemon import crashpoints
from daemon.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger("tegrad.rollout")

_SHA = re.compile(r"^[0-9a-f]{64}$")
_STALE_S = 7 * 24 * 3600


@dataclass(frozen=True)
class UploadState:
    sha256: str
    total_size: int
    received: int
    complete: bool


class Uploads:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._busy: set[str] = set()
        self._expire()

    def _expire(self) -> None:
        """Forget uploads (partial or complete but never staged successfully) untouched for a week."""
        cutoff = time.time() - _STALE_S
        for path in self.dir.iterdir():
            # A partial upload's .json is written once; its .part says when it was last resumed.
            newest = [path, self.dir / f"{path.stem}.part"] if path.suffix == ".json" else [path]
            try:
                if path.is_file() and max(p.stat().st_mtime for p in newest if p.exists()) < cutoff:
                    log.info("upload file %s: untouched for a week; deleting it", path.name)
                    path.unlink()
            except OSError:
                pass

    # -- paths ------------------------------------------------------------------------------------

    def bundle_path(self, sha: str) -> Path:
        """The complete bundle of upload ``sha``; NOT_FOUND / FAILED_PRECONDITION otherwise."""
        state = self.state(sha)
        if not state.complete:
            raise FailedPrecondition(f"upload {sha[:16]}… holds {state.received} of {state.total_size} bytes; "
                                     f"finish it (resume from offset {state.received}) before staging")
        return self.dir / f"{sha}.tegrad"

    def state(self, sha: str) -> UploadState:
        sha = _check_sha(sha)
        done = self.dir / f"{sha}.tegrad"
        if done.exists():
            size = done.stat().st_size
            return UploadState(sha, size, size, True)
        try:
            total = int(json.loads((self.dir / f"{sha}.json").read_text())["total_size"])
            received = (self.dir / f"{sha}.part").stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            raise NotFound(f"no upload {sha[:16]}… on this device; start it at offset 0") from None
        return UploadState(sha, total, received, False)

    def adopt(self, path: Path) -> str:
        """Take a complete bundle file that arrived another way (the drop-box) as an upload; its sha256."""
        sha = sha256_file(path)
        final = self.dir / f"{sha}.tegrad"
        if final.exists():
            path.unlink()
        else:
            os.replace(path, final)  # same file system: the drop-box claims files into our directory first
            fsync_dir(self.dir)
        return sha

    def discard(self, sha: str) -> None:
        for suffix in (".tegrad", ".part", ".json"):
            (self.dir / f"{sha}{suffix}").unlink(missing_ok=True)

    # -- receiving --------------------------------------------------------------------------------

    async def receive(self, chunks) -> UploadState:
        """Write an Upload stream (``tegrad.v1.UploadChunk`` messages) to disk."""
        chunks = chunks.__aiter__()
        first = await _next(chunks)
        if first is None:
            raise InvalidArgument("an upload needs at least one message, naming the bundle's sha256 and total_size")
        sha = _check_sha(first.sha256)
        total = int(first.total_size)
        if total <= 0:
            raise InvalidArgument("total_size must be the bundle's size in bytes (> 0)")
        if total > self.max_bytes:
            raise ResourceExhausted(f"bundle of {total} bytes is over this device's limit of {self.max_bytes} bytes")
        if sha in self._busy:
            raise FailedPrecondition(f"upload {sha[:16]}… is already being received on another stream")
        self._busy.add(sha)
        try:
            return await self._receive(sha, total, first, chunks)
        finally:
            self._busy.discard(sha)

    async def _receive(self, sha: str, total: int, first, chunks) -> UploadState:
        if (self.dir / f"{sha}.tegrad").exists():
            return self.state(sha)  # already here: nothing to send
        meta = self.dir / f"{sha}.json"
        part = self.dir / f"{sha}.part"
        try:
            known = int(json.loads(meta.read_text())["total_size"])
        except (OSError, ValueError, KeyError, TypeError):
            known = None
        if known is not None and known != total:
            raise InvalidArgument(f"upload {sha[:16]}… was started with total_size {known}, not {total}")
        if known is None:
            part.unlink(missing_ok=True)
            await asyncio.to_thread(atomic_write_text, meta, json.dumps({"total_size": total}))
        with open(part, "ab") as f:
            chunk = first
            while chunk is not None:
                if chunk.sha256 and chunk.sha256 != sha:
                    raise InvalidArgument("every message of one upload must name the same sha256 (or none)")
                held = f.tell()
                if chunk.offset != held:
                    raise FailedPrecondition(f"upload {sha[:16]}… holds {held} bytes: resume from offset {held}, "
                                             f"not {chunk.offset}")
                if held + len(chunk.data) > total:
                    raise InvalidArgument(f"chunk at offset {held} of {len(chunk.data)} bytes goes past total_size {total}")
                if chunk.data:
                    await asyncio.to_thread(_write, f, chunk.data)
                    crashpoints.reached("upload")
                chunk = await _next(chunks)
            received = f.tell()
        if received < total:
            return UploadState(sha, total, received, False)
        got = await asyncio.to_thread(sha256_file, part)
        if got != sha:
            self.discard(sha)
            raise InvalidArgument(f"the {total} bytes received hash to {got[:16]}…, not the expected {sha[:16]}…; "
                                  "the upload was deleted, send it again from offset 0")
        await asyncio.to_thread(_finish, part, self.dir / f"{sha}.tegrad")
        meta.unlink(missing_ok=True)
        log.info("upload %s… complete: %d bytes", sha[:16], total)
        return UploadState(sha, total, total, True)


def _check_sha(sha: str) -> str:
    if not _SHA.fullmatch(sha or ""):
        raise InvalidArgument(f"upload names must be a bundle's sha256 in 64 lowercase hex digits, not {sha!r}")
    return sha


async def _next(chunks):
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


def _write(f, data: bytes) -> None:
    f.write(data)
    f.flush()


def _finish(part: Path, final: Path) -> None:
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, final)
    fsync_dir(final.parent)
