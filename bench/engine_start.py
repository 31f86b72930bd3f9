"""Cold start (lowering + engine build) versus warm start (engine cache hit), side by side.

Serves one model with ``tegrad serve`` (a separate process, as in production) from a
repository, twice with the same state directory: the first start finds an empty engine
cache and builds, the second finds the engine. Each time is measured from process start
to the first inference answer a tritonclient gets. Repeats alternate fresh and reused
state directories so both sides see the same machine conditions.

    python bench/engine_start.py                          # EfficientNet-Lite0 int8 on the CPU backend
    python bench/engine_start.py --precision fp32 --repeats 5
    python bench/engine_start.py --model daemon/models/digits/1/model.onnx --calibration daemon/models/digits/calib.json

Without --calibration, the bench calibrates the model on the zoo's images/calib (entropy) first;
that is not part of either timing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.interop.conftest import start_server  # noqa: E402  (tritonclient-side helpers, no daemon.protogen)

ZOO = ROOT.parent / "shared" / "zoo"


def _calibrate(model: Path, out: Path) -> Path:
    from calib import algorithms
    from calib.cache import CalibrationCache
    from calib.observe import observe
    from calib.preprocess import PRESETS

    spec = PRESETS["efficientnet-lite0"]
    obs = observe(str(model), ZOO / "images" / "calib", spec=spec, batch_size=8, progress=False)
    cache = CalibrationCache(amax=algorithms.compute_all(obs, "entropy"), algorithm="entropy",
                             num_samples=obs.num_samples, model_sha256=obs.model_sha256, preprocess=spec.to_dict())
    cache.save(out)
    return out


def _repo(root: Path, model: Path, precision: str, calibration: Path | None, instances: int) -> Path:
    dst = root / "m"
    (dst / "1").mkdir(parents=True)
    shutil.copy(model, dst / "1" / "model.onnx")
    lines = [f'precision = "{precision}"', "max_batch = 8", f"instances = {instances}"]
    if calibration is not None:
        shutil.copy(calibration, dst / "calib.json")
        lines.append('calibration_cache = "calib.json"')
    (dst / "config.toml").write_text("\n".join(lines) + "\n")
    return root


def _first_answer(repo: Path, state: Path, shape: list[int]) -> tuple[float, str]:
    import tritonclient.grpc as grpcclient

    t0 = time.perf_counter()
    server = start_server(repository=repo, state_dir=state, wait_ready=False, timeout=1800)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    try:
        with grpcclient.InferenceServerClient(server.url) as c:
            inp = grpcclient.InferInput("input", shape, "FP32")
            inp.set_data_from_numpy(x)
            while True:
                try:
                    c.infer("m", [inp])
                    break
                except Exception:  # not ready yet: building or loading
                    time.sleep(0.005)
            elapsed = time.perf_counter() - t0
            engine = c.get_model_config("m").config.parameters["engine_id"].string_value
    finally:
        rc = server.stop()
        if rc != 0:
            print(server.log())
    return elapsed, engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ZOO / "models" / "efficientnet-lite0.onnx")
    p.add_argument("--calibration", type=Path, default=None, help="calibration cache (default: calibrate on the zoo)")
    p.add_argument("--precision", default="int8", choices=["fp32", "fp16", "int8"])
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import onnx

    graph = onnx.load(str(args.model), load_external_data=False).graph
    dims = [d.dim_value or 1 for d in graph.input[0].type.tensor_type.shape.dim]
    with tempfile.TemporaryDirectory(prefix="tegrad-engine-start-") as tmp:
        work = Path(tmp)
        calibration = args.calibration
        if args.precision == "int8" and calibration is None:
            t0 = time.perf_counter()
            calibration = _calibrate(args.model, work / "calib.json")
            print(f"calibrated on {ZOO / 'images' / 'calib'} in {time.perf_counter() - t0:.1f} s (not timed below)")
        repo = _repo(work / "repo", args.model, args.precision, calibration if args.precision == "int8" else None,
                     args.instances)
        cold, warm = [], []
        for i in range(args.repeats):
            state = work / f"state{i}"
            c, engine_cold = _first_answer(repo, state, dims)
            w, engine_warm = _first_answer(repo, state, dims)
            assert engine_cold == engine_warm, "the warm start must serve the engine the cold start built"
            cold.append(c)
            warm.append(w)
            print(f"run {i + 1}: cold {c:.2f} s, warm {w:.2f} s (engine {engine_cold})")
    cm, wm = statistics.median(cold), statistics.median(warm)
    print()
    print(f"{args.model.name} {args.precision}, ONNX Runtime CPU backend, {args.instances} instance(s), "
          f"median of {args.repeats}: process start -> first answer")
    print(f"{'':<12}{'median s':>10}{'min s':>10}{'max s':>10}")
    print(f"{'cold start':<12}{cm:>10.2f}{min(cold):>10.2f}{max(cold):>10.2f}")
    print(f"{'warm start':<12}{wm:>10.2f}{min(warm):>10.2f}{max(warm):>10.2f}")
    print(f"cold / warm = {cm / wm:.1f}x; warm start under 2 s: {'MET' if wm < 2.0 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
