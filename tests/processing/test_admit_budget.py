"""ProcessedEngine.admit with a real ONNX Runtime engine: a request's decode budget is taken before
decoding and all of it comes back, whether the request is served, refused or cancelled."""

from __future__ import annotations

import asyncio
import gc
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest

from daemon.config import parse_model_config
from daemon.engines.onnxruntime import runner
from daemon.errors import InvalidArgument, ResourceExhausted
from daemon.pipeline.processed import ProcessedEngine
from daemon.processing.budget import DecodeBudget
from tests.engines.conftest import DIGITS
from tests.processing.hostile import truncated_jpeg_with_eoi

CONFIG = """max_batch = 8
[preprocess]
input = "image"
size = [8, 8]
resize = "stretch"
interpolation = "area"
color = "GRAY"
scale = 0.00392156862745098
"""


@pytest.fixture
def make(tmp_path):
    pools = []

    def build(limit: int) -> tuple[ProcessedEngine, DecodeBudget]:
        config = parse_model_config(CONFIG, tmp_path / "config.toml", "digits")
        pools.append(ThreadPoolExecutor(2))
        budget = DecodeBudget(limit)
        engine = runner.load(DIGITS / "1" / "model.onnx", config, tmp_path, engine_id="t")
        return ProcessedEngine(engine, config, tmp_path, pools[-1], budget), budget

    yield build
    for pool in pools:
        pool.shutdown()


def _digit(i: int, size=(64, 64)) -> tuple[bytes, int]:
    held = np.load(DIGITS / "data" / "heldout.npz")
    img = cv2.resize((held["x"][i].astype(np.int32) * 255 // 16).astype(np.uint8), size,
                     interpolation=cv2.INTER_NEAREST)
    return cv2.imencode(".png", img)[1].tobytes(), int(held["y"][i])


def test_served_requests_give_their_whole_share_back(make):
    engine, budget = make(1 << 20)
    files, want = zip(*(_digit(i) for i in range(4)))

    async def run():
        inputs = await engine.admit({"image": np.array(files, dtype=object)})
        assert budget.in_use > 4 * 64 * 64 * 3  # held while queued
        out = await asyncio.get_running_loop().run_in_executor(None, engine.infer, inputs, 0)
        assert budget.in_use == 0  # given back once preprocessed, before the request's end
        return out

    out = asyncio.run(run())
    assert list(out["logits"].argmax(1)) == list(want)


def test_refused_and_failed_requests_leave_nothing_held(make):
    engine, budget = make(100_000)
    big = _digit(0, (640, 480))[0]
    with pytest.raises(ResourceExhausted, match=r"batch index 0, is PNG 640x480\) needs"):
        asyncio.run(engine.admit({"image": np.array([big], dtype=object)}))
    good = _digit(1)[0]
    corrupt = good[:40] + bytes(len(good) - 52) + good[-12:]  # header and IEND intact, pixel data zeroed
    with pytest.raises(InvalidArgument, match="batch index 1 of 3: cannot decode"):
        asyncio.run(engine.admit({"image": np.array([good, corrupt, good], dtype=object)}))
    _wait_until_free(budget)


def _wait_until_free(budget: DecodeBudget) -> None:
    # An item already decoding when its request failed finishes in its pool thread, then gives back.
    deadline = time.monotonic() + 30
    while budget.in_use and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert budget.in_use == 0 and budget.waiting == 0


def test_a_cancelled_request_leaves_nothing_held(make):
    engine, budget = make(1 << 20)
    files = np.array([_digit(i)[0] for i in range(8)], dtype=object)

    async def run():
        await budget.acquire(1 << 20, "someone else")
        task = asyncio.ensure_future(engine.admit({"image": files}))
        while budget.waiting == 0:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        budget.release(1 << 20)

    asyncio.run(run())
    _wait_until_free(budget)


def test_corrupt_but_decoded_jpegs_are_counted_per_model(make):
    from prometheus_client import REGISTRY

    def count() -> float:
        return REGISTRY.get_sample_value("tegrad_images_corrupt_total", {"model": "digits"}) or 0.0

    engine, _ = make(1 << 24)
    image = cv2.cvtColor(cv2.resize(cv2.imdecode(np.frombuffer(_digit(0)[0], np.uint8), 0), (128, 128)),
                         cv2.COLOR_GRAY2BGR)
    before = count()
    asyncio.run(engine.admit({"image": np.array([truncated_jpeg_with_eoi(image)], dtype=object)}))
    assert count() == before + 1
