"""GPU kernels against the CPU reference. Skipped with the reason when CUDA or pycuda is absent.

Real images come from the benchmark zoo when it is there (``$TEGRAD_ZOO``, or ``shared/zoo``
beside the checkout); those cases are skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from calib.preprocess import load_image, preprocess
from daemon.errors import InvalidArgument
from daemon.processing.cpu import CpuPostprocessor, CpuPreprocessor
from daemon.processing.spec import PostprocessConfig, PreprocessConfig

from .helpers import craft_yolo, random_image, random_yolo, smooth_image

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def kernel_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels")
    old = os.environ.get("TEGRAD_KERNEL_CACHE")
    os.environ["TEGRAD_KERNEL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TEGRAD_KERNEL_CACHE", None)
    else:
        os.environ["TEGRAD_KERNEL_CACHE"] = old


def zoo_images(limit: int = 6) -> list[np.ndarray]:
    root = Path(os.environ.get("TEGRAD_ZOO", ROOT.parent / "shared" / "zoo"))
    files = sorted(f for f in (root / "images").glob("*/*") if f.suffix.lower() in (".jpg", ".jpeg"))
    return [load_image(f) for f in files[:: max(1, len(files) // limit)][:limit]]


def level(cfg: PreprocessConfig) -> float:
    """One uint8 step of the input, in output units after normalisation."""
    spec = cfg.to_spec()
    if spec.std is not None:
        return float(max(1.0 / abs(s) for s in spec.std))
    if spec.scale is not None:
        return float(max(abs(s) for s in spec.scale))
    return 1.0


CASES = {
    "stretch-linear-rgb-01": dict(size=(224, 224), color="RGB", scale=1 / 255),
    "stretch-nearest-bgr": dict(size=(96, 160), interpolation="nearest", color="BGR"),
    "letterbox-topleft-yolox": dict(size=(416, 416), resize="letterbox", anchor="top-left", pad_value=114,
                                    color="BGR"),
    "letterbox-center-nhwc-01": dict(size=(640, 640), resize="letterbox", anchor="center", pad_value=[0, 128, 255],
                                     color="RGB", scale=1 / 255, layout="NHWC"),
    "center-crop-effnet": dict(size=(224, 224), resize="center-crop", resize_short=256, color="RGB", mean=127.0,
                               std=128.0),
    "center-crop-gray": dict(size=(64, 48), resize="center-crop", color="GRAY", mean=0.5, std=0.25),
    "center-crop-padded": dict(size=(64, 64), resize="center-crop", resize_short=40, pad_value=7, color="RGB",
                               scale=1 / 255),
    "stretch-fp16-scale-offset": dict(size=(128, 96), color="RGB", scale=[0.017, 0.018, 0.019],
                                      offset=[-2.1, -2.0, -1.8], dtype="float16"),
    "letterbox-nearest-gray-fp16-nhwc": dict(size=(100, 120), resize="letterbox", interpolation="nearest",
                                             color="GRAY", scale=1 / 255, dtype="float16", layout="NHWC"),
}


def _images() -> list[np.ndarray]:
    shapes = [(480, 640), (37, 53), (224, 224), (1080, 1920), (13, 301), (300, 7), (1, 1)]
    return [random_image(h, w, seed=i) for i, (h, w) in enumerate(shapes)] + [smooth_image(720, 1280, 9)]


def compare(cfg: PreprocessConfig, images: list[np.ndarray], gpu_out: np.ndarray, gpu_tf) -> dict[str, float]:
    cpu_out, cpu_tf = CpuPreprocessor(cfg).run(images)
    assert gpu_out.shape == cpu_out.shape and gpu_out.dtype == cpu_out.dtype
    assert gpu_tf == cpu_tf
    a, b = gpu_out.astype(np.float32), cpu_out.astype(np.float32)
    diff = np.abs(a - b)
    tol = level(cfg) * (1 + 1e-4) + (2e-3 * float(np.abs(b).max()) if cfg.dtype == "float16" else 0.0)
    stats = {"max_diff": float(diff.max()), "exact": float(np.mean(diff == 0)), "level": level(cfg)}
    print(f"{cfg.resize}/{cfg.interpolation}/{cfg.color}/{cfg.dtype}: {stats}")
    assert stats["max_diff"] <= tol, stats
    assert stats["exact"] >= 0.98, stats
    return stats


@pytest.fixture(scope="module")
def gpu_pre():
    from daemon.processing.gpu import GpuPreprocessor

    made = []

    def make(cfg: PreprocessConfig, max_batch: int = 8, **kw) -> GpuPreprocessor:
        made.append(GpuPreprocessor(cfg, max_batch, **kw))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.mark.parametrize("case", list(CASES))
def test_preprocess_matches_cpu_on_random_images(case, gpu_pre):
    cfg = PreprocessConfig(**CASES[case])
    images = _images()
    pre = gpu_pre(cfg, max_batch=len(images), max_image_hw=(64, 64))  # forces the staging to grow
    out, transforms = pre.run(images)
    stats = compare(cfg, images, out, transforms)
    if cfg.scale == 1 / 255 and cfg.dtype == "float32":
        assert stats["max_diff"] <= 1 / 255 + 1e-7  # the criterion, literally
    times = pre.timings()
    assert times["kernel_ms"] > 0 and times["upload_ms"] > 0


@pytest.mark.parametrize("case", ["center-crop-effnet", "letterbox-topleft-yolox", "letterbox-center-nhwc-01"])
def test_preprocess_matches_cpu_on_real_images(case, gpu_pre):
    images = zoo_images()
    if not images:
        pytest.skip("benchmark zoo images not found (set TEGRAD_ZOO)")
    cfg = PreprocessConfig(**CASES[case])
    out, transforms = gpu_pre(cfg).run(images)
    compare(cfg, images, out, transforms)


def test_preprocess_writes_into_a_given_device_buffer_and_reuses_staging(gpu_pre):
    cfg = PreprocessConfig(**CASES["letterbox-topleft-yolox"])
    pre = gpu_pre(cfg, max_batch=2)
    a = [random_image(300, 500, 1), random_image(500, 300, 2)]
    b = [random_image(200, 200, 3)]
    with pre.gpu.active() as cuda:
        buf = cuda.mem_alloc(2 * 3 * 416 * 416 * 4)
        tensor, ta = pre.enqueue(a, out_ptr=int(buf))
        assert tensor.ptr == int(buf) and tensor.shape == (2, 3, 416, 416)
        pre.stream.synchronize()
        got = np.empty((2, 3, 416, 416), np.float32)
        cuda.memcpy_dtoh(got, buf)
        buf.free()
    compare(cfg, a, got, ta)
    for _ in range(3):  # alternating staging buffers, back-to-back batches
        out_b, tb = pre.run(b)
        compare(cfg, b, out_b, tb)


def test_kernels_are_cached_on_disk(tmp_path):
    # In a fresh process: kernels are compiled once per process, so in this one an earlier test
    # (of any module) may already have compiled them into another cache directory.
    env = {**os.environ, "TEGRAD_KERNEL_CACHE": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = ("from daemon.processing.gpu import GpuPreprocessor\n"
            "from daemon.processing.spec import PreprocessConfig\n"
            "GpuPreprocessor(PreprocessConfig(size=8), 1).close()\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(tmp_path.iterdir())


CLOSE_AND_REOPEN = """
import numpy as np
from daemon.processing.gpu import GpuPostprocessor, GpuPreprocessor
from daemon.processing.spec import PostprocessConfig, PreprocessConfig

