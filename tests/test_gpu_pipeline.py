"""ProcessedEngine's device path: images to results on one slot's CUDA stream, no host round trip.

TensorRT is not installed on the machines these tests usually get, so the path is checked
against :class:`StandInEngine`, which implements only TrtEngine's device interface (``stream``,
``input_buffer``, ``infer_device``, ``done_event``, ``infer_ms``) and its host ``infer``, over a
model that is a fixed affine map (``y = W x + b``) computed by a small pycuda kernel. The device
path must give what the CPU pipeline gives on the same stand-in's host ``infer``. The last test
(marker ``tensorrt``) runs the real TrtEngine on the digits model.
"""

from __future__ import annotations

import asyncio
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.config import parse_model_config
from daemon.device_tensor import DeviceTensor
from daemon.errors import InvalidArgument
from daemon.pipeline.processed import ProcessedEngine
from daemon.processing.device import Gpu
from daemon.tensor_spec import TensorSpec
from tests.onnx_models import DETECTOR_ANCHORS, DETECTOR_CONFIG

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "daemon" / "models" / "digits"

# 8x8 grey digits in, 10 scores out: the shape of the embedded digits model.
CLASSIFIER = """max_batch = 8
instances = 2
[preprocess]
input = "image"
size = [8, 8]
resize = "stretch"
interpolation = "linear"
color = "GRAY"
scale = 0.00392156862745098
[postprocess]
kind = "classification"
softmax = true
top_k = 3
"""
RAW = CLASSIFIER.split("[postprocess]")[0]

_AFFINE = """
__global__ void affine(const float* x, const float* w, const float* b, float* y, int n, int features, int outs)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * outs) return;
    int s = i / outs, o = i % outs;
    float acc = b[o];
    for (int f = 0; f < features; ++f) acc += x[s * features + f] * w[o * features + f];
    y[i] = acc;
}
"""


@functools.cache
def _affine_kernel():
    # Compiled once and kept with a primary-context reference for the whole process, as the
    # daemon's own kernel cache does: a module must not outlive its context.
    gpu = Gpu(0)
    with gpu.active():
        from pycuda.compiler import SourceModule

        module = SourceModule(_AFFINE, options=["-O3"])
    return gpu, module, module.get_function("affine").prepare("PPPPiii")


