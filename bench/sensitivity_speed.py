"""Sensitivity analysis cost, side by side in one run: the whole-graph path vs subgraphs + early stop.

For each model (YOLOX-Nano on the COCO images, EfficientNet-Lite0 on the ImageNet images of the
zoo), with the same calibration cache and the same data slice:

* ``whole``: every layer's graph run whole on the whole slice (what ``tegrad sensitivity`` did
  before: ``--full-graph --chunk-samples 0``);
* ``subgraph``: only the subgraph each layer changes, fed with cached FP32 tensors, whole slice
  (``--chunk-samples 0``) — same numbers, less work;
* ``default``: subgraphs and the early stop (chunks of 16 samples, stop when the top 10 keep
  their order for one more chunk), as ``tegrad sensitivity`` runs now.

Reported: wall seconds, CPU seconds of the process (all threads), the load average around each,
samples used, the largest per-layer difference of ``rel_error`` against ``whole`` and the
overlap of the top 10. On a machine others load, compare CPU seconds, not wall time.

    python bench/sensitivity_speed.py                    # both models, 100 samples each
    python bench/sensitivity_speed.py --models yolox --max-samples 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tables import say, table  # noqa: E402
from calib import sensitivity  # noqa: E402
from calib.cache import CalibrationCache  # noqa: E402
from calib.cli import main as calib_main  # noqa: E402
from calib.datasets import as_source, batches  # noqa: E402
from calib.preprocess import PreprocessSpec  # noqa: E402

ZOO = ROOT.parent / "shared" / "zoo"
MODELS = {
    "yolox": ("yolox_nano.onnx", "yolox", "coco_val2017", "detection", 1),
    "lite0": ("efficientnet-lite0.onnx", "efficientnet-lite0", "imagenet_eval", "classification", 8),
}
VARIANTS = {
    "whole": {"fast": False, "chunk_samples": None, "stable_top": 0},
    "subgraph": {"fast": True, "chunk_samples": None, "stable_top": 0},
    "default": {},
}


class _Feeds:
    def __init__(self, source, name, size):
        self.source, self.name, self.size = source, name, size

    def __iter__(self):
        return batches(self.source, self.name, self.size)


def _cache(model: Path, preset: str, work: Path) -> CalibrationCache:
    out = work / f"{model.stem}.calib.json"
    if not out.exists():
        rc = calib_main(["calibrate", str(model), "--data", str(ZOO / "images" / "calib"), "--preset", preset,
                         "-o", str(out), "--no-progress"])
        if rc:
            raise SystemExit(f"calibrate {model} failed ({rc})")
    return CalibrationCache.load(out)


def run_model(key: str, max_samples: int, work: Path, variants: list[str]) -> list[dict]:
    import onnx

    file, preset, images, task, batch = MODELS[key]
    model = ZOO / "models" / file
    cache = _cache(model, preset, work)
    spec = PreprocessSpec.from_dict(cache.preprocess)
    name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    data = _Feeds(as_source(ZOO / "images" / images, spec=spec), name, batch)
    results = []
    reference = None
    for v in variants:
        load0 = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        report = sensitivity.analyze(model, cache.amax, data, max_samples=max_samples, task=task, **VARIANTS[v])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows = {r.layer: r.rel_error for r in report.rows}
        top = [r.layer for r in report.rows[:10]]
        if reference is None:
            reference = (rows, top)
        diff = max(abs(rows[k] - reference[0][k]) for k in rows)
        results.append({"model": key, "variant": v, "layers": len(rows), "samples": report.samples,
                        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                        "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
                        "max_rel_error_diff": diff, "top10_overlap": len(set(top) & set(reference[1])),
                        "top10_same_order": top == reference[1], "top10": top})
        say(f"{key} {v}: {wall:.0f} s wall, {cpu:.0f} s CPU, {report.samples} samples, "
            f"load {load0:.1f} → {os.getloadavg()[0]:.1f}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="yolox,lite0", help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--variants", default="whole,subgraph,default",
                   help="comma list of: " + ", ".join(VARIANTS) + " (the first is the reference)")
    p.add_argument("--max-samples", type=int, default=100)
    p.add_argument("--work", help="folder for the calibration caches (default: a temporary one)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for key in args.models.split(","):
            rows += run_model(key.strip(), args.max_samples, work, [v.strip() for v in args.variants.split(",")])
    cols = ["model", "variant", "layers", "samples", "wall_s", "cpu_s", "load_before", "load_after",
            "max_rel_error_diff", "top10_overlap", "top10_same_order"]
    print(table(cols, [[r[c] for c in cols] for r in rows]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