image = np.full((20, 30, 3), 200, np.uint8)
for _ in range(2):
    pre = GpuPreprocessor(PreprocessConfig(size=16, scale=1 / 255), 1)
    out, _ = pre.run([image])
    pre.close()
    pre.close()
    assert np.allclose(out, np.float32(200) * np.float32(1 / 255))
    post = GpuPostprocessor(PostprocessConfig(kind="classification", top_k=2), (4,), 1)
    assert post.run(np.array([[1.0, 4.0, 2.0, 3.0]], np.float32))["classes"].tolist() == [[1, 3]]
    post.close()
print("ok")
"""


def test_processors_can_be_closed_and_made_again():
    """Closing every processor releases the primary context; the kernel cache must survive that.
    In a fresh process, since this module's other processors hold the context until it ends."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CLOSE_AND_REOPEN], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_cubic_has_no_gpu_kernel():
    from daemon.processing.gpu import spec_struct

    with pytest.raises(ValueError, match="interpolation: 'cubic' has no GPU kernel"):
        spec_struct(PreprocessConfig(size=8, interpolation="cubic"))


# ---------------------------------------------------------------------------- post-processing


@pytest.fixture(scope="module")
def gpu_post():
    from daemon.processing.gpu import GpuPostprocessor

    made = []

    def make(cfg, shape, max_batch=8, **kw):
        made.append(GpuPostprocessor(cfg, shape, max_batch, **kw))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize(("classes", "k"), [(1000, 5), (3, 5), (10, 10), (21843, 3)])