class StandInEngine:
    """A stand-in for TrtEngine's device interface: per slot a pycuda stream, device input and
    output buffers sized for ``max_batch``, and events around each execution, all in the primary
    context (as TrtEngine has them). The model is ``y[n] = W @ x[n].ravel() + b``."""

    backend, precision, engine_id = "tensorrt", "fp32", "stand-in"

    def __init__(self, inp: TensorSpec, out: TensorSpec, weight: np.ndarray, bias: np.ndarray,
                 slots: int = 2, max_batch: int = 8) -> None:
        self.inputs, self.outputs = [inp], [out]
        self._w, self._b = weight.astype(np.float32), bias.astype(np.float32)
        self._features, self._outs = math.prod(inp.shape[1:]), math.prod(out.shape[1:])
        assert self._w.shape == (self._outs, self._features)
        self.max_batch = max_batch
        # Per slot: slots run on their own threads, and += on a shared int is not atomic.
        self.device_calls, self.host_calls = [0] * slots, 0
        _, _, self._kernel = _affine_kernel()
        self.gpu = Gpu(0)
        with self.gpu.active() as cuda:
            self._w_dev, self._b_dev = cuda.to_device(self._w), cuda.to_device(self._b)
            self._streams = [cuda.Stream() for _ in range(slots)]
            self._in = [cuda.mem_alloc(max_batch * self._features * 4) for _ in range(slots)]
            self._out = [cuda.mem_alloc(max_batch * self._outs * 4) for _ in range(slots)]
            self._events = [(cuda.Event(), cuda.Event()) for _ in range(slots)]

    @property
    def slots(self) -> int:
        return len(self._streams)

    def stream(self, slot: int):
        return self._streams[slot]

    def input_buffer(self, slot: int, name: str) -> int:
        assert name == self.inputs[0].name
        return int(self._in[slot])

    def done_event(self, slot: int):
        return self._events[slot][1]

    def infer_device(self, slot: int, shapes: dict, wait_for=None) -> dict[str, DeviceTensor]:
        shape = tuple(shapes[self.inputs[0].name])
        if shape[1:] != self.inputs[0].shape[1:] or not 0 < shape[0] <= self.max_batch:
            raise InvalidArgument(f"input shape {list(shape)} is outside the engine's range")
        self.device_calls[slot] += 1
        n, stream, (started, done) = shape[0], self._streams[slot], self._events[slot]
        with self.gpu.active():
            if wait_for is not None:
                stream.wait_for_event(wait_for)
            started.record(stream)
            grid = ((n * self._outs + 127) // 128, 1, 1)
            self._kernel.prepared_async_call(grid, (128, 1, 1), stream, int(self._in[slot]), int(self._w_dev),
                                             int(self._b_dev), int(self._out[slot]), n, self._features, self._outs)
            done.record(stream)
        out = self.outputs[0]
        return {out.name: DeviceTensor(int(self._out[slot]), (n, *out.shape[1:]), np.dtype(np.float32))}

    def infer_ms(self, slot: int) -> float:
        started, done = self._events[slot]
        with self.gpu.active():
            done.synchronize()
            return float(started.time_till(done))

    def infer(self, feeds: dict[str, np.ndarray], slot: int = 0) -> dict[str, np.ndarray]:
        self.host_calls += 1
        x = feeds[self.inputs[0].name]
        y = x.reshape(len(x), -1).astype(np.float64) @ self._w.T.astype(np.float64) + self._b
        return {self.outputs[0].name: y.astype(np.float32).reshape(len(x), *self.outputs[0].shape[1:])}

    def close(self) -> None:
        with self.gpu.active():
            for s in self._streams:
                s.synchronize()
            for buf in (*self._in, *self._out, self._w_dev, self._b_dev):
                buf.free()
        self.gpu.close()


def _classifier_engine() -> StandInEngine:
    w = np.random.default_rng(0).standard_normal((10, 64)) / 2
    return StandInEngine(TensorSpec("input", "FP32", (-1, 1, 8, 8)), TensorSpec("logits", "FP32", (-1, 10)),
                         w, np.zeros(10))


def _detector_engine() -> StandInEngine:
    # Zero weights: the output is the fixed anchors, whatever the image (like tests.onnx_models.fixed_detector).
    return StandInEngine(TensorSpec("images", "FP32", (-1, 3, 64, 64)), TensorSpec("output0", "FP32", (-1, 6, 3)),
                         np.zeros((18, 3 * 64 * 64)), DETECTOR_ANCHORS.ravel(), max_batch=4)


def _processed(tmp_path: Path, text: str, engine, device: str) -> ProcessedEngine:
    config = parse_model_config(f'processing_device = "{device}"\n' + text, tmp_path / "config.toml", "m")
    return ProcessedEngine(engine, config, tmp_path, ThreadPoolExecutor(2))


def _pngs(n: int, start: int = 0) -> tuple[list[bytes], np.ndarray]:
    held = np.load(DIGITS / "data" / "heldout.npz")
    digits = held["x"][start : start + n]
    files = [cv2.imencode(".png", cv2.resize((d.astype(np.int32) * 255 // 16).astype(np.uint8), (32, 32),
                                             interpolation=cv2.INTER_NEAREST))[1].tobytes() for d in digits]
    return files, held["y"][start : start + n]


def _run(engine: ProcessedEngine, files: list[bytes], slot: int = 0) -> dict[str, np.ndarray]:
    inputs = asyncio.run(engine.admit({"image": np.array(files, dtype=object)}))
    return engine.infer(inputs, slot)


def _same_classes(a: dict, b: dict) -> None:
    assert (a["classes"] == b["classes"]).all()
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_classifier_on_the_device_gives_the_cpu_results(tmp_path):
    cpu = _processed(tmp_path, CLASSIFIER, _classifier_engine(), "cpu")
    gpu = _processed(tmp_path, CLASSIFIER, _classifier_engine(), "gpu")
    files, _ = _pngs(8)
    _same_classes(_run(cpu, files), _run(gpu, files, slot=1))
    assert gpu._engine.device_calls == [0, 1] and gpu._engine.host_calls == 0
    assert all(ns > 0 for ns in gpu.stage_ns(1)), gpu.stage_ns(1)
    assert gpu.stage_ns(0) == (0, 0, 0)

    # The preprocessed tensor sent directly still takes the engine's host path.
    tensor = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    _same_classes(cpu.infer({"input": tensor}), gpu.infer({"input": tensor}, 0))
    assert gpu._engine.host_calls == 1

    with pytest.raises(InvalidArgument, match="batch of 16"):
        _run(gpu, files * 2)
    for e in (cpu, gpu):
        e.close()


@pytest.mark.gpu
def test_raw_outputs_come_back_to_the_host(tmp_path):
    cpu = _processed(tmp_path, RAW, _classifier_engine(), "cpu")
    gpu = _processed(tmp_path, RAW, _classifier_engine(), "gpu")
    files, _ = _pngs(5)
    a, b = _run(cpu, files), _run(gpu, files)
    assert list(b) == ["logits"] and b["logits"].shape == (5, 10)
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-4, atol=1e-4)
    assert gpu._engine.device_calls == [1, 0] and all(ns > 0 for ns in gpu.stage_ns(0))
    for e in (cpu, gpu):
        e.close()


@pytest.mark.gpu
def test_detector_on_the_device_gives_the_cpu_results(tmp_path):
    cpu = _processed(tmp_path, DETECTOR_CONFIG, _detector_engine(), "cpu")
    gpu = _processed(tmp_path, DETECTOR_CONFIG, _detector_engine(), "gpu")
    # Different sizes, so each image has its own letterbox transform to map boxes back through.
    images = [np.full((64, 128, 3), 40, np.uint8), np.full((100, 50, 3), 90, np.uint8), np.zeros((64, 64, 3), np.uint8)]
    files = [cv2.imencode(".png", im)[1].tobytes() for im in images]
    c, g = _run(cpu, files), _run(gpu, files)
    assert list(c["count"]) == list(g["count"]) == [2, 2, 2]
    assert (c["classes"] == g["classes"]).all()
    np.testing.assert_allclose(c["boxes"], g["boxes"], atol=1e-3)
    np.testing.assert_allclose(c["scores"], g["scores"], rtol=1e-6)
    assert not np.allclose(g["boxes"][0], g["boxes"][1]), "boxes are mapped back to each image's own size"
    assert gpu._engine.device_calls == [1, 0] and all(ns > 0 for ns in gpu.stage_ns(0))
    for e in (cpu, gpu):
        e.close()


@pytest.mark.gpu
def test_two_slots_from_two_threads(tmp_path):
    cpu = _processed(tmp_path, CLASSIFIER, _classifier_engine(), "cpu")
    gpu = _processed(tmp_path, CLASSIFIER, _classifier_engine(), "gpu")
    work = {slot: _pngs(8, start=8 * slot)[0] for slot in (0, 1)}
    expected = {slot: _run(cpu, files) for slot, files in work.items()}
    admitted = {slot: asyncio.run(gpu.admit({"image": np.array(files, dtype=object)})) for slot, files in work.items()}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(slot: int) -> None:
        try:
            start.wait()
            for _ in range(30):
                _same_classes(expected[slot], gpu.infer(admitted[slot], slot))
                assert all(ns > 0 for ns in gpu.stage_ns(slot))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert gpu._engine.device_calls == [30, 30]
    for e in (cpu, gpu):
        e.close()


@pytest.mark.tensorrt
def test_tensorrt_digits_on_the_device_give_the_cpu_classes(tmp_path):
    from daemon.config import TensorRTOptions
    from daemon.engines.tensorrt.builder import build_engine
    from daemon.engines.tensorrt.runner import TrtEngine

    plan = tmp_path / "digits.plan"
    build_engine(DIGITS / "1" / "model.onnx", plan, options=TensorRTOptions(), max_batch=8, timing_cache_path=None)
    # The GPU kernel has no "area" resize; a batch of 8 keeps the preprocessors' staging small.
    text = (DIGITS / "config.toml").read_text().replace('interpolation = "area"', 'interpolation = "linear"')
    text = text.replace("max_batch = 64", "max_batch = 8") + '\n[postprocess]\nkind = "classification"\ntop_k = 3\n'

    def engine():
        return TrtEngine.load(plan, inputs=[TensorSpec("input", "FP32", (-1, 1, 8, 8))],
                              outputs=[TensorSpec("logits", "FP32", (-1, 10))], instances=2, max_batch=8,
                              precision="fp32", engine_id="t")

    cpu, gpu = (_processed(tmp_path, text, engine(), d) for d in ("cpu", "gpu"))
    files, y = _pngs(8)
    a, b = _run(cpu, files), _run(gpu, files, slot=1)
    _same_classes(a, b)
    assert (b["classes"][:, 0] == y).mean() >= 0.75
    assert all(ns > 0 for ns in gpu.stage_ns(1))
    for e in (cpu, gpu):
        e.close()
