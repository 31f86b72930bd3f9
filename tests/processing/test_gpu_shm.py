"""A registered shared-memory window, page-locked and mapped into the GPU, feeds the preprocessing
kernel in place and gives the CPU reference's result (and exactly the staged GPU path's); so
does the serving path (registry -> admit -> GPU preprocessing) in process and in a daemon.
Skipped with the reason when CUDA or pycuda is absent."""

from __future__ import annotations

import os
import uuid
from multiprocessing import shared_memory

import numpy as np
import pytest

from daemon.processing.spec import PreprocessConfig

from .helpers import random_image, smooth_image
from .test_gpu import CASES, compare, kernel_cache  # noqa: F401  (kernel_cache: autouse fixture)

pytestmark = pytest.mark.gpu


@pytest.fixture
def client_region():
    """A POSIX shm object as tritonclient.utils.shared_memory makes one, and a descriptor of it."""
    made = []

    def make(nbytes: int):
        key = f"tegrad_gpu_shm_{uuid.uuid4().hex[:10]}"
        region = shared_memory.SharedMemory(key, create=True, size=nbytes)
        fd = os.open(f"/dev/shm/{key}", os.O_RDWR)
        made.append((region, fd))
        return region, fd

    yield make
    for region, fd in made:
        os.close(fd)
        region.close()
        region.unlink()


@pytest.mark.parametrize("case", ["center-crop-effnet", "letterbox-topleft-yolox", "stretch-nearest-bgr"])
def test_registered_window_feeds_the_kernel_like_the_cpu(case, client_region):
    from daemon.processing.device import MappedHostWindow
    from daemon.processing.gpu import GpuPreprocessor
    from daemon.processing.gpu_shm import run_from_window

    cfg = PreprocessConfig(**CASES[case])
    frames = [random_image(1080, 1920, 0), random_image(37, 53, 1), smooth_image(720, 1280, 2)]
    # The window starts off a page boundary and the frames at odd offsets inside it.
    window_at, gap = 4096 + 100, 13
    offsets, at = [], 0
    for f in frames:
        offsets.append(at)
        at += f.nbytes + gap
    region, fd = client_region(window_at + at)
    for f, off in zip(frames, offsets):
        start = window_at + off
        region.buf[start : start + f.nbytes] = f.tobytes()

    pre = GpuPreprocessor(cfg, max_batch=len(frames))
    window = MappedHostWindow(pre.gpu, fd, window_at, at)
    try:
        layout = [(off, f.shape[0], f.shape[1]) for f, off in zip(frames, offsets)]
        out, transforms = run_from_window(pre, window, layout)
        compare(cfg, frames, out, transforms)
        staged, _ = pre.run(frames)
        np.testing.assert_array_equal(out, staged)

        # The app writes the next frame in place; the kernel sees it without another registration.
        nxt = random_image(1080, 1920, 5)
        region.buf[window_at : window_at + nxt.nbytes] = nxt.tobytes()
        out2, transforms2 = run_from_window(pre, window, layout[:1])
        compare(cfg, [nxt], out2, transforms2)
    finally:
        window.close()
        pre.close()


def test_a_frame_outside_the_window_is_refused_before_the_kernel_runs(client_region):
    from daemon.errors import InvalidArgument
    from daemon.processing.device import MappedHostWindow
    from daemon.processing.gpu import GpuPreprocessor
    from daemon.processing.gpu_shm import run_from_window

    cfg = PreprocessConfig(**CASES["center-crop-effnet"])
    region, fd = client_region(64 * 64 * 3)
    pre = GpuPreprocessor(cfg, max_batch=1)
    window = MappedHostWindow(pre.gpu, fd, 0, 64 * 64 * 3)
    try:
        with pytest.raises(InvalidArgument, match="does not lie inside"):
            run_from_window(pre, window, [(1, 64, 64)])
        out, _ = run_from_window(pre, window, [(0, 64, 64)])
        assert np.isfinite(out).all()
    finally:
        window.close()
        pre.close()


# -- the serving path: registry -> admit -> GPU preprocessing, and a daemon end to end ---------

SERVED_FRAMES = """backend = "onnxruntime"
processing_device = "{device}"
max_batch = 8
instances = 1
[preprocess]
input = "frames"
format = "raw"
size = [8, 8]
resize = "stretch"
interpolation = "linear"
color = "GRAY"
scale = 0.00392156862745098
"""


def _digit_frames(n: int, seed: int = 0) -> np.ndarray:
    """Held-out digits as 64x64 BGR frames (ink x 15), so the model's answer is meaningful."""
    from tests.engines.conftest import DIGITS

    x = np.load(DIGITS / "data" / "heldout.npz")["x"][seed : seed + n].reshape(n, 8, 8)
    big = np.repeat(np.repeat((x * 15).astype(np.uint8), 8, axis=1), 8, axis=2)
    return np.ascontiguousarray(np.repeat(big[..., None], 3, axis=3))


def _served_engine(tmp_path, device: str):
    from concurrent.futures import ThreadPoolExecutor

    from daemon.config import parse_model_config
    from daemon.engines.onnxruntime import runner
    from daemon.pipeline.processed import ProcessedEngine
    from tests.engines.conftest import DIGITS

    model_dir = tmp_path / device
    model_dir.mkdir()
    config = parse_model_config(SERVED_FRAMES.format(device=device), model_dir / "config.toml", "m")
    return ProcessedEngine(runner.load(DIGITS / "1" / "model.onnx", config, model_dir, engine_id="t"), config,
                           model_dir, ThreadPoolExecutor(2))


