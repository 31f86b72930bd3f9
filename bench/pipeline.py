"""Pre-/post-processing pipeline: per-stage medians, throughput with 1 and N slots, overlap efficiency.

Runs the daemon's own pipeline in process (ProcessedEngine under the Scheduler: decoding in the
thread pool before queueing, then preprocess -> ONNX Runtime -> postprocess in each slot), so
the figures are the pipeline's, without gRPC on the same cores.

- stage medians: one image at a time through one slot (decode, preprocess, infer, postprocess);
- throughput: requests of one image each, 2 x slots in flight, with 1 slot and with N slots;
- overlap efficiency = throughput with N slots / (1 / slowest stage median): 1.0 means the
  stages of different requests overlap so well that only the slowest stage limits the rate.

    python bench/pipeline.py                       # EfficientNet-Lite0 and YOLOX-Nano from the zoo, CPU
    python bench/pipeline.py --device gpu          # pre/post-processing on the GPU (pycuda)
    python bench/pipeline.py --letterbox-only      # GPU vs OpenCV: 1920x1080 -> 640x640 letterbox
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from daemon.config import parse_model_config  # noqa: E402
from daemon.engines.cache import EngineCache  # noqa: E402
from daemon.engines.factory import EngineFactory  # noqa: E402
from daemon.engines.worker import BuildPool  # noqa: E402
from daemon.pipeline.processed import ProcessedEngine  # noqa: E402
from daemon.pipeline.scheduler import Scheduler, SchedulerOptions  # noqa: E402
from daemon.processing.images import decode_one  # noqa: E402
from daemon.telemetry.stats import VersionStats  # noqa: E402

MODELS = {
    "efficientnet": ("efficientnet-lite0.onnx", "imagenet_eval", 8, """
[preprocess]
input = "image"
size = [224, 224]
resize = "center-crop"
resize_short = 256
color = "RGB"
mean = 127.0
std = 128.0
[postprocess]
kind = "classification"
softmax = true
top_k = 5
"""),
    "yolox": ("yolox_nano.onnx", "coco_val2017", 0, """