def test_softmax_topk_matches_cpu(softmax, classes, k, gpu_post):
    rng = np.random.default_rng(classes + k)
    logits = rng.normal(0, 3, (6, classes)).astype(np.float32)
    logits[0, : min(classes, 4)] = 2.5  # ties resolve to the lower index
    logits[1] = np.round(logits[1])  # many ties
    cfg = PostprocessConfig(kind="classification", top_k=k, softmax=softmax, labels="labels.txt")
    labels = [f"class {i}" for i in range(classes)]
    gpu = gpu_post(cfg, (classes,), labels=labels).run({"logits": logits})
    cpu = CpuPostprocessor(cfg, labels).run({"logits": logits})
    np.testing.assert_array_equal(gpu["classes"], cpu["classes"])
    np.testing.assert_allclose(gpu["scores"], cpu["scores"], rtol=1e-5, atol=1e-7)
    assert gpu["labels"].tolist() == cpu["labels"].tolist()


def _transforms(rng, n, input_hw):
    spec = PreprocessConfig(size=input_hw, resize="letterbox", anchor="center").to_spec()
    return [preprocess(np.zeros((int(rng.integers(50, 900)), int(rng.integers(50, 900)), 3), np.uint8), spec)[1]
            for _ in range(n)]


def assert_same_detections(gpu: dict, cpu: dict) -> None:
    np.testing.assert_array_equal(gpu["count"], cpu["count"])
    np.testing.assert_array_equal(gpu["classes"], cpu["classes"])
    np.testing.assert_array_equal(gpu["scores"], cpu["scores"])
    np.testing.assert_allclose(gpu["boxes"], cpu["boxes"], rtol=1e-6, atol=1e-3)
    exact = np.mean(gpu["boxes"] == cpu["boxes"])
    print(f"count {gpu['count'].tolist()}, boxes bit-exact {exact:.4f}")


@pytest.mark.parametrize("variant", ["yolox", "yolov5", "yolov8"])
@pytest.mark.parametrize("agnostic", [False, True])
def test_yolo_crafted_outputs_match_cpu(variant, agnostic, gpu_post):
    from .test_cpu import DETS

    pred = np.stack([craft_yolo(variant, DETS), craft_yolo(variant, DETS[2:])])
    cfg = PostprocessConfig(kind="yolo", variant=variant, max_detections=5, class_agnostic=agnostic)
    rng = np.random.default_rng(1)
    tf = _transforms(rng, 2, (64, 64))
    gpu = gpu_post(cfg, pred.shape[1:], input_hw=(64, 64)).run({"output": pred}, tf)
    cpu = CpuPostprocessor(cfg, input_hw=(64, 64)).run({"output": pred}, tf)
    assert_same_detections(gpu, cpu)
    assert gpu["count"][0] == (2 if agnostic else 3)


