"""Precision plans that keep the speed: the old budget against the planner's, and ``tegrad plan`` end to end.

Sections (one run, on the benchmark zoo):

1. EfficientNet-Lite0, entropy calibration on ``images/calib``: the sensitivity ranking (single,
   CPU target) made once, then two plans from it:
   - *before*: linear growth until top-1 agreement >= 0.99 (point estimate) on the calibration
     slice, as ``tegrad sensitivity`` did;
   - *after*: :mod:`calib.planner`'s default budget (top-1 drop <= 2 points, 80 % Wilson bound),
     bisection, on the odd half of ``images/imagenet_eval`` (held out from calibration).
   Layers and MACs kept out of INT8, whole-model evaluations, top-1 agreement with FP32 on all
   500 eval images and on the even half no plan saw, and the CPU time of FP32 / plain INT8 /
   both mixed graphs on one batch, run interleaved (median of ``--repeats``; ratios).
2. ``tegrad plan`` on EfficientNet-Lite0 (ImageNet eval images, calibrated on ``images/calib``)
   and YOLOX-Nano (COCO images, ``--task detection``, score 0.3, NMS 0.45): the paragraph it
   prints, its outcome and wall time.

    python bench/plan.py                     # both sections
    python bench/plan.py --sections 2 --json out.json

The machine may be shared: load averages are printed with every timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tables import say as _say  # noqa: E402
from bench.tables import table as _table  # noqa: E402
from calib import algorithms, planner, sensitivity  # noqa: E402
from calib.datasets import ImageFolder  # noqa: E402
from calib.evaluate import compare_outputs, run_batches  # noqa: E402
from calib.observe import observe  # noqa: E402
from calib.preprocess import PRESETS  # noqa: E402

CALIB_BATCH = 9
EVAL_BATCH = 8


def _load_avg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def _stack(folder: Path, spec, files: list[Path]) -> np.ndarray:
    src = ImageFolder(folder, spec)
    src.files = list(files)
    return np.stack([src.load(i) for i in range(len(src))]).astype(np.float32)


def _chunks(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


def section_lite0(args: argparse.Namespace, zoo: Path, results: dict) -> None:
    _say("=" * 100)
    _say("1. EfficientNet-Lite0: plan before (agreement >= 0.99 point estimate, linear) and after (planner default)")
    _say("=" * 100)
    model = zoo / "models" / "efficientnet-lite0.onnx"
    spec = PRESETS["efficientnet-lite0"]
    calib_dir, eval_dir = zoo / "images" / "calib", zoo / "images" / "imagenet_eval"
    t0 = time.perf_counter()
    obs = observe(str(model), ImageFolder(calib_dir, spec), batch_size=CALIB_BATCH, progress=False)
    amax = algorithms.compute_all(obs, "entropy")
    calib_files = ImageFolder(calib_dir, spec).files
    eval_files = ImageFolder(eval_dir, spec).files[: args.limit_eval]
    slice_data = _chunks(_stack(calib_dir, spec, calib_files[::2]), CALIB_BATCH)
    plan_half = _chunks(_stack(eval_dir, spec, eval_files[1::2]), EVAL_BATCH)
    unseen_half = _chunks(_stack(eval_dir, spec, eval_files[0::2]), EVAL_BATCH)
    _say(f"calibration + data {time.perf_counter() - t0:.0f} s; load {_load_avg()}")

    base = planner.prepared(str(model))
    t0 = time.perf_counter()
    report = sensitivity.analyze(base, amax, slice_data, method="single", target="cpu", progress=args.progress)
    t_rank = time.perf_counter() - t0
    order = [r.layer for r in report.rows]
    _say(f"ranking: {len(order)} layers on {sum(len(b) for b in slice_data)} calibration images, {t_rank:.0f} s")

    plans: dict[str, planner.PrecisionPlan] = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    plans["before"] = planner.grow(order, base, amax, slice_data, planner.Budget(target_drop=0.01, confidence=0.5),
                                   search="linear", target="cpu", exclude_precision="fp32", progress=args.progress)
    seconds["before"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plans["after"] = planner.grow(order, base, amax, plan_half, planner.Budget(), search="bisect", target="cpu",
                                  exclude_precision="fp32", progress=args.progress)
    seconds["after"] = time.perf_counter() - t0

    graphs = {"fp32": base, "int8": planner.graph_for(base, amax, (), "cpu", None)}
    for name, plan in plans.items():
        graphs[name] = planner.graph_for(base, amax, plan.excluded, "cpu", "fp32" if plan.excluded else None)
    ref_all = run_batches(base, plan_half + unseen_half)
    ref_unseen = ref_all[len(plan_half):]
    rows, out = [], {"ranking_seconds": t_rank, "load_average": _load_avg()}
    outputs = {name: run_batches(g, plan_half + unseen_half) for name, g in graphs.items() if name != "fp32"}
    speed = planner.measure_speed(graphs, unseen_half[0], repeats=args.repeats)
    for name in ("int8", "before", "after"):
        r_all = compare_outputs(ref_all, outputs[name])
        r_unseen = compare_outputs(ref_unseen, outputs[name][len(plan_half):])
        plan = plans.get(name)
        share = plan.share if plan else planner.int8_share(base, (), "cpu")
        s = speed["seconds"]
        rows.append([
            {"int8": "plain INT8", "before": "before: agree>=0.99 (point), linear",
             "after": "after: drop<=2pt (80% bound), bisect"}[name],
            f"{share['total_layers'] - share['int8_layers']}/{share['total_layers']}",
            f"{share['int8_mac_share']:.1%}",
            str(plan.evaluations) if plan else "-",
            f"{seconds[name]:.0f}" if plan else "-",
            f"{r_all.top1_agreement:.4f}", f"{r_unseen.top1_agreement:.4f}",
            f"{s['fp32'] / s[name]:.2f}x", f"{s['int8'] / s[name]:.2f}x",
        ])
        out[name] = {"excluded": plan.excluded if plan else [], "share": share,
                     "evaluations": plan.evaluations if plan else 0, "plan_seconds": seconds.get(name),
                     "agreement_500": r_all.top1_agreement, "agreement_unseen_250": r_unseen.top1_agreement,
                     "cosine_500": r_all.cosine, "met_on_its_data": plan.met if plan else None,
                     "speedup_vs_fp32": s["fp32"] / s[name], "speed_vs_int8": s["int8"] / s[name]}
    _say(_table(["plan", "out of INT8", "INT8 MACs", "evals", "plan s", "agree 500", "agree unseen 250",
                 "vs FP32", "vs INT8"], rows))
    _say(f"CPU: batch {len(unseen_half[0])}, median of {args.repeats} interleaved runs "
         f"(FP32 {speed['seconds']['fp32'] * 1e3:.1f} ms); load {_load_avg()}")
    out["speed"] = speed
    results["lite0"] = out


def _tegrad_plan(label: str, argv: list[str], work: Path) -> dict[str, Any]:
    out = work / f"{label}.json"
    cmd = [sys.executable, "-m", "calib.cli", "plan", *argv, "--json", str(out), "--no-progress"]
    load_before = _load_avg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    _say(f"$ tegrad plan {' '.join(argv)}")
    _say(proc.stdout.rstrip())
    if proc.returncode not in (0, 3):
        _say(proc.stderr[-3000:])
    doc = json.loads(out.read_text()) if out.exists() else {}
    _say(f"exit {proc.returncode}, wall {wall:.0f} s, load before {load_before}, after {_load_avg()}\n")
    return {"exit": proc.returncode, "wall_seconds": wall, "outcome": doc.get("outcome"),
            "paragraph": doc.get("paragraph"), "plan": (doc.get("steps") or {}).get("plan"),
            "ptq": (doc.get("steps") or {}).get("ptq")}


def section_cli(args: argparse.Namespace, zoo: Path, results: dict, work: Path) -> None:
    _say("=" * 100)
    _say("2. tegrad plan on EfficientNet-Lite0 and YOLOX-Nano")
    _say("=" * 100)
    imgs = zoo / "images"
    lite = ["--data", str(imgs / "imagenet_eval"), "--calib-data", str(imgs / "calib"), "--preset",
            "efficientnet-lite0", *args.plan_args.split()]
    if args.limit_eval:
        lite += ["--limit", str(args.limit_eval)]
    results["plan_lite0"] = _tegrad_plan("lite0", [str(zoo / "models" / "efficientnet-lite0.onnx"), *lite], work)
    yolo = ["--data", str(imgs / "coco_val2017"), "--calib-data", str(imgs / "calib"), "--preset", "yolox",
            "--task", "detection", "--score-threshold", "0.3", "--iou-threshold", "0.45",
            "--max-samples", str(args.yolox_max_samples), *args.plan_args.split()]
    results["plan_yolox"] = _tegrad_plan("yolox", [str(zoo / "models" / "yolox_nano.onnx"), *yolo], work)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default=str(ROOT.parent / "shared" / "zoo"), help="benchmark zoo folder")
    p.add_argument("--sections", default="1,2", help="comma-separated subset of 1,2")
    p.add_argument("--limit-eval", type=int, default=None, help="first N eval images only (quick run)")
    p.add_argument("--repeats", type=int, default=15, help="section 1: interleaved timed rounds")
    p.add_argument("--yolox-max-samples", type=int, default=16, help="section 2: images ranking YOLOX layers")
    p.add_argument("--plan-args", default="", help="section 2: extra flags for tegrad plan (e.g. '--target cpu')")
    p.add_argument("--progress", action="store_true", help="progress bars (stderr)")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    zoo = Path(args.zoo)
    if not (zoo / "models").is_dir():
        p.error(f"{zoo}: no models/ folder (pass --zoo)")
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_average_start": _load_avg()}
    _say(f"tegrad plan bench; {os.cpu_count()} CPUs, load average {_load_avg()}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tegrad-plan-bench-") as tmp:
        if "1" in sections:
            section_lite0(args, zoo, results)
        if "2" in sections:
            section_cli(args, zoo, results, Path(tmp))
    results["total_seconds"] = time.perf_counter() - t0
    _say(f"total {results['total_seconds'] / 60:.1f} min, load average {_load_avg()}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
