"""Engine builds in a separate, spawned worker process.

A TensorRT build on a 4 GB Jetson can take minutes and can be killed by the OOM killer;
neither may touch serving. Each build therefore runs in a fresh process (``spawn``: no
inherited threads, CUDA context or gRPC state), reports its stages over a pipe, and is
killed on timeout or cancellation. A worker that dies by a signal fails only its build.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.errors import NoSpace, TegradError

log = logging.getLogger("tegrad.engines.worker")

STAGES = ("starting", "lowering", "parsing", "building", "serializing")


class BuildFailed(TegradError):
    """The build did not produce an engine; ``result`` is failed, timeout, killed or cancelled."""

    def __init__(self, message: str, result: str = "failed") -> None:
        super().__init__(message)
        self.result = result


class BuildNoSpace(BuildFailed, NoSpace):
    """The engine cache's file system cannot hold the build's outputs (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "no_space")

# Room beyond the estimate of an artifact's size (file system blocks and metadata).
_SLACK = 64 << 10


@dataclass(frozen=True)
class BuildJob:
    """Everything the worker needs; plain data, pickled across the spawn boundary."""

    model: str
    version: int
    backend: str
    precision: str
    source: str
    work_dir: str
    target: str = "cpu"
    calibration_cache: str | None = None
    exclude: tuple[str, ...] = ()
    exclude_precision: str = "fp16"
    max_batch: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    timing_cache: str | None = None


@dataclass
class BuildResult:
    lowered_sha256: str
    layers: dict[str, int]
    artifact: Path
    seconds: float
    peak_rss_mb: float
    cpu_seconds: float
    info: dict[str, Any]


# -- the worker process ---------------------------------------------------------------------------


def _lower(job: BuildJob, send) -> tuple[Path, str, dict[str, int]]:
    from calib.cache import CacheMismatchError, CalibrationCache, sha256_file
    from calib.graph import load, save_atomic
    from calib.lower import count_precisions, lower
    from daemon.engines.cache import room_for

    try:
        source = load(job.source)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not an ONNX model
        raise BuildFailed(f"{job.source}: cannot load the model as ONNX ({type(exc).__name__}: {exc})") from None
    amax = None
    if job.calibration_cache:
        cache = CalibrationCache.load(job.calibration_cache)
        try:
            cache.check_against(job.source)
        except CacheMismatchError as exc:
            raise BuildFailed(f"calibration cache {job.calibration_cache} does not fit {job.source}: {exc}") from None
        amax = cache.amax
    model = lower(source, job.precision, amax=amax, exclude=job.exclude,
                  exclude_precision=job.exclude_precision, target=job.target, glue=job.options.get("glue"))
    with room_for(Path(job.work_dir), model.ByteSize() + _SLACK):
        path = save_atomic(model, Path(job.work_dir) / "lowered.onnx")
    return path, sha256_file(path), count_precisions(model)


def _build(job: BuildJob, lowered: Path, send) -> tuple[Path, dict[str, Any]]:
    from daemon.engines.cache import room_for

    out = Path(job.work_dir)
    # An engine is about as large as the graph it was built from (TensorRT plans of FP16/INT8
    # graphs are smaller): refused before minutes of building rather than after.
    with room_for(out, lowered.stat().st_size + _SLACK):
        return _build_artifact(job, lowered, out, send)


def _build_artifact(job: BuildJob, lowered: Path, out: Path, send) -> tuple[Path, dict[str, Any]]:
    if job.backend == "tensorrt":
        from daemon.config import TensorRTOptions
        from daemon.engines.tensorrt import builder as trt_builder

        artifact = out / "engine.plan"
        info = trt_builder.build_engine(
            lowered, artifact, options=TensorRTOptions(**job.options), max_batch=job.max_batch,
            timing_cache_path=Path(job.timing_cache) if job.timing_cache else None,
            progress=lambda text: send("stage", text),
        )
        return artifact, info
    from daemon.engines.onnxruntime import builder as ort_builder

    artifact = out / "engine.onnx"
    send("stage", "building")
    return artifact, ort_builder.build_artifact(lowered, artifact, job.options)


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this worker when the daemon dies (Linux), so that a daemon killed
    mid-build (OOM killer, kill -9) leaves no orphan build competing with its restart for memory."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the build finishes and finds a closed pipe
        return
    if os.getppid() != parent:  # the daemon died before prctl took effect
        os._exit(1)


# Builds are what the OOM killer should take on a small board, not the server that keeps answering
# (systemd gives the daemon OOMScoreAdjust=-100, which children inherit). Raising one's own score
# needs no privilege.
WORKER_OOM_SCORE_ADJ = 500


def _be_the_oom_victim() -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(WORKER_OOM_SCORE_ADJ))
    except OSError:  # not Linux, or a read-only /proc: the build runs all the same
        pass