@pytest.mark.parametrize("variant", ["yolox", "yolov5", "yolov8"])
@pytest.mark.parametrize(("threshold", "agnostic", "max_det"), [(0.3, False, 100), (0.02, False, 300), (0.3, True, 7)])
def test_yolo_random_outputs_match_cpu(variant, threshold, agnostic, max_det, gpu_post):
    rng = np.random.default_rng([len(variant), int(threshold * 100), max_det])
    pred = np.stack([random_yolo(variant, rng, input_hw=(256, 256), classes=7) for _ in range(4)])
    cfg = PostprocessConfig(kind="yolo", variant=variant, score_threshold=threshold, iou_threshold=0.5,
                            max_detections=max_det, class_agnostic=agnostic)
    tf = _transforms(rng, 4, (256, 256))
    post = gpu_post(cfg, pred.shape[1:], input_hw=(256, 256))
    for transforms in (tf, None):
        gpu = post.run({"output": pred}, transforms)
        cpu = CpuPostprocessor(cfg, input_hw=(256, 256)).run({"output": pred}, transforms)
        assert_same_detections(gpu, cpu)
    assert post.timings()["select_ms"] > 0


def test_yolo_reads_a_device_tensor(gpu_post):
    from daemon.device_tensor import DeviceTensor

    rng = np.random.default_rng(3)
    pred = np.stack([random_yolo("yolov8", rng) for _ in range(3)])
    cfg = PostprocessConfig(kind="yolo", variant="yolov8", score_threshold=0.4)
    post = gpu_post(cfg, pred.shape[1:])
    with post.gpu.active() as cuda:
        buf = cuda.to_device(pred)
        post.enqueue(pred[::-1].copy())  # a batch nobody collects: the next enqueue waits for it
        post.enqueue(DeviceTensor(int(buf), pred.shape, np.dtype(np.float32)))
        gpu = post.result()
        buf.free()
    assert_same_detections(gpu, CpuPostprocessor(cfg).run({"o": pred}))
    with pytest.raises(InvalidArgument, match="3 outputs for 1 images"):
        post.enqueue(pred, transforms=_transforms(rng, 1, (640, 640)))
    with pytest.raises(InvalidArgument, match="FP32"):
        post.enqueue(DeviceTensor(0, pred.shape, np.dtype(np.float16)))


# ---------------------------------------------------------------------------- overlap

SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


def test_two_slots_overlap_on_their_own_streams(gpu_pre):
    """Preprocess + an inference-like kernel on two slots' streams: run from two threads at once,
    the span measured with CUDA events is well under the sum of each slot's time alone."""
    from pycuda.compiler import SourceModule

    cfg = PreprocessConfig(**CASES["letterbox-topleft-yolox"])
    slots = [gpu_pre(cfg, max_batch=2), gpu_pre(cfg, max_batch=2)]
    images = [random_image(1080, 1920, 5), random_image(720, 1280, 6)]
    gpu = slots[0].gpu
    with gpu.active() as cuda:
        spin = SourceModule(SPIN, no_extern_c=True).get_function("spin").prepare("q")
        khz = gpu.device.get_attribute(cuda.device_attribute.CLOCK_RATE)
        events = [(cuda.Event(), cuda.Event()) for _ in slots]

    def work(i: int, barrier: threading.Barrier | None) -> None:
        slot, (begin, end) = slots[i], events[i]
        if barrier is not None:
            barrier.wait()
        with slot.gpu.active():
            begin.record(slot.stream)
            slot.enqueue(images)
            spin.prepared_async_call((1, 1, 1), (1, 1, 1), slot.stream, np.int64(khz * 20))  # ~20 ms "inference"
            end.record(slot.stream)
            slot.stream.synchronize()

    for i in range(2):  # warm-up
        work(i, None)
    alone = []
    for i in range(2):
        work(i, None)
        alone.append(events[i][0].time_till(events[i][1]))
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=work, args=(i, barrier)) for i in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = (time.perf_counter() - t0) * 1000
    with gpu.active():
        first = events[0][0] if events[0][0].time_till(events[1][0]) >= 0 else events[1][0]
        span = max(first.time_till(end) for _, end in events)
    print(f"alone {alone} ms, together span {span:.2f} ms (wall {wall:.2f} ms), pre timings {slots[0].timings()}")
    assert span < 0.75 * sum(alone)
