"""INT8 accuracy, calibration cost and CPU latency of tegrad's calibration vs ONNX Runtime's, side by side.

Sections (all in one run, on the benchmark zoo):

1. EfficientNet-Lite0 on 500 ImageNet images: FP32, tegrad INT8 per calibration algorithm,
   tegrad ``mixed`` from a sensitivity plan, ONNX Runtime ``quantize_static`` (QDQ, TensorRT-style
   symmetric S8) with MinMax / Entropy / Percentile. Top-1, delta, agreement and logit cosine vs FP32.
2. Calibration cost: wall time and peak RSS of tegrad's observe + compute vs ONNX Runtime's
   calibrators, each in its own subprocess; memory vs number of calibration images.
3. CPU latency: FP32 vs INT8 graphs on ONNX Runtime, batch 1 and 8, medians over repeated blocks.
4. YOLOX-Nano on 100 COCO images: F1 of INT8 detections against the FP32 detections, per algorithm for
   the CPU and the TensorRT target (run on ONNX Runtime, FP32 glue), the mixed plan, INT8 layer share.
5. Summary of the targets.
6. TensorRT-target FP16 glue: type census (FP32 / FP16 compute nodes, Pads) of the INT8 and mixed
   graphs of EfficientNet-Lite0 and YOLOX-Nano with FP32 glue (as before) and FP16 glue, and the
   EfficientNet-Lite0 top-1 agreement of FP16-glue INT8 with FP32-glue INT8 (both run on ORT) for the
   max, mse and entropy caches, with TensorRT's fused arithmetic emulated, and the logit margins of
   the images that flip.
8. ModelOpt interop (bench/modelopt_interop.py, when ``nvidia-modelopt`` is importable; else one
   skip line): EfficientNet-Lite0 quantized by ModelOpt's ONNX PTQ (entropy, FP16 and FP32 glue),
   served as is through tegrad over gRPC, against the same file run directly on ONNX Runtime.

    python bench/quant_accuracy.py                       # everything (~10 min on 2 cores)
    python bench/quant_accuracy.py --limit-eval 100 --sections 1,3
    python bench/quant_accuracy.py --skip-ort --json out.json

Calibration always uses ``images/calib`` of the zoo; evaluation images are never calibrated on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tables import say as _say  # noqa: E402
from bench.tables import table as _table  # noqa: E402
from calib import algorithms, glue, qdq, sensitivity  # noqa: E402
from calib.datasets import ImageFolder, batches  # noqa: E402
from calib.evaluate import EvalResult, compare_outputs, run_batches, session  # noqa: E402
from calib.lower import count_precisions, lower  # noqa: E402
from calib.observe import observe  # noqa: E402
from calib.preprocess import PRESETS  # noqa: E402

METHODS = ("max", "entropy", "percentile", "mse")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
# ORT's histogram calibrators stack every batch into one array, so all batches must be the same
# size: 9 divides 27, 54 and 108. Both tools get the same batches.
CALIB_BATCH = 9
EVAL_BATCH = 16
# What the public YOLOX ONNX demos use (Megvii's demo and Kazuhito00's sample): score 0.3, NMS 0.45.
YOLOX_DETECTION = {"layout": "yolox", "input_hw": (416, 416), "score_threshold": 0.3, "iou_threshold": 0.45}
# Every other calibration image: spread over the (alphabetically grouped) subjects of the folder.
SENSITIVITY_STRIDE = 2
# Section 6 measures the FP16-glue agreement on the caches of these algorithms.
GLUE_METHODS = ("max", "mse", "entropy")


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _load_avg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def _stack(folder: Path, spec, files: list[Path] | None = None) -> tuple[np.ndarray, list[str]]:
    """Every image of ``folder`` (or ``files``), preprocessed, as one array; and the file names."""
    src = ImageFolder(folder, spec)
    if files is not None:
        src.files = list(files)
    arrays = [src.load(i) for i in range(len(src))]
    return np.stack(arrays).astype(np.float32), [p.name for p in src.files]


def _chunks(x: np.ndarray, size: int) -> list[np.ndarray]:
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _row_metrics(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray) -> EvalResult:
    return compare_outputs(ref, out, labels=labels)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime's quantization tool
# ---------------------------------------------------------------------------------------------
def ort_preprocess(src: Path, dst: Path) -> str:
    """ORT's recommended pre-processing (symbolic shape inference, ORT optimisation, ONNX shape inference).

    Symbolic shape inference needs sympy; it matters for transformers, not CNNs, so without
    sympy the step is skipped and the other two still run. Returns what was done.
    """
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        return "quant_pre_process (symbolic shape inference + ORT basic optimisation + ONNX shape inference)"
    except ImportError:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return ("quant_pre_process(skip_symbolic_shape=True): ORT basic optimisation + ONNX shape inference "
                "(sympy not installed; symbolic inference targets transformer models)")


def _ort_reader(folder: Path, spec, input_name: str, batch_size: int, limit: int | None = None):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        """Same images, preprocessing and batch size as tegrad's observe, decoded lazily."""

        def __init__(self) -> None:
            self._it = None

        def get_next(self):
            if self._it is None:
                self._it = batches(folder, input_name=input_name, batch_size=batch_size, spec=spec, limit=limit)
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = None

    return Reader()


