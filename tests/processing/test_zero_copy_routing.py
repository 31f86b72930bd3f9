"""Which path shared-memory frames take, on the CPU (no pycuda needed): the registry leaves raw
frames in their region only when the model asks for it, the CPU path reads them with one copy
and gets the bytes path's answer, and a region's GPU window is opened once and closed with the
region's last user. The GPU side itself is in test_gpu_shm.py."""

from __future__ import annotations

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from daemon.config import parse_model_config
from daemon.engines.onnxruntime import runner
from daemon.errors import InvalidArgument, NotFound
from daemon.pipeline.processed import ProcessedEngine
from daemon.processing.images import FrameInRegion, RegionFrames
from daemon.protogen import grpc_service_pb2 as pb
from daemon.server import tensors
from daemon.server.shared_memory import SharedMemoryRegistry
from tests.engines.conftest import DIGITS

RAW_CLASSIFIER = """max_batch = 8
[preprocess]
input = "frames"
format = "raw"
size = [8, 8]
resize = "stretch"
interpolation = "linear"
color = "GRAY"
scale = 0.00392156862745098
[postprocess]
kind = "classification"
top_k = 3
softmax = true
"""


@pytest.fixture
def shm_object():
    made = []

    def make(data: bytes) -> str:
        key = f"/tegrad_zc_{uuid.uuid4().hex[:10]}"
        with open("/dev/shm" + key, "wb") as f:
            f.write(data)
        made.append("/dev/shm" + key)
        return key

    yield make
    for path in made:
        if os.path.exists(path):
            os.unlink(path)


def _frames(n: int, h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _request(name: str, shape, datatype: str = "UINT8", offset: int = 0) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name=name, datatype=datatype, shape=list(shape))
    t.parameters["shared_memory_region"].string_param = "r"
    t.parameters["shared_memory_offset"].int64_param = offset
    t.parameters["shared_memory_byte_size"].int64_param = int(np.prod(shape)) * (4 if datatype == "FP32" else 1)
    return req


class Window:
    """Stands in for MappedHostWindow (which needs a GPU): records that it was opened and closed."""

    opened: list[Window] = []

    def __init__(self, fd: int, offset: int, nbytes: int) -> None:
        self.fd, self.offset, self.nbytes, self.closed = fd, offset, nbytes, False
        Window.opened.append(self)

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True


def test_raw_frames_stay_in_the_region_only_when_the_model_asks(shm_object):
    frames = _frames(2)
    key = shm_object(b"\0" * 64 + frames.tobytes())
    reg = SharedMemoryRegistry(enabled=True)
    reg.register("r", key, 0, 64 + frames.nbytes)

    held = reg.attach(_request("frames", frames.shape, offset=64), in_place={"frames"})
    try:
        rf = held.inputs["frames"]
        assert isinstance(rf, RegionFrames) and rf.shape == frames.shape and rf.offset == 64
        items = rf.frames()
        assert [(f.offset, f.height, f.width) for f in items] == [(64, 24, 32), (64 + 24 * 32 * 3, 24, 32)]
        np.testing.assert_array_equal(items[1].read(), frames[1])
        np.testing.assert_array_equal(rf.read(), frames)
        decoded = tensors.decode_inputs(_request("frames", frames.shape, offset=64),
                                        [_spec("frames", "UINT8", (-1, -1, -1, 3))], held.inputs)
        assert decoded["frames"] is rf, "decode_inputs passes frames left in place through unread"
    finally:
        held.release()

    copied = reg.attach(_request("frames", frames.shape, offset=64))
    try:
        assert isinstance(copied.inputs["frames"], np.ndarray), "no in_place: read now, as before"
    finally:
        copied.release()
    tensor = reg.attach(_request("frames", (4,), datatype="FP32"), in_place={"frames"})
    try:
        assert isinstance(tensor.inputs["frames"], np.ndarray), "only UINT8 frames stay in place"
    finally:
        tensor.release()
    reg.close()


def _spec(name, datatype, shape):
    from daemon.tensor_spec import TensorSpec

    return TensorSpec(name, datatype, shape)


