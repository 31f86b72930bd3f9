"""Engine builds in spawned worker processes: results, refusals, SIGKILL, timeout, cancellation."""

from __future__ import annotations

import asyncio
import os
import signal

import onnx
import pytest

from daemon.engines.worker import BuildFailed, BuildJob, BuildPool
from tests import onnx_models


def _job(digits_dir, tmp_path, **kw) -> BuildJob:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    base = dict(model="digits", version=1, backend="onnxruntime", precision="fp32",
                source=str(digits_dir / "1" / "model.onnx"), work_dir=str(work), target="cpu",
                options={"graph_optimization": "all", "providers": ["CPUExecutionProvider"]})
    return BuildJob(**{**base, **kw})


def test_int8_build_lowers_and_optimizes_in_a_worker(digits_dir, tmp_path):
    stages: list[str] = []
    job = _job(digits_dir, tmp_path, precision="int8", calibration_cache=str(digits_dir / "calib.json"))
    result = asyncio.run(BuildPool().build(job, timeout=120, progress=stages.append))
    assert result.artifact.is_file() and result.artifact.parent == tmp_path / "work"
    assert result.layers == {"int8": 5, "fp16": 0, "fp32": 0}
    ops = {n.op_type for n in onnx.load(str(result.artifact)).graph.node}
    assert "QLinearConv" in ops, "ONNX Runtime fused the U8 Q/DQ pairs at build time, so a warm start need not"
    assert [s.split(" (")[0] for s in stages] == ["starting", "lowering", "building"]
    assert all("worker pid" in s for s in stages)
    assert result.peak_rss_mb > 10 and len(result.lowered_sha256) == 64


def test_calibration_cache_of_another_model_is_refused(digits_dir, tmp_path):
    other = onnx_models.scale(tmp_path / "other.onnx", 2.0)
    job = _job(digits_dir, tmp_path, source=str(other), precision="int8", calibration_cache=str(digits_dir / "calib.json"))
    with pytest.raises(BuildFailed) as info:
        asyncio.run(BuildPool().build(job, timeout=120))
    assert info.value.result == "failed"
    assert "lowering failed" in str(info.value) and "recalibrate" in str(info.value)


def test_worker_killed_by_sigkill_fails_only_its_build(digits_dir, tmp_path):
    pool = BuildPool()

    async def run():
        task = asyncio.ensure_future(pool.build(_job(digits_dir, tmp_path), timeout=120))
        while not pool.running():
            await asyncio.sleep(0.01)
        [pid] = pool.running().values()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(BuildFailed) as info:
            await task
        # The pool still works after a killed worker.
        ok = await pool.build(_job(digits_dir, tmp_path, version=2), timeout=120)
        return info.value, ok

    err, ok = asyncio.run(run())
    assert err.result == "killed" and "SIGKILL" in str(err) and "out-of-memory" in str(err)
    assert ok.artifact.is_file()


def test_timeout_kills_the_worker(digits_dir, tmp_path):
    with pytest.raises(BuildFailed) as info:
        asyncio.run(BuildPool().build(_job(digits_dir, tmp_path), timeout=0.2))
    assert info.value.result == "timeout" and "timed out after" in str(info.value) and "build.timeout_s" in str(info.value)


def test_cancel_and_task_cancellation_stop_the_worker(digits_dir, tmp_path):
    pool = BuildPool()

    async def run():
        task = asyncio.ensure_future(pool.build(_job(digits_dir, tmp_path), timeout=120))
        while not pool.running():
            await asyncio.sleep(0.01)
        assert pool.cancel("digits") == 1
        with pytest.raises(BuildFailed) as info:
            await task
        task = asyncio.ensure_future(pool.build(_job(digits_dir, tmp_path), timeout=120))
        while not pool.running():
            await asyncio.sleep(0.01)
        [pid] = pool.running().values()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return info.value, pid

    err, pid = asyncio.run(run())
    assert err.result == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.skipif(not os.path.exists("/proc/self/oom_score_adj"), reason="needs Linux /proc/<pid>/oom_score_adj")
def test_the_worker_not_the_daemon_is_the_oom_killers_choice(digits_dir, tmp_path):
    from daemon.engines.worker import WORKER_OOM_SCORE_ADJ

    pool = BuildPool()
    seen: list[int] = []

    def progress(stage: str) -> None:
        if stage.startswith("lowering"):  # the worker is alive and past its start-up
            [pid] = pool.running().values()
            with open(f"/proc/{pid}/oom_score_adj") as f:
                seen.append(int(f.read()))

    job = _job(digits_dir, tmp_path, precision="int8", calibration_cache=str(digits_dir / "calib.json"))
    asyncio.run(pool.build(job, timeout=120, progress=progress))
    with open("/proc/self/oom_score_adj") as f:
        own = int(f.read())
    assert seen == [WORKER_OOM_SCORE_ADJ] and own < WORKER_OOM_SCORE_ADJ