def ort_quantize(pre: Path, dst: Path, method: str, folder: Path, spec, input_name: str) -> float:
    """ORT quantize_static in its TensorRT-style configuration; returns the seconds it took."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    t0 = time.perf_counter()
    quantize_static(
        str(pre),
        str(dst),
        _ort_reader(folder, spec, input_name, CALIB_BATCH),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return time.perf_counter() - t0


def ort_calibration_tensors(pre: Path, work: Path) -> list[str]:
    """The tensors ORT's calibrator collects by default on ``pre`` (op_types_to_calibrate=None)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    cal = create_calibrator(str(pre), augmented_model_path=str(work / "augmented_probe.onnx"),
                            calibrate_method=CalibrationMethod.MinMax)
    names, _ = cal.select_tensors_to_calibrate(onnx.load(str(pre)))
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# calibration-cost worker (runs in a subprocess so that its peak RSS is its own)
# ---------------------------------------------------------------------------------------------
def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _worker(job: dict) -> dict:
    spec = PRESETS[job["preset"]]
    folder = Path(job["folder"])
    limit = job.get("limit")
    baseline = _proc_status("VmRSS")
    t0 = time.perf_counter()
    if job["tool"] == "tegrad":
        tensors = json.loads(Path(job["tensors"]).read_text()) if job.get("tensors") else None
        method = job["method"]
        obs = observe(job["model"], folder, tensors, batch_size=CALIB_BATCH, spec=spec, limit=limit,
                      histogram=method != "max", progress=False)
        amax = algorithms.compute_all(obs, method)
        count = len(amax)
    else:
        from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

        cal = create_calibrator(job["model"], augmented_model_path=str(Path(job["work"]) / f"aug_{os.getpid()}.onnx"),
                                calibrate_method=getattr(CalibrationMethod, job["method"]))
        cal.collect_data(_ort_reader(folder, spec, job["input_name"], CALIB_BATCH, limit))
        ranges = cal.compute_data()
        count = len(ranges.data) if hasattr(ranges, "data") else len(ranges)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss": _proc_status("VmHWM"), "baseline_rss": baseline, "tensors": count}


