"""Live precision monitor: what it costs the serving throughput, and how fast it sees a shift.

Part 1, cost: EfficientNet-Lite0 INT8 (CPU target, calibrated on the zoo's calibration photos)
served by one tegrad per setting — monitor off, and shadow_rate 0 / 0.01 / 0.05 / 0.2 (default
CPU budget, 0.5 cores) — all running at once and measured in alternating rounds (medians), each
at the same concurrency on the same preprocessed evaluation images. Prints throughput and the
ratio to "off".

Part 2, drift: one tegrad with shadow_rate 1.0 and a window of 100; for each shift of the
evaluation images (brightened, darkened, blurred, and none) it sends one image at a time and
reads the gauges after each compared sample: from which sample on the input drift score stays
above 0.1 (moderate) and 0.25 (large), and the top-1 agreement below 0.97 (the alert rule
TegradPrecisionAgreementLow), to the end of the run.

    python bench/monitor.py                 # about 3 minutes on 2 cores
    python bench/monitor.py --quick
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tables import table  # noqa: E402
from tests.interop.conftest import start_server  # noqa: E402  (tritonclient side: no daemon.protogen)

ZOO = ROOT.parent / "shared" / "zoo"
SETTINGS = {"off": None, "0": 0.0, "0.01": 0.01, "0.05": 0.05, "0.2": 0.2}
PREPROCESS = """
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
top_k = 1
"""


def _images(folder: Path, limit: int) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]


def _model_dir(root: Path, monitor: str | None) -> Path:
    from calib import algorithms
    from calib.cache import CalibrationCache
    from calib.observe import observe
    from calib.preprocess import PRESETS

    d = root / "effnet"
    (d / "1").mkdir(parents=True)
    shutil.copy(ZOO / "models" / "efficientnet-lite0.onnx", d / "1" / "model.onnx")
    cache = root.parent / "calib.json"
    if not cache.exists():
        obs = observe(d / "1" / "model.onnx", str(ZOO / "images" / "calib"), spec=PRESETS["efficientnet-lite0"],
                      batch_size=8, progress=False)
        CalibrationCache(algorithms.compute_all(obs, "entropy"), "entropy", num_samples=obs.num_samples,
                         model_sha256=obs.model_sha256, source=dict(obs.source or {})).save(cache)
    shutil.copy(cache, d / "calib.json")
    config = 'precision = "int8"\ncalibration_cache = "calib.json"\nmax_batch = 8\ninstances = 1\n' + PREPROCESS
    if monitor is not None:
        config += "\n[monitor]\n" + monitor
    (d / "config.toml").write_text(config)
    return root


def _tensors(images: list[Path]) -> list[np.ndarray]:
    from calib.preprocess import PRESETS, load_image, preprocess

    return [preprocess(load_image(p), PRESETS["efficientnet-lite0"])[0][None] for p in images]


def _scrape(server, name: str, **labels: str) -> float | None:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _drive(client, inputs_of, seconds: float, concurrency: int) -> float:
    import tritonclient.grpc as grpcclient

    done = [0] * concurrency
    stop = threading.Event()

    def worker(i: int) -> None:
        with grpcclient.InferenceServerClient(client) as c:
            k = i
            while not stop.is_set():
                c.infer("effnet", inputs_of(k))
                done[i] += 1
                k += concurrency

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def cost(tmp: Path, tensors: list[np.ndarray], seconds: float, rounds: int, concurrency: int) -> None:
    import tritonclient.grpc as grpcclient

    servers = {}
    for name, rate in SETTINGS.items():
        monitor = None if rate is None else f"shadow_rate = {rate}\n"
        repo = _model_dir(tmp / f"cost-{name}" / "repo", monitor)
        servers[name] = start_server(repository=repo, state_dir=tmp / f"cost-{name}" / "state",
                                     args=("--engine-cache-dir", str(tmp / "engines")))
    try:
        requests = []
        for x in tensors:
            inp = grpcclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            requests.append([inp])

        def inputs_of(k: int):
            return requests[k % len(requests)]

        results: dict[str, list[float]] = {n: [] for n in servers}
        for server in servers.values():
            _drive(server.url, inputs_of, 2.0, concurrency)  # warm-up
        for _ in range(rounds):
            for name, server in servers.items():
                results[name].append(_drive(server.url, inputs_of, seconds, concurrency))
        off = float(np.median(results["off"]))
        rows = []
        for name, server in servers.items():
            thr = float(np.median(results[name]))
            compared = _scrape(server, "tegrad_precision_samples_total", model="effnet", result="compared") or 0
            dropped = _scrape(server, "tegrad_precision_samples_total", model="effnet", result="dropped") or 0
            rows.append((name, f"{thr:.1f}", f"{thr / off:.3f}", f"{compared:.0f}", f"{dropped:.0f}"))
        print(f"\nServing throughput with the monitor (EfficientNet-Lite0 int8, CPU, concurrency {concurrency}, "
              f"{rounds} x {seconds:g} s rounds, medians)")
        print(table(("shadow_rate", "infer/s", "vs off", "compared", "dropped"), rows))
    finally:
        for server in servers.values():
            server.stop()


def _shifts(images: list[Path]) -> dict[str, list[np.ndarray]]:
    from calib.preprocess import PRESETS, preprocess

    spec = PRESETS["efficientnet-lite0"]
    raw = [cv2.imread(str(p)) for p in images]
    out = {}
    for name, fn in (("none", lambda im: im),
                     ("brightened x1.6", lambda im: cv2.convertScaleAbs(im, alpha=1.6, beta=30)),
                     ("darkened x0.4", lambda im: cv2.convertScaleAbs(im, alpha=0.4, beta=0)),
                     ("blurred (gaussian 9x9)", lambda im: cv2.GaussianBlur(im, (9, 9), 0))):
        out[name] = [preprocess(fn(im), spec)[0][None] for im in raw]
    return out


def drift(tmp: Path, images: list[Path], limit: int) -> None:
    import tritonclient.grpc as grpcclient

    rows = []
    for name, tensors in _shifts(images).items():
        repo = _model_dir(tmp / f"drift-{len(rows)}" / "repo", "shadow_rate = 1.0\nshadow_max_cpu = 1.0\nwindow = 100\n")
        server = start_server(repository=repo, state_dir=tmp / f"drift-{len(rows)}" / "state",
                              args=("--engine-cache-dir", str(tmp / "engines")))
        crossed: dict[str, int | None] = {"moderate": None, "large": None, "top1<0.97": None}
        last = {}
        try:
            with grpcclient.InferenceServerClient(server.url) as client:
                for n, x in enumerate(tensors[:limit], start=1):
                    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x)
                    client.infer("effnet", [inp])
                    deadline = time.monotonic() + 30
                    while (_scrape(server, "tegrad_precision_samples_total", model="effnet", result="compared") or 0) < n:
                        if time.monotonic() > deadline:
                            raise SystemExit("the monitor stopped comparing")
                        time.sleep(0.005)
                    score = _scrape(server, "tegrad_input_drift_score", model="effnet") or 0.0
                    top1 = _scrape(server, "tegrad_precision_agreement", model="effnet", metric="top1_agreement")
                    last = {"drift": score, "top1": top1,
                            "sat": _scrape(server, "tegrad_calibration_saturation_max", model="effnet")}
                    # The sample from which on the reading stays across its threshold to the end: a
                    # window of 20 samples crosses 0.97 by one disagreement, so a first touch says little.
                    for key, beyond in (("moderate", score >= 0.1), ("large", score >= 0.25),
                                        ("top1<0.97", top1 is not None and top1 < 0.97)):
                        if not beyond:
                            crossed[key] = None
                        elif crossed[key] is None:
                            crossed[key] = n
        finally:
            server.stop()
        rows.append((name, *(str(v) if v is not None else f">{limit}" for v in crossed.values()),
                     f"{last['drift']:.3f}", f"{last['top1']:.3f}", f"{last['sat']:.4f}"))
    # Reading: drift >= 0.1 moderate, >= 0.25 large (calib/input_stats.py); "none" is the control.
    print(f"\nSamples until the monitor crosses its thresholds (one image per request, window 100, "
          f"at most {limit} samples)")
    print(table(("shift", "drift>=0.1 from", "drift>=0.25 from", "top1<0.97 from", "final drift", "final top1",
                 "final sat max"), rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--images", type=int, default=200, help="evaluation images per drift scenario")
    p.add_argument("--quick", action="store_true", help="1 round of 3 s, 60 images")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-drift", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.images = 3.0, 1, 60
    if not (ZOO / "models" / "efficientnet-lite0.onnx").exists():
        raise SystemExit(f"{ZOO} not found: this benchmark needs the shared zoo")
    images = _images(ZOO / "images" / "imagenet_eval", args.images)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if not args.skip_cost:
            cost(tmp, _tensors(images[:64]), args.seconds, args.rounds, args.concurrency)
        if not args.skip_drift:
            drift(tmp, images, args.images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