[preprocess]
input = "image"
size = [416, 416]
resize = "letterbox"
anchor = "top-left"
pad_value = 114
color = "BGR"
scale = 1.0
[postprocess]
kind = "yolo"
variant = "yolox"
score_threshold = 0.3
iou_threshold = 0.45
max_detections = 100
"""),
}


def _engine(model: Path, text: str, slots: int, device: str, pool) -> ProcessedEngine:
    """The engine the daemon would serve: built (optimized) through the engine cache, then wrapped."""
    work = Path(tempfile.mkdtemp(prefix="tegrad-pipeline-"))
    config = parse_model_config(f"instances = {slots}\nprocessing_device = \"{device}\"\n" + text, work / "config.toml", "m")
    factory = EngineFactory(EngineCache(work / "engines", 1 << 30), BuildPool())
    prepared = asyncio.run(factory.prepare(config, work, 1, model))
    return ProcessedEngine(prepared.engine, config, work, pool), config


def _stage_medians(engine: ProcessedEngine, files: list[bytes], name: str) -> dict[str, float]:
    stages: dict[str, list[float]] = {"decode": [], "preprocess": [], "infer": [], "postprocess": []}
    for i, data in enumerate(files):
        t0 = time.perf_counter_ns()
        image = decode_one(data, 0, 1, name, 1 << 30)
        stages["decode"].append(time.perf_counter_ns() - t0)
        feeds = {name: np.array([None], dtype=object)}
        feeds[name][0] = image
        engine.infer(feeds, 0)
        pre, infer, post = engine.stage_ns(0)
        if i >= 3:  # first runs allocate
            stages["preprocess"].append(pre)
            stages["infer"].append(infer)
            stages["postprocess"].append(post)
    stages["decode"] = stages["decode"][3:]
    return {k: statistics.median(v) / 1e6 for k, v in stages.items()}


async def _throughput(engine: ProcessedEngine, config, files: list[bytes], name: str, seconds: float) -> float:
    options = SchedulerOptions(max_batch=config.max_batch, instances=config.instances, max_queue_delay_us=0,
                               preferred_batch_sizes=(), max_queue_size=1024, inline_below_us=0)
    scheduler = Scheduler(engine, options, VersionStats("bench", "1"), "bench")
    done = 0
    stop = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop:
            batch = np.array([files[i % len(files)]], dtype=object)
            inputs = await engine.admit({name: batch})
            await scheduler.infer(inputs, None)
            done += 1
            i += 7
    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(2 * config.instances)))
    elapsed = time.perf_counter() - start
    await scheduler.drain(10)
    return done / elapsed


def bench_model(key: str, zoo: Path, device: str, slots: int, images: int, seconds: float, pool) -> dict:
    filename, folder, max_batch, text = MODELS[key]
    model = zoo / "models" / filename
    files = [p.read_bytes() for p in sorted((zoo / "images" / folder).iterdir()) if p.suffix.lower() in (".jpg", ".jpeg")][:images]
    text = f"max_batch = {max_batch}\n" + text
    rows = {}
    engine, config = _engine(model, text, 1, device, pool)
    rows["stages"] = _stage_medians(engine, files, "image")
    rows["throughput_1"] = asyncio.run(_throughput(engine, config, files, "image", seconds))
    engine.close()
    engine, config = _engine(model, text, slots, device, pool)
    rows["throughput_n"] = asyncio.run(_throughput(engine, config, files, "image", seconds))
    engine.close()
    slowest = max(rows["stages"].values())
    rows["efficiency"] = rows["throughput_n"] / (1000.0 / slowest)
    rows["slowest"] = max(rows["stages"], key=rows["stages"].get)
    return rows


def letterbox_vs_opencv(runs: int = 50) -> dict:
    """1920x1080 BGR frame -> 640x640 letterbox RGB /255 NCHW: calib's OpenCV path vs the fused kernel."""
    from calib.preprocess import preprocess
    from daemon.processing.gpu import GpuPreprocessor
    from daemon.processing.spec import PreprocessConfig

    cfg = PreprocessConfig(size=640, resize="letterbox", pad_value=114, color="RGB", scale=1 / 255)
    frame = np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    spec = cfg.to_spec()
    cpu = []
    for _ in range(runs):
        t0 = time.perf_counter()
        preprocess(frame, spec)
        cpu.append(time.perf_counter() - t0)
    gpu = GpuPreprocessor(cfg, 1)
    wall, kernel, upload = [], [], []
    for i in range(runs + 5):
        t0 = time.perf_counter()
        gpu.run([frame])
        t = gpu.timings()
        if i >= 5:
            wall.append(time.perf_counter() - t0)
            kernel.append(t["kernel_ms"])
            upload.append(t["upload_ms"])
    gpu.close()
    out = {"opencv_ms": statistics.median(cpu) * 1e3, "gpu_kernel_ms": statistics.median(kernel),
           "gpu_upload_ms": statistics.median(upload), "gpu_wall_ms": statistics.median(wall) * 1e3}
    out["speedup_kernel"] = out["opencv_ms"] / out["gpu_kernel_ms"]
    out["speedup_upload_kernel"] = out["opencv_ms"] / (out["gpu_kernel_ms"] + out["gpu_upload_ms"])
    out["speedup_wall"] = out["opencv_ms"] / out["gpu_wall_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, default=ROOT.parent / "shared" / "zoo")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--models", default="efficientnet,yolox")
    p.add_argument("--letterbox-only", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results: dict = {"device": args.device}
    if args.device == "gpu" or args.letterbox_only:
        lb = results["letterbox"] = letterbox_vs_opencv()
        print(f"1920x1080 -> 640x640 letterbox: OpenCV {lb['opencv_ms']:.2f} ms; GPU kernel {lb['gpu_kernel_ms']:.3f} ms "
              f"(+ upload {lb['gpu_upload_ms']:.3f} ms), wall with host staging {lb['gpu_wall_ms']:.2f} ms; "
              f"speed-up kernel {lb['speedup_kernel']:.0f}x, upload+kernel {lb['speedup_upload_kernel']:.1f}x, "
              f"wall {lb['speedup_wall']:.1f}x")
    if not args.letterbox_only:
        pool = ThreadPoolExecutor(4, thread_name_prefix="bench-decode")
        print(f"{'model':<13}{'decode ms':>10}{'pre ms':>8}{'infer ms':>10}{'post ms':>9}{'1 slot/s':>10}"
              f"{f'{args.slots} slots/s':>11}{'1/slowest':>11}{'efficiency':>12}")
        for key in args.models.split(","):
            r = results[key] = bench_model(key, args.zoo, args.device, args.slots, args.images, args.seconds, pool)
            s = r["stages"]
            print(f"{key:<13}{s['decode']:>10.2f}{s['preprocess']:>8.2f}{s['infer']:>10.2f}{s['postprocess']:>9.2f}"
                  f"{r['throughput_1']:>10.1f}{r['throughput_n']:>11.1f}{1000 / max(s.values()):>11.1f}"
                  f"{r['efficiency']:>12.2f}   (slowest: {r['slowest']})")
        pool.shutdown()
        print(f"processing on the {args.device}; inference on ONNX Runtime CPU; stage medians over single images "
              f"through one slot; throughput with 2 x slots requests in flight for {args.seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