def run_worker(job: dict) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(job)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"calibration worker {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.zoo = Path(args.zoo).resolve()
        self.work = work
        self.results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
        self.effnet = self.zoo / "models" / "efficientnet-lite0.onnx"
        self.yolox = self.zoo / "models" / "yolox_nano.onnx"
        self.calib_dir = self.zoo / "images" / "calib"
        self.eff_spec = PRESETS["efficientnet-lite0"]
        self.best: str | None = None
        self.eff_amax: dict[str, dict[str, float]] = {}
        self.models: dict[str, Path] = {}  # cached lowered / quantized EfficientNet graphs
        self.ort_pre: Path | None = None
        self.ort_pre_note = ""
        self.ort_best: str | None = None

    # -- shared pieces, computed once ------------------------------------------------------
    def effnet_amax(self) -> dict[str, dict[str, float]]:
        if not self.eff_amax:
            t0 = time.perf_counter()
            obs = observe(self.effnet, self.calib_dir, None, spec=self.eff_spec,
                          batch_size=CALIB_BATCH, progress=False)
            self.results.setdefault("efficientnet", {})["observe_seconds"] = time.perf_counter() - t0
            self.eff_amax = {m: algorithms.compute_all(obs, m) for m in METHODS}
        return self.eff_amax

    def lowered(self, method: str, target: str = "cpu") -> Path:
        key = f"tegrad_{method}_{target}"
        if key not in self.models:
            model = lower(str(self.effnet), "int8", self.effnet_amax()[method], target=target)
            self.models[key] = _save(model, self.work / f"effnet_{key}.onnx")
        return self.models[key]

    def ort_model(self, method: str) -> Path:
        key = f"ort_{method}"
        if key not in self.models:
            pre = self.ort_preprocessed()
            dst = self.work / f"effnet_{key}.onnx"
            secs = ort_quantize(pre, dst, method, self.calib_dir, self.eff_spec, "input")
            self.results.setdefault("efficientnet", {}).setdefault("ort_quantize_seconds", {})[method] = secs
            self.models[key] = dst
        return self.models[key]

    def ort_preprocessed(self) -> Path:
        if self.ort_pre is None:
            self.ort_pre = self.work / "effnet_ort_pre.onnx"
            self.ort_pre_note = ort_preprocess(self.effnet, self.ort_pre)
            self.results["ort_preprocessing"] = self.ort_pre_note
        return self.ort_pre

    def best_method(self) -> str:
        return self.best or self.args.algorithm

    # -- section 1 ---------------------------------------------------------------------------
    def section_accuracy(self) -> None:
        args = self.args
        _say("=" * 100)
        _say("1. EfficientNet-Lite0 INT8 accuracy (ImageNet eval images; calibrated on images/calib)")
        _say("=" * 100)
        eval_dir = self.zoo / "images" / "imagenet_eval"
        with open(eval_dir / "labels.csv", newline="") as f:
            label_of = {r["filename"]: int(r["class_index"]) for r in csv.DictReader(f)}
        files = sorted(p for p in eval_dir.iterdir() if p.name in label_of)
        if args.limit_eval:
            files = files[: args.limit_eval]
        t0 = time.perf_counter()
        x, names = _stack(eval_dir, self.eff_spec, files)
        labels = np.array([label_of[n] for n in names])
        data = _chunks(x, EVAL_BATCH)
        _say(f"{len(names)} eval images preprocessed in {time.perf_counter() - t0:.1f} s")

        amax = self.effnet_amax()
        obs_s = self.results["efficientnet"]["observe_seconds"]
        _say(f"tegrad observe on {len(ImageFolder(self.calib_dir, self.eff_spec))} calibration images: {obs_s:.1f} s, "
             f"{len(amax['max'])} tensors (what any TensorRT or CPU lowering of it may quantize)")
        ref = run_batches(str(self.effnet), data)
        rows: list[dict[str, Any]] = []
        fp32 = _row_metrics(ref, ref, labels)
        rows.append({"name": "FP32", "result": fp32})

        outs: dict[str, list[np.ndarray]] = {}
        for m in METHODS:
            path = self.lowered(m, "cpu")
            outs[m] = run_batches(str(path), data)
            label = f"tegrad INT8 {m}" + (" (99.99)" if m == "percentile" else "")
            rows.append({"name": label, "method": m, "result": _row_metrics(ref, outs[m], labels)})

        best_row = max((r for r in rows if r.get("method")),
                       key=lambda r: (r["result"].accuracy_candidate, r["result"].cosine))
        self.best = best_row["method"]
        # The TensorRT-target graph (S8 activations, zero point 0) must land on the same grid.
        trt_out = run_batches(str(self.lowered(self.best, "tensorrt")), data)
        trt = _row_metrics(ref, trt_out, labels)
        rows.append({"name": f"tegrad INT8 {self.best}, tensorrt target", "result": trt})
        same = compare_outputs(outs[self.best], trt_out)
        max_diff = max(float(np.abs(a - b).max()) for a, b in zip(outs[self.best], trt_out))

        # mixed precision from the sensitivity plan, on calibration images only
        calib_files = ImageFolder(self.calib_dir, self.eff_spec).files
        slice_files = calib_files[::SENSITIVITY_STRIDE]
        xs, _ = _stack(self.calib_dir, self.eff_spec, slice_files)
        sdata = _chunks(xs, CALIB_BATCH)
        t0 = time.perf_counter()
        report = sensitivity.analyze(str(self.effnet), amax[self.best], sdata, method="single", target="cpu")
        t_an = time.perf_counter() - t0
        budgets = [float(b) for b in args.min_top1.split(",")]
        plans = []
        for i, budget in enumerate(budgets):
            t0 = time.perf_counter()
            plan = sensitivity.plan(report, str(self.effnet), amax[self.best], sdata, min_top1=budget,
                                    exclude_precision="fp32", target="cpu")
            t_plan = time.perf_counter() - t0
            info: dict[str, Any] = {
                "budget_top1": budget, "plan_seconds": t_plan, "excluded": plan.excluded,
                "int8_layers": plan.int8_layers, "total_layers": plan.total_layers, "plan_met": plan.met,
                "plan_achieved": plan.achieved,
            }
            if plan.excluded:
                mixed = lower(str(self.effnet), "mixed", amax[self.best], exclude=plan.excluded,
                              exclude_precision="fp32", target="cpu")
                mpath = _save(mixed, self.work / f"effnet_tegrad_mixed{i}_cpu.onnx")
                if i == 0:
                    self.models["tegrad_mixed_cpu"] = mpath
                info["precisions"] = count_precisions(mixed)
                mres = _row_metrics(ref, run_batches(str(mpath), data), labels)
            else:
                mres = best_row["result"]
                info["precisions"] = count_precisions(onnx.load(str(self.lowered(self.best, "cpu"))))
            rows.append({"name": f"tegrad mixed ({self.best}, agree>={budget:g}: {plan.int8_layers}/"
                                 f"{plan.total_layers} INT8)", "result": mres, "mixed": i == 0})
            plans.append(info)
        mixed_info: dict[str, Any] = {"slice_images": len(slice_files), "analysis_seconds": t_an, "plans": plans}

        if not args.skip_ort:
            for m in ORT_METHODS:
                path = self.ort_model(m)
                rows.append({"name": f"ORT quantize_static {m}", "ort": m,
                             "result": _row_metrics(ref, run_batches(str(path), data), labels)})
            ort_rows = [r for r in rows if r.get("ort")]
            self.ort_best = max(ort_rows, key=lambda r: (r["result"].accuracy_candidate, r["result"].cosine))["ort"]

        table = []
        for r in rows:
            res: EvalResult = r["result"]
            acc = res.accuracy_candidate
            delta = (acc - fp32.accuracy_candidate) * 100
            table.append([r["name"], f"{acc:.4f}", f"{delta:+.1f}", f"{res.top1_agreement:.4f}", f"{res.cosine:.5f}"])
        _say()
        _say(_table(["model", "top-1", "Δ pt", "agree", "cosine"], table))
        _say()
        _say(f"best tegrad algorithm (highest eval top-1, then cosine): {self.best}")
        _say(f"cpu vs tensorrt target of tegrad {self.best}: top-1 agreement {same.top1_agreement:.4f}, "
             f"cosine {same.cosine:.7f}, max |Δlogit| {max_diff:.2e}")
        _say(f"mixed: sensitivity 'single' (target cpu) on {len(slice_files)} calibration images (every "
             f"{SENSITIVITY_STRIDE}nd file of images/calib; no eval image), amax = {self.best} from all calibration "
             f"images; analysis {t_an:.1f} s. Plan budget: top-1 agreement with FP32 on that slice; excluded layers "
             "stay FP32 (ORT's CPU provider has no fast FP16)")
        for info in plans:
            _say(f"  budget >= {info['budget_top1']:g}: plan {info['plan_seconds']:.1f} s, INT8 layers "
                 f"{info['int8_layers']}/{info['total_layers']}, budget met: {info['plan_met']}, "
                 f"slice agreement {info['plan_achieved'].get('top1_agreement', float('nan')):.4f}")
            _say(f"    excluded: {', '.join(info['excluded']) if info['excluded'] else '(none)'}")
        _say("  most sensitive layers:")
        for line in report.to_table(limit=8).splitlines()[1:]:
            _say("    " + line)
        if not args.skip_ort:
            _say(f"ORT pre-processing: {self.ort_pre_note}")
            _say("ORT quantize_static: QDQ, per_channel, S8 activations and weights, ActivationSymmetric, "
                 "WeightSymmetric, default op types and calibrator options (Percentile = 99.999), "
                 f"same {CALIB_BATCH}-image batches of the same calibration images")
            secs = self.results["efficientnet"].get("ort_quantize_seconds", {})
            _say("  quantize_static seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
        self.results["efficientnet"].update({
            "eval_images": len(names),
            "rows": [{"name": r["name"], **r["result"].as_dict()} for r in rows],
            "fp32_top1": fp32.accuracy_candidate,
            "best": self.best,
            "ort_best": self.ort_best,
            "cpu_vs_tensorrt": {"top1_agreement": same.top1_agreement, "cosine": same.cosine, "max_abs": max_diff},
            "mixed": mixed_info,
        })
        self._eff_rows = rows
        self._fp32_acc = fp32.accuracy_candidate

    # -- section 2 ---------------------------------------------------------------------------
    def section_cost(self) -> None:
        args = self.args
        _say("=" * 100)
        _say("2. Calibration cost, EfficientNet-Lite0, images/calib (each run in its own subprocess)")
        _say("=" * 100)
        n_all = len(ImageFolder(self.calib_dir, self.eff_spec))
        base = {"preset": "efficientnet-lite0", "folder": str(self.calib_dir), "work": str(self.work)}
        own = {**base, "tool": "tegrad", "model": str(self.effnet)}
        jobs: list[tuple[str, dict]] = [
            ("tegrad entropy, own tensors", {**own, "method": "entropy"}),
        ]
        if not args.skip_ort:
            pre = self.ort_preprocessed()
            ort_names = ort_calibration_tensors(pre, self.work)
            tfile = self.work / "ort_tensors.json"
            tfile.write_text(json.dumps(ort_names))
            same = {**base, "tool": "tegrad", "model": str(pre), "tensors": str(tfile)}
            ortj = {**base, "tool": "ort", "model": str(pre), "input_name": "input"}
            jobs += [
                ("tegrad entropy, ORT's tensors", {**same, "method": "entropy"}),
                ("ORT entropy", {**ortj, "method": "Entropy"}),
            ]
        for n in (27, 54):
            jobs.append((f"tegrad entropy, own tensors, {n} img", {**own, "method": "entropy", "limit": n}))
            if not args.skip_ort:
                jobs.append((f"ORT entropy, {n} img", {**ortj, "method": "Entropy", "limit": n}))
        if not args.skip_cheap_calibrators:
            jobs.append(("tegrad max (min/max only), own", {**own, "method": "max"}))
            if not args.skip_ort:
                jobs += [
                    ("tegrad max (min/max only), ORT's", {**same, "method": "max"}),
                    ("ORT MinMax", {**ortj, "method": "MinMax"}),
                ]
            jobs.append(("tegrad percentile, own", {**own, "method": "percentile"}))
            if not args.skip_ort:
                jobs += [
                    ("tegrad percentile, ORT's", {**same, "method": "percentile"}),
                    ("ORT Percentile", {**ortj, "method": "Percentile"}),
                ]
        _say(f"load average before: {_load_avg()}")
        res: dict[str, dict] = {}
        # The headline runs repeat: peak RSS depends on how many batches happen to be in flight
        # at once (thread timing), and the speed ratio should not hang on one sample.
        repeated = {"tegrad entropy, own tensors", "tegrad entropy, ORT's tensors", "ORT entropy",
                    "tegrad entropy, own tensors, 27 img", "tegrad entropy, own tensors, 54 img"}
        for name, job in jobs:
            runs = [run_worker(job) for _ in range(args.repeats if name in repeated else 1)]
            r = dict(runs[0])
            for key in ("seconds", "peak_rss", "baseline_rss"):
                r[key] = float(np.median([x[key] for x in runs]))
            r["runs"] = len(runs)
            r["peak_range"] = (min(x["peak_rss"] for x in runs), max(x["peak_rss"] for x in runs))
            r["seconds_range"] = (min(x["seconds"] for x in runs), max(x["seconds"] for x in runs))
            r["images"] = job.get("limit") or n_all
            res[name] = r
        _say(f"load average after:  {_load_avg()}")
        mib = 1 << 20
        table = []
        for name, r in res.items():
            spread = "" if r["runs"] == 1 else (f"{r['seconds_range'][0]:.1f}-{r['seconds_range'][1]:.1f} s, "
                                                f"{r['peak_range'][0] / mib:.0f}-{r['peak_range'][1] / mib:.0f} MiB")
            table.append([name, r["images"], r["tensors"], r["runs"], f"{r['seconds']:.1f}", f"{r['peak_rss'] / mib:.0f}",
                          f"{(r['peak_rss'] - r['baseline_rss']) / mib:.0f}", spread])
        _say()
        _say(_table(["calibration run", "images", "tensors", "runs", "wall s", "peak RSS MiB", "above start MiB",
                     "min-max over runs"], table, align="lrrrrrrl"))
        _say(f"(batch {CALIB_BATCH}; wall: from model load to amax of every tensor, image decoding included; "
             "medians where runs > 1; 'above start' = peak RSS minus RSS after imports)")
        summary: dict[str, Any] = {"runs": res}
        if not args.skip_ort:
            o = res["ORT entropy"]["seconds"]
            summary["speedup_own"] = o / res["tegrad entropy, own tensors"]["seconds"]
            summary["speedup_same"] = o / res["tegrad entropy, ORT's tensors"]["seconds"]
            _say(f"ORT entropy / tegrad entropy wall time: {summary['speedup_own']:.1f}x (tegrad's "
                 f"{res['tegrad entropy, own tensors']['tensors']} tensors vs ORT's "
                 f"{res['ORT entropy']['tensors']}), {summary['speedup_same']:.1f}x on the same "
                 f"{res['ORT entropy']['tensors']} tensors")
        peaks = [res[k]["peak_rss"] for k in ("tegrad entropy, own tensors, 27 img", "tegrad entropy, own tensors, 54 img",
                                              "tegrad entropy, own tensors")]
        summary["tegrad_peaks"] = peaks
        # 27 images are 3 batches, fewer than the batches the observe pipeline holds at once
        # (prefetch, session, histogram workers), so that run stays below the steady state.
        summary["flat"] = peaks[2] <= 1.10 * peaks[1]
        summary["growth_mib_per_image_54_108"] = (peaks[2] - peaks[1]) / mib / 54
        _say(f"tegrad peak RSS at 27 / 54 / 108 images: {' / '.join(f'{p / mib:.0f}' for p in peaks)} MiB "
             f"-> {'flat' if summary['flat'] else 'NOT flat'} (criterion: 108-image peak <= 1.10 x 54-image peak; "
             f"{summary['growth_mib_per_image_54_108']:+.1f} MiB per extra image)")
        if not args.skip_ort:
            op = [res[k]["peak_rss"] for k in ("ORT entropy, 27 img", "ORT entropy, 54 img", "ORT entropy")]
            _say(f"ORT    peak RSS at 27 / 54 / 108 images: {' / '.join(f'{p / mib:.0f}' for p in op)} MiB "
                 f"({(op[2] - op[1]) / mib / 54:+.1f} MiB per extra image)")
        self.results["calibration_cost"] = summary

    # -- section 3 ---------------------------------------------------------------------------
    def section_latency(self) -> None:
        args = self.args
        _say("=" * 100)
        _say(f"3. CPU latency, EfficientNet-Lite0, ONNX Runtime CPU EP, default threads ({os.cpu_count()} cores)")
        _say("=" * 100)
        best = self.best_method()
        models: list[tuple[str, Path]] = [("FP32", self.effnet), (f"tegrad INT8 {best} (cpu target, U8 act)",
                                                                  self.lowered(best, "cpu"))]
        if not args.skip_ort:
            om = self.ort_best or "Entropy"
            models.append((f"ORT quantize_static {om} (QDQ, S8 act)", self.ort_model(om)))
        if "tegrad_mixed_cpu" in self.models:
            models.append(("tegrad mixed (cpu target)", self.models["tegrad_mixed_cpu"]))
        models.append((f"tegrad INT8 {best} (tensorrt target, S8 act)", self.lowered(best, "tensorrt")))
        imgs, _ = _stack(self.calib_dir, self.eff_spec, ImageFolder(self.calib_dir, self.eff_spec).files[:8])
        sessions = [(name, session(str(path))) for name, path in models]
        out: dict[str, dict[str, float]] = {}
        loads = [_load_avg()]
        rounds = 3
        for bs in (1, 8):
            feed = {"input": imgs[:bs]}
            times: dict[str, list[float]] = {name: [] for name, _ in sessions}
            # Each model runs in its own block (ORT's idle pool threads spin for a while after a run and
            # would steal the cores from the next session if runs were interleaved); the blocks repeat
            # in rounds so slow drifts of the machine's load hit every model alike.
            for _ in range(rounds):
                for name, s in sessions:
                    for _ in range(args.warmup):
                        s.run(None, feed)
                    for _ in range(-(-args.runs // rounds)):
                        t0 = time.perf_counter()
                        s.run(None, feed)
                        times[name].append(time.perf_counter() - t0)
            for name, ts in times.items():
                out.setdefault(name, {})[f"b{bs}"] = float(np.median(ts)) * 1000
            loads.append(_load_avg())
        fp = out["FP32"]
        table = []
        for name, _ in sessions:
            t = out[name]
            table.append([name, f"{t['b1']:.2f}", f"{fp['b1'] / t['b1']:.2f}x", f"{t['b8']:.2f}",
                          f"{fp['b8'] / t['b8']:.2f}x", f"{t['b8'] / 8:.2f}"])
        _say()
        _say(_table(["model", "b1 ms", "vs FP32", "b8 ms", "vs FP32", "b8 ms/img"], table))
        _say(f"median of {rounds} x {-(-args.runs // rounds)} runs per model and batch, each block after "
             f"{args.warmup} warm-up runs; load average "
             f"(1/5/15 min) before / after b1 / after b8: {' | '.join(loads)}")
        self.results["latency_ms"] = out
        self.results["latency_load"] = loads
        self._lat_int8 = (fp["b1"] / out[models[1][0]]["b1"], fp["b8"] / out[models[1][0]]["b8"])

    # -- section 4 ---------------------------------------------------------------------------
    def section_yolox(self) -> None:
        args = self.args
        _say("=" * 100)
        _say("4. YOLOX-Nano INT8 detections vs FP32 detections (COCO val2017 images; calibrated on images/calib)")
        _say("=" * 100)
        spec = PRESETS["yolox"]
        coco = self.zoo / "images" / "coco_val2017"
        files = ImageFolder(coco, spec).files
        if args.limit_eval:
            files = files[: min(len(files), args.limit_eval)]
        x, _ = _stack(coco, spec, files)
        data = _chunks(x, 1)
        t0 = time.perf_counter()
        obs = observe(self.yolox, self.calib_dir, None, spec=spec, batch_size=1,
                      progress=False)
        t_obs = time.perf_counter() - t0
        amax = {m: algorithms.compute_all(obs, m) for m in METHODS}
        ref = run_batches(str(self.yolox), data)
        info: dict[str, Any] = {"observe_seconds": t_obs, "images": len(files)}
        rows = []
        fp = compare_outputs(ref, ref, task="detection", detection=YOLOX_DETECTION)
        rows.append(("FP32", fp))
        share = {"FP32": "-"}  # INT8 weighted layers / all weighted layers, per row
        for m in METHODS:
            path = _save(lower(str(self.yolox), "int8", amax[m], target="cpu"), self.work / f"yolox_{m}.onnx")
            r = compare_outputs(ref, run_batches(str(path), data), task="detection", detection=YOLOX_DETECTION)
            rows.append((f"tegrad INT8 {m}", r))
            c = count_precisions(path)
            share[rows[-1][0]] = f"{c['int8']}/{sum(c.values())}"
        best_name, best = max(rows[1:], key=lambda nr: (nr[1].f1, nr[1].cosine))
        # The TensorRT-target graph (signed Q/DQ) run on ONNX Runtime with exact kernels; FP32 glue, as
        # ONNX Runtime's CPU provider has no fast FP16 kernels (the numbers differ by FP16 rounding only).
        for m in METHODS:
            path = _save(lower(str(self.yolox), "int8", amax[m], target="tensorrt", glue="fp32"),
                         self.work / f"yolox_{m}_trt.onnx")
            r = compare_outputs(ref, run_batches(str(path), data), task="detection", detection=YOLOX_DETECTION)
            rows.append((f"tegrad INT8 {m} (TensorRT target)", r))
            c = count_precisions(path)
            share[rows[-1][0]] = f"{c['int8']}/{sum(c.values())}"
        best_m = best_name.split()[-1]
        info["best"] = best_m

        if not args.skip_yolox_mixed:
            slice_files = ImageFolder(self.calib_dir, spec).files[::SENSITIVITY_STRIDE * 2]
            xs, _ = _stack(self.calib_dir, spec, slice_files)
            sdata = _chunks(xs, 1)
            t0 = time.perf_counter()
            report = sensitivity.analyze(str(self.yolox), amax[best_m], sdata, method="single", task="detection",
                                         detection=YOLOX_DETECTION, target="cpu")
            t_an = time.perf_counter() - t0
            t0 = time.perf_counter()
            plan = sensitivity.plan(report, str(self.yolox), amax[best_m], sdata, task="detection",
                                    detection=YOLOX_DETECTION, min_f1=args.yolox_min_f1, exclude_precision="fp32",
                                    target="cpu")
            t_plan = time.perf_counter() - t0
            info["mixed"] = {"slice_images": len(slice_files), "analysis_seconds": t_an, "plan_seconds": t_plan,
                             "excluded": plan.excluded, "int8_layers": plan.int8_layers,
                             "total_layers": plan.total_layers, "plan_met": plan.met}
            if plan.excluded:
                mixed = lower(str(self.yolox), "mixed", amax[best_m], exclude=plan.excluded, exclude_precision="fp32",
                              target="cpu")
                mpath = _save(mixed, self.work / "yolox_mixed.onnx")
                r = compare_outputs(ref, run_batches(str(mpath), data), task="detection", detection=YOLOX_DETECTION)
            else:
                r = best
            rows.append((f"tegrad mixed ({best_m}, {len(plan.excluded)} FP32)", r))
            # counted in the lowered graph: placement rules keep layers in float the plan did not exclude
            c = count_precisions(mpath if plan.excluded else self.work / f"yolox_{best_m}.onnx")
            share[rows[-1][0]] = f"{c['int8']}/{sum(c.values())}"
        table = []
        for name, r in rows:
            table.append([name, r.detections_candidate, f"{r.precision:.3f}", f"{r.recall:.3f}", f"{r.f1:.3f}",
                          f"{r.cosine:.5f}", share.get(name, "-")])
        _say()
        _say(_table(["model", "detections", "precision", "recall", "F1", "cosine", "INT8 layers"], table))
        _say(f"{len(files)} images, FP32 detections: {fp.detections_reference}; score > {YOLOX_DETECTION['score_threshold']}, "
             f"class-aware NMS {YOLOX_DETECTION['iou_threshold']}, match same class IoU >= 0.5; "
             f"observe {t_obs:.1f} s on {len(ImageFolder(self.calib_dir, spec))} images (batch 1)")
        if "mixed" in info:
            mi = info["mixed"]
            _say(f"mixed: sensitivity on {mi['slice_images']} calibration images, analysis {mi['analysis_seconds']:.1f} s "
                 f"+ plan {mi['plan_seconds']:.1f} s (budget F1 >= {args.yolox_min_f1} on that slice, met: {mi['plan_met']}); "
                 f"INT8 layers {mi['int8_layers']}/{mi['total_layers']}; excluded: {', '.join(mi['excluded']) or '(none)'}")
        info["rows"] = [{"name": n, **r.as_dict()} for n, r in rows]
        self.results["yolox"] = info
        self._yolox_rows = rows

    # -- section 6 ---------------------------------------------------------------------------
    def section_glue(self) -> None:
        args = self.args
        _say("=" * 100)
        _say("6. TensorRT target: FP16 glue vs FP32 glue (type census; EfficientNet-Lite0 agreement on ORT)")
        _say("=" * 100)
        method = self.best_method()  # the census's calibration
        census_rows = []
        info: dict[str, Any] = {"method": method}
        yolox_amax = None
        for label, path in (("EfficientNet-Lite0", self.effnet), ("YOLOX-Nano", self.yolox)):
            if label.startswith("Eff"):
                amax = self.effnet_amax()[method]
            else:
                if yolox_amax is None:
                    obs = observe(self.yolox, self.calib_dir, None, spec=PRESETS["yolox"], batch_size=1,
                                  histogram=method != "max", progress=False, limit=27)
                    yolox_amax = algorithms.compute_all(obs, method)
                amax = yolox_amax
            model = onnx.load(str(path))
            weighted = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
            exclude = [weighted[0], weighted[-1]]  # the usual sensitive pair: first and last layer
            old = qdq.insert_qdq(onnx.load(str(path)), amax, target="tensorrt")  # before: no folding, FP32 glue
            graphs = [("INT8, FP32 glue before (no Pad folding)", old)]
            for precision in ("int8", "mixed"):
                ex = exclude if precision == "mixed" else []
                for g in ("fp32", "fp16"):
                    graphs.append((f"{precision.upper()}{' (first+last FP16)' if ex else ''}, {g} glue",
                                   lower(model, precision, amax, exclude=ex, target="tensorrt", glue=g)))
            for name, m in graphs:
                c = glue.type_census(m)
                census_rows.append([label, name, c.get("fp32", 0), c.get("fp16", 0), c.get("Pad", 0)])
                info.setdefault("census", []).append({"model": label, "graph": name, **c})
        _say(_table(["model", "graph (tensorrt target)", "FP32 nodes", "FP16 nodes", "Pads"], census_rows))
        _say("compute nodes by output type, Q/DQ and Casts not counted; CPU-target graphs keep FP32 glue")

        eval_dir = self.zoo / "images" / "imagenet_eval"
        files = sorted(p for p in eval_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if args.limit_eval:
            files = files[: args.limit_eval]
        x, _ = _stack(eval_dir, self.eff_spec, files)
        data = _chunks(x, EVAL_BATCH)
        ref = np.concatenate(run_batches(str(self.effnet), data))
        rows, margin_rows, worst = [], [], 1.0
        for m in GLUE_METHODS:
            amax = self.effnet_amax()[m]
            graphs = {g: lower(str(self.effnet), "int8", amax, target="tensorrt", glue=g) for g in ("fp32", "fp16")}
            graphs["emulated"] = glue.emulate_tensorrt(graphs["fp16"])
            outs = {g: np.concatenate(run_batches(_save(model, self.work / f"effnet_glue_{m}_{g}.onnx"), data))
                    for g, model in graphs.items()}
            base = outs["fp32"]
            entry: dict[str, Any] = {}
            for name, a, b in (("FP16 glue vs FP32 glue", base, outs["fp16"]),
                               ("FP16 glue, TensorRT arithmetic emulated, vs FP32 glue", base, outs["emulated"]),
                               ("FP32 glue vs FP32 model", ref, base), ("FP16 glue vs FP32 model", ref, outs["fp16"])):
                r = compare_outputs([a], [b])
                differ = int((a.argmax(1) != b.argmax(1)).sum())
                rows.append([m, name, f"{r.top1_agreement:.4f}", differ, f"{r.cosine:.5f}"])
                entry[name] = {"top1_agreement": r.top1_agreement, "cosine": r.cosine, "disagreeing": differ}
            # Are the flips near-ties? Margin of top-1 over top-2 in the FP32-glue output.
            top2 = np.sort(base, axis=1)[:, -2:]
            margin = top2[:, 1] - top2[:, 0]
            flipped = margin[base.argmax(1) != outs["fp16"].argmax(1)]
            pct = np.percentile(margin, [1, 5, 10, 50])
            margin_rows.append([m, " ".join(f"{v:.3f}" for v in sorted(flipped)) or "-", *(f"{v:.3f}" for v in pct)])
            entry["flipped_margins"] = sorted(float(v) for v in flipped)
            entry["margin_percentiles_1_5_10_50"] = [float(v) for v in pct]
            info[m] = entry
            worst = min(worst, entry["FP16 glue vs FP32 glue"]["top1_agreement"])
        _say()
        _say(_table([f"EfficientNet-Lite0 INT8, tensorrt target, {len(files)} images", "comparison", "top-1 agreement",
                     "differ", "cosine"], rows, align="llrrr"))
        _say("'TensorRT arithmetic emulated' (calib.glue.emulate_tensorrt): the FP16-glue graph's FP16 values with FP32 "
             "arithmetic, rounded to FP16 only where TensorRT writes FP16 (not inside its fused DQ-Conv-Clip/Add-Q kernels)")
        _say()
        _say(_table(["algorithm", "margins (top-1 - top-2 logit, FP32 glue) of the images FP16 glue flips",
                     "p1", "p5", "p10", "p50 (all images)"], margin_rows, align="llrrrr"))
        self.results["glue"] = info
        self._glue_agreement = worst

    # -- section 8 ---------------------------------------------------------------------------
    def section_modelopt(self) -> None:
        _say("=" * 100)
        _say("8. ModelOpt interop: EfficientNet-Lite0 quantized by NVIDIA ModelOpt's ONNX PTQ, served as is by tegrad")
        _say("=" * 100)
        from bench import modelopt_interop

        why = modelopt_interop.modelopt_available()
        if why:
            _say(f"skipped: {why}")
            self.results["modelopt"] = {"skipped": why}
            return
        res = modelopt_interop.run(self.zoo, self.work / "modelopt", [("entropy", "fp16"), ("entropy", "fp32")],
                                   self.args.limit_eval, tegrad_methods=(), cache_roundtrip=False)
        self.results["modelopt"] = res
        self._modelopt_agree = {k: v["compare"]["served (gRPC) vs direct (ORT, QDQ fusion off)"]
                                for k, v in res["variants"].items()}

    # -- section 5 ---------------------------------------------------------------------------
    def summary(self) -> None:
        _say("=" * 100)
        _say("5. Targets")
        _say("=" * 100)
        lines: list[tuple[str, bool | None, str]] = []
        rows = getattr(self, "_eff_rows", None)
        if rows:
            fp = self._fp32_acc
            best = next(r for r in rows if r.get("method") == self.best)["result"].accuracy_candidate
            d = (best - fp) * 100
            detail = f"{self.best}: {best:.4f} vs FP32 {fp:.4f} ({d:+.1f} pt)"
            eps = 1e-9  # accuracies are k/N: -0.2 pt can come out as -0.2000000001
            ok = d >= -0.5 - eps
            ort = [r for r in rows if r.get("ort")]
            if ort:
                ob = max(r["result"].accuracy_candidate for r in ort)
                detail += f"; best ORT TensorRT-style {ob:.4f} ({(best - ob) * 100:+.1f} pt)"
                ok = ok and best >= ob - eps
            lines.append(("EfficientNet INT8 (best algorithm) within 0.5 pt of FP32 and >= ORT", ok, detail))
            mrow = next(r for r in rows if r.get("mixed"))
            mixed = mrow["result"].accuracy_candidate
            dm = (mixed - fp) * 100
            lines.append(("EfficientNet mixed within 0.2 pt of FP32", dm >= -0.2 - eps,
                          f"{mixed:.4f} ({dm:+.1f} pt), {mrow['name'].split(': ')[-1].rstrip(')')}"))
        cost = self.results.get("calibration_cost")
        if cost:
            if "speedup_own" in cost:
                ok = cost["speedup_own"] >= 3 and cost["flat"]
                detail = (f"{cost['speedup_own']:.1f}x (own tensors), {cost['speedup_same']:.1f}x (same tensors); "
                          f"memory {'flat' if cost['flat'] else 'not flat'}")
                lines.append(("entropy calibration >= 3x faster than ORT, flat memory", ok, detail))
            else:
                lines.append(("tegrad calibration memory flat", cost["flat"], "ORT skipped"))
        lat = getattr(self, "_lat_int8", None)
        if lat:
            lines.append(("CPU INT8 >= 1.5x faster than FP32 (batch 1 and 8)", min(lat) >= 1.5,
                          f"batch 1: {lat[0]:.2f}x, batch 8: {lat[1]:.2f}x"))
        yrows = getattr(self, "_yolox_rows", None)
        if yrows:
            name, r = max(yrows[1:], key=lambda nr: nr[1].f1)
            lines.append(("YOLOX INT8 (or mixed) F1 >= 0.9", r.f1 >= 0.9, f"{name}: F1 {r.f1:.3f}"))
        agree = getattr(self, "_glue_agreement", None)
        if agree is not None:
            lines.append(("EfficientNet FP16-glue INT8 top-1 agreement with FP32 glue >= 0.99 (max, mse, entropy)",
                          agree >= 0.99, f"lowest {agree:.4f}"))
        mo = getattr(self, "_modelopt_agree", None)
        if mo:
            # FP16-glue files run FP32 glue on the CPU target: equal only up to FP16 rounding.
            exact = [v["max_abs"] == 0 for k, v in mo.items() if k.endswith("fp32")]
            lines.append(("ModelOpt INT8 (FP32 glue) served by tegrad equal to the file on ORT", all(exact) and bool(exact),
                          ", ".join(f"{k}: max |Δ| {v['max_abs']:.3g}, top-1 agree {v['top1_agreement']:.4f}"
                                    for k, v in mo.items())))
        table = [[t, "MET" if ok else "MISSED", d] for t, ok, d in lines]
        _say(_table(["target", "status", "measured"], table, align="lll"))
        self.results["targets"] = [{"target": t, "met": ok, "detail": d} for t, ok, d in lines]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default=str(ROOT.parent / "shared" / "zoo"), help="benchmark zoo folder")
    p.add_argument("--limit-eval", type=int, default=None, help="evaluate on the first N images only (quick run)")
    p.add_argument("--skip-ort", action="store_true", help="leave out ONNX Runtime's quantization tool")
    p.add_argument("--sections", default="1,2,3,4,6,8", help="comma-separated subset of 1,2,3,4,6,8 (5, the summary, always)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    p.add_argument("--algorithm", default="entropy", choices=METHODS,
                   help="INT8 algorithm for latency when section 1 (which picks the best) is not run")
    p.add_argument("--min-top1", default="0.99,0.98",
                   help="sensitivity plan budgets (top-1 agreement on the slice), comma-separated; the first is "
                        "the one the targets and the latency table use")
    p.add_argument("--yolox-min-f1", type=float, default=0.95, help="YOLOX sensitivity plan budget (F1)")
    p.add_argument("--skip-yolox-mixed", action="store_true", help="no sensitivity plan for YOLOX")
    p.add_argument("--skip-cheap-calibrators", action="store_true", help="section 2: entropy only")
    p.add_argument("--repeats", type=int, default=3, help="section 2: repeats of the headline calibration runs")
    p.add_argument("--runs", type=int, default=60, help="timed runs per model and batch size")
    p.add_argument("--warmup", type=int, default=5, help="warm-up runs before each block of timed runs")
    p.add_argument("--keep", default=None, help="keep the intermediate models in this folder")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker is not None:
        print(json.dumps(_worker(json.loads(args._worker))), flush=True)
        return 0

    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"1", "2", "3", "4", "5", "6", "8"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    if not Path(args.zoo, "models").is_dir():
        p.error(f"{args.zoo}: no models/ folder (pass --zoo)")

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tegrad-quant-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    bench = Bench(args, work)
    _say(f"tegrad quant_accuracy bench; {os.cpu_count()} CPUs, load average {_load_avg()}; zoo {bench.zoo}")
    try:
        if "1" in sections:
            bench.section_accuracy()
        if "2" in sections:
            bench.section_cost()
        if "3" in sections:
            bench.section_latency()
        if "4" in sections:
            bench.section_yolox()
        if "6" in sections:
            bench.section_glue()
        if "8" in sections:
            bench.section_modelopt()
        bench.summary()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_start
    bench.results["total_seconds"] = total
    _say(f"\ntotal run time {total / 60:.1f} min")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(bench.results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