def _worker_main(job: BuildJob, conn, parent: int) -> None:
    _die_with_parent(parent)
    _be_the_oom_victim()
    lock = threading.Lock()

    def send(*message) -> None:
        with lock:  # TensorRT reports progress from its own threads
            conn.send(message)

    stage = "starting"
    try:
        stage = "lowering"
        send("stage", stage)
        lowered, sha, layers = _lower(job, send)
        send("lowered", sha, layers)
        stage = "building"
        artifact, info = _build(job, lowered, send)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        send("done", str(artifact), info, usage.ru_maxrss / 1024.0, usage.ru_utime + usage.ru_stime)
    except BaseException as exc:  # everything goes back to the parent as a sentence
        message = str(exc) or type(exc).__name__
        try:
            send("nospace" if isinstance(exc, NoSpace) else "error", stage, message)
        except OSError:
            pass
    finally:
        conn.close()


# -- the server side -----------------------------------------------------------------------------


class BuildPool:
    """Runs builds in worker processes, ``jobs`` at a time (default 1: builds compete for memory)."""

    def __init__(self, jobs: int = 1) -> None:
        self._slots = asyncio.Semaphore(jobs)
        self._running: dict[tuple[str, int], multiprocessing.process.BaseProcess] = {}
        self._cancelled: set[tuple[str, int]] = set()

    def running(self) -> dict[tuple[str, int], int]:
        """(model, version) → worker pid, for the builds in progress."""
        return {k: p.pid for k, p in self._running.items() if p.pid is not None}

    def cancel(self, model: str, version: int | None = None) -> int:
        killed = 0
        for (name, ver), proc in list(self._running.items()):
            if name == model and version in (None, ver) and proc.is_alive():
                self._cancelled.add((name, ver))
                proc.kill()
                killed += 1
        return killed

    async def build(self, job: BuildJob, *, timeout: float, progress: Callable[[str], None] = lambda s: None) -> BuildResult:
        what = f"model {job.model} version {job.version}"
        async with self._slots:
            return await self._run(job, timeout, progress, what)

    async def _run(self, job: BuildJob, timeout: float, progress: Callable[[str], None], what: str) -> BuildResult:
        ctx = multiprocessing.get_context("spawn")
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker_main, args=(job, writer, os.getpid()), name=f"tegrad-build:{job.model}:{job.version}", daemon=True)
        start = time.monotonic()
        proc.start()
        writer.close()
        self._running[(job.model, job.version)] = proc
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def readable() -> None:
            try:
                inbox.put_nowait(reader.recv())
            except (EOFError, OSError):
                loop.remove_reader(reader.fileno())
                inbox.put_nowait(None)

        loop.add_reader(reader.fileno(), readable)
        stage, lowered, done = "starting", None, None
        progress(f"{stage} (worker pid {proc.pid})")
        try:
            while done is None:
                remaining = start + timeout - time.monotonic()
                try:
                    message = await asyncio.wait_for(inbox.get(), max(remaining, 0.001))
                except asyncio.TimeoutError:
                    proc.kill()
                    raise BuildFailed(f"{what}: build timed out after {timeout:.0f} s in stage {stage} "
                                      "(raise build.timeout_s in config.toml if the device is slow)", "timeout") from None
                if message is None:
                    await asyncio.to_thread(proc.join, 5)
                    code = proc.exitcode
                    if (job.model, job.version) in self._cancelled:
                        raise BuildFailed(f"{what}: build cancelled during stage {stage}", "cancelled")
                    if code is not None and code < 0:
                        sig = signal.Signals(-code).name
                        hint = " (likely the out-of-memory killer)" if sig == "SIGKILL" else ""
                        raise BuildFailed(f"{what}: build worker pid {proc.pid} was killed by {sig}{hint} "
                                          f"during stage {stage}", "killed")
                    raise BuildFailed(f"{what}: build worker exited with code {code} during stage {stage} without a result")
                kind = message[0]
                if kind == "stage":
                    stage = message[1]
                    progress(f"{stage} (worker pid {proc.pid})")
                elif kind == "lowered":
                    lowered = (message[1], message[2])
                elif kind == "error":
                    raise BuildFailed(f"{what}: {message[1]} failed: {message[2]}")
                elif kind == "nospace":
                    raise BuildNoSpace(f"{what}: {message[2]} (while {message[1]})")
                elif kind == "done":
                    done = message
        except asyncio.CancelledError:
            proc.kill()
            raise
        finally:
            loop.remove_reader(reader.fileno())
            reader.close()
            self._running.pop((job.model, job.version), None)
            self._cancelled.discard((job.model, job.version))
            if proc.is_alive():
                proc.kill()
            await asyncio.to_thread(proc.join, 10)
        _, artifact, info, rss_mb, cpu_s = done
        assert lowered is not None
        seconds = time.monotonic() - start
        log.info("%s: built %s %s engine in %.1f s (worker peak RSS %.0f MB, CPU %.1f s)",
                 what, job.backend, job.precision, seconds, rss_mb, cpu_s)
        return BuildResult(lowered[0], lowered[1], Path(artifact), seconds, rss_mb, cpu_s, info)

