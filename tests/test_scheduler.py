"""Scheduler behaviour with a real ONNX Runtime engine on a tiny model."""

import asyncio
import time

import numpy as np
import pytest

from daemon.config import parse_model_config
from daemon.engines.onnxruntime import builder, runner
from daemon.errors import DeadlineExceeded, ResourceExhausted
from daemon.pipeline.scheduler import Scheduler, SchedulerOptions
from daemon.telemetry.stats import VersionStats
from tests import onnx_models


def _engine(tmp_path, factory, text):
    path = factory(tmp_path / "m" / "1" / "model.onnx")
    cfg = parse_model_config(text, tmp_path / "m" / "config.toml", "m")
    return runner.load(path, cfg, path.parent.parent, engine_id="test")


def test_dynamic_batching_merges_and_splits(tmp_path):
    engine = _engine(tmp_path, lambda p: onnx_models.scale(p, 3.0), "max_batch = 8\n[onnxruntime]\nintra_op_threads = 1")

    async def run():
        stats = VersionStats("m", "1")
        sched = Scheduler(engine, SchedulerOptions(max_batch=8, max_queue_delay_us=50_000, inline_below_us=0), stats, "m/1")
        xs = [np.full((1, 4), i, np.float32) for i in range(6)]
        results = await asyncio.gather(*(sched.infer({"x": x}, None) for x in xs))
        await sched.drain(5)
        return xs, results, stats

    xs, results, stats = asyncio.run(run())
    for x, (out, _timing) in zip(xs, results):
        np.testing.assert_array_equal(out["y"], x * 3)
    assert max(stats.batches) == 6, "six concurrent requests ran as one batch"
    assert stats.execution_count == 1


def test_deadline_passed_in_queue_is_not_executed(tmp_path):
    engine = _engine(tmp_path, lambda p: onnx_models.slow(p, loops=48, size=256), "max_batch = 4\n[onnxruntime]\nintra_op_threads = 1")

    async def run():
        stats = VersionStats("m", "1")
        sched = Scheduler(engine, SchedulerOptions(max_batch=1, inline_below_us=0), stats, "m/1")
        x = {"x": np.ones((1, 256), np.float32)}
        first = asyncio.ensure_future(sched.infer(x, None))
        await asyncio.sleep(0)
        late = asyncio.ensure_future(sched.infer(x, time.perf_counter_ns() + 1_000))  # 1 us
        await first
        with pytest.raises(DeadlineExceeded):
            await late
        await sched.drain(5)
        return stats

    stats = asyncio.run(run())
    assert stats.execution_count == 1


def test_full_queue_rejects_at_once(tmp_path):
    engine = _engine(tmp_path, lambda p: onnx_models.slow(p, loops=48, size=256), "max_batch = 4\n[onnxruntime]\nintra_op_threads = 1")

    async def run():
        sched = Scheduler(engine, SchedulerOptions(max_batch=1, max_queue_size=2, inline_below_us=0), VersionStats("m", "1"), "m/1")
        x = {"x": np.ones((1, 256), np.float32)}
        tasks = [asyncio.ensure_future(sched.infer(x, None)) for _ in range(6)]
        done = await asyncio.gather(*tasks, return_exceptions=True)
        await sched.drain(5)
        return done

    done = asyncio.run(run())
    rejected = [d for d in done if isinstance(d, ResourceExhausted)]
    assert rejected and len(rejected) < 6 and "queue is full" in str(rejected[0])
    assert all(isinstance(d, tuple) for d in done if not isinstance(d, ResourceExhausted))


def test_thread_count_respects_cores(tmp_path):
    cfg = parse_model_config("instances = 4", tmp_path / "config.toml", "m")
    assert builder.threads_per_slot(cfg) * cfg.instances <= max(builder.usable_cores(), cfg.instances)


def test_idle_slots_share_the_queue_instead_of_one_slot_taking_it_all(tmp_path):
    engine = _engine(tmp_path, lambda p: onnx_models.scale(p, 2.0),
                     "max_batch = 8\ninstances = 2\n[onnxruntime]\nintra_op_threads = 1")

    async def run():
        stats = VersionStats("m", "1")
        sched = Scheduler(engine, SchedulerOptions(max_batch=8, instances=2, inline_below_us=0), stats, "m/1")
        xs = [np.full((1, 4), i, np.float32) for i in range(4)]
        results = await asyncio.gather(*(sched.infer({"x": x}, None) for x in xs))
        await sched.drain(5)
        return xs, results, stats

    xs, results, stats = asyncio.run(run())
    for x, (out, _timing) in zip(xs, results):
        np.testing.assert_array_equal(out["y"], x * 2)
    assert list(stats.batches) == [2] and stats.execution_count == 2, "two idle slots take two requests each"