def test_region_frames_through_the_served_gpu_path_equal_the_bytes_path(tmp_path, client_region):
    import asyncio

    from daemon.processing.images import FrameInRegion
    from daemon.protogen import grpc_service_pb2 as pb
    from daemon.server.shared_memory import SharedMemoryRegistry

    frames = _digit_frames(4)
    region_obj, fd = client_region(frames.nbytes)
    region_obj.buf[: frames.nbytes] = frames.tobytes()
    gpu, cpu = _served_engine(tmp_path, "gpu"), _served_engine(tmp_path, "cpu")
    reg = SharedMemoryRegistry(enabled=True)
    region = reg.register("cam", "/" + region_obj.name, 0, frames.nbytes)
    # Discrete GPUs map host memory too: forcing the route here runs the Jetson path on any GPU.
    print("integrated GPU:", gpu.in_place_inputs == {"frames"})
    gpu.in_place_inputs = frozenset({"frames"})
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="frames", datatype="UINT8", shape=list(frames.shape))
    t.parameters["shared_memory_region"].string_param = "cam"
    t.parameters["shared_memory_byte_size"].int64_param = frames.nbytes
    try:
        held = reg.attach(req, in_place=gpu.in_place_inputs)
        try:
            admitted = asyncio.run(gpu.admit(dict(held.inputs)))
            assert all(isinstance(f, FrameInRegion) for f in admitted["frames"])
            # A batch the scheduler assembled: region frames beside decoded ones.
            mixed = np.concatenate([admitted["frames"], asyncio.run(gpu.admit({"frames": frames[:2]}))["frames"]])
            from_region = gpu.infer(admitted)["logits"]
            from_mixed = gpu.infer({"frames": mixed})["logits"]
        finally:
            held.release()
        from_bytes = gpu.infer(asyncio.run(gpu.admit({"frames": frames})))["logits"]
        on_cpu = cpu.infer(asyncio.run(cpu.admit({"frames": frames})))["logits"]
        np.testing.assert_array_equal(from_region, from_bytes)
        np.testing.assert_array_equal(from_mixed, np.concatenate([from_bytes, from_bytes[:2]]))
        np.testing.assert_allclose(from_region, on_cpu, atol=0.05 * float(np.abs(on_cpu).max()))
        assert (from_region.argmax(1) == on_cpu.argmax(1)).all()
        window = region.mapped(lambda *a: pytest.fail("the window was not cached"))
        reg.unregister("cam")
        assert region.closed and window._closed, "unregistered and idle: the window is unregistered from the GPU"
    finally:
        reg.close()
        gpu.close()
        cpu.close()


def test_a_daemon_serves_raw_frames_from_shared_memory_on_the_gpu_like_the_cpu(tmp_path, client_region):
    import shutil

    import grpc

    from daemon.protogen import grpc_service_pb2 as pb
    from daemon.protogen import grpc_service_pb2_grpc as pb_grpc
    from tests.engines.conftest import DIGITS
    from tests.interop.conftest import start_server

    for name, device in (("gpu_frames", "gpu"), ("cpu_frames", "cpu")):
        shutil.copytree(DIGITS, tmp_path / "repo" / name, ignore=shutil.ignore_patterns("data", "README.md"))
        (tmp_path / "repo" / name / "config.toml").write_text(SERVED_FRAMES.format(device=device))
    frames = _digit_frames(3, seed=7)
    region_obj, _ = client_region(4096 + frames.nbytes)
    region_obj.buf[4096 : 4096 + frames.nbytes] = frames.tobytes()
    server = start_server(repository=tmp_path / "repo", state_dir=tmp_path / "state", args=("--allow-shared-memory",))
    try:
        with grpc.insecure_channel(server.url) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
                name="cam", key="/" + region_obj.name, offset=4096, byte_size=frames.nbytes))

            def infer(model: str, shm: bool) -> np.ndarray:
                req = pb.ModelInferRequest(model_name=model)
                t = req.inputs.add(name="frames", datatype="UINT8", shape=list(frames.shape))
                if shm:
                    t.parameters["shared_memory_region"].string_param = "cam"
                    t.parameters["shared_memory_byte_size"].int64_param = frames.nbytes
                else:
                    req.raw_input_contents.append(frames.tobytes())
                resp = stub.ModelInfer(req, timeout=120)
                return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(tuple(resp.outputs[0].shape))

            gpu_shm, gpu_bytes, cpu_bytes = infer("gpu_frames", True), infer("gpu_frames", False), infer("cpu_frames", False)
            np.testing.assert_array_equal(gpu_shm, gpu_bytes)
            np.testing.assert_allclose(gpu_shm, cpu_bytes, atol=0.05 * float(np.abs(cpu_bytes).max()))
            assert (gpu_shm.argmax(1) == cpu_bytes.argmax(1)).all()
            stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="cam"))
            # The daemon let go of the object: the next frame still gets served from bytes.
            np.testing.assert_array_equal(infer("gpu_frames", False), gpu_bytes)
    finally:
        rc = server.stop()
    assert rc == 0, server.log()