def test_frames_left_in_place_are_size_checked_with_fstat(shm_object):
    frames = _frames(1)
    key = shm_object(frames.tobytes())
    reg = SharedMemoryRegistry(enabled=True)
    region = reg.register("r", key, 0, frames.nbytes)
    os.truncate("/dev/shm" + key, frames.nbytes // 2)
    with pytest.raises(InvalidArgument, match="too small"):
        reg.attach(_request("frames", frames.shape), in_place={"frames"})
    assert region.users == 0, "a refused request holds nothing"
    with pytest.raises(InvalidArgument, match="too small"):
        region.mapped(Window)
    reg.close()


def test_the_gpu_window_is_opened_once_and_closed_with_the_last_user(shm_object):
    Window.opened.clear()
    frames = _frames(1)
    key = shm_object(b"\0" * 100 + frames.tobytes())
    reg = SharedMemoryRegistry(enabled=True)
    region = reg.register("r", key, 100, frames.nbytes)
    first = reg.attach(_request("frames", frames.shape), in_place={"frames"})
    second = reg.attach(_request("frames", frames.shape), in_place={"frames"})
    window = region.mapped(Window)
    assert region.mapped(Window) is window and len(Window.opened) == 1, "one registration per region"
    assert (window.offset, window.nbytes) == (100, frames.nbytes), "only the registered window is mapped"
    first.release()
    second.release()
    assert not window.closed and not region.closed, "registered and idle: the window stays for the next frame"

    third = reg.attach(_request("frames", frames.shape), in_place={"frames"})
    assert region.mapped(Window) is window
    reg.unregister("r")
    assert not window.closed and not region.closed, "a request still uses it"
    third.release()
    assert window.closed and region.closed, "unregistered and its last user gone: closed"
    with pytest.raises(NotFound, match="unregistered"):
        region.mapped(Window)
    assert len(Window.opened) == 1


def _engine(tmp_path, device: str = "cpu") -> ProcessedEngine:
    config = parse_model_config(f'processing_device = "{device}"\n' + RAW_CLASSIFIER, tmp_path / "config.toml", "m")
    return ProcessedEngine(runner.load(DIGITS / "1" / "model.onnx", config, tmp_path, engine_id="t"), config,
                           tmp_path, ThreadPoolExecutor(2))


def test_the_cpu_path_reads_region_frames_once_and_answers_like_bytes(tmp_path, shm_object):
    engine = _engine(tmp_path)
    assert engine.in_place_inputs == frozenset(), "CPU preprocessing: the server reads the frames"
    frames = _frames(3, seed=4)
    key = shm_object(frames.tobytes())
    reg = SharedMemoryRegistry(enabled=True)
    reg.register("r", key, 0, frames.nbytes)
    # Even handed frames left in place (as a misrouted request would be), the CPU path reads them.
    held = reg.attach(_request("frames", frames.shape), in_place={"frames"})
    try:
        admitted = asyncio.run(engine.admit(dict(held.inputs)))
        assert all(isinstance(f, np.ndarray) for f in admitted["frames"])
        from_region = engine.infer(admitted)
    finally:
        held.release()
    from_bytes = engine.infer(asyncio.run(engine.admit({"frames": frames})))
    assert from_region.keys() == from_bytes.keys()
    for name in from_bytes:
        np.testing.assert_array_equal(from_region[name], from_bytes[name])
    reg.close()
    engine.close()


@pytest.mark.parametrize(("fmt", "device", "integrated", "in_place"), [
    ("raw", "gpu", True, True),      # Jetson: the kernel reads the region
    ("raw", "gpu", False, False),    # discrete GPU: one copy
    ("raw", "cpu", True, False),     # CPU preprocessing: one copy
    ("encoded", "gpu", True, False),  # encoded images are decoded on the CPU anyway
])
def test_which_models_read_regions_in_place(tmp_path, fmt, device, integrated, in_place):
    engine = _engine(tmp_path)
    # Only the decision is exercised here: the GPU preprocessors it looks at need pycuda.
    engine._pre = engine._pre.model_copy(update={"format": fmt})
    engine.device = device
    engine._pres = [SimpleNamespace(gpu=SimpleNamespace(integrated=integrated))] * 2
    assert engine._reads_regions_in_place() is in_place
    engine._pres = []
    engine.close()


def test_admit_keeps_frames_in_place_for_a_zero_copy_model(tmp_path, shm_object):
    engine = _engine(tmp_path)
    engine.in_place_inputs = frozenset({"frames"})  # what an integrated GPU model reports
    frames = _frames(2)
    key = shm_object(frames.tobytes())
    reg = SharedMemoryRegistry(enabled=True)
    region = reg.register("r", key, 0, frames.nbytes)
    held = reg.attach(_request("frames", frames.shape), in_place=engine.in_place_inputs)
    try:
        admitted = asyncio.run(engine.admit(dict(held.inputs)))
        items = list(admitted["frames"])
        assert all(isinstance(f, FrameInRegion) and f.region is region for f in items)
        batched = np.concatenate([admitted["frames"], admitted["frames"]])  # as the scheduler batches
        assert len(batched) == 4 and isinstance(batched[3], FrameInRegion)
        # Checked from the shape before anything is mapped or read.
        with pytest.raises(InvalidArgument, match="aspect"):
            asyncio.run(engine.admit({"frames": RegionFrames(region, 0, (1, 2, 1000, 3))}))
        with pytest.raises(InvalidArgument, match="shape"):
            asyncio.run(engine.admit({"frames": RegionFrames(region, 0, (2, 24, 32))}))
    finally:
        held.release()
    reg.close()
    engine.close()
