"""``tegrad plan``: NVIDIA's quantization decision flow as one command, and the budget flags.

PTQ first; if it misses the target, partial PTQ (the most sensitive layers kept out of INT8,
within a budget of excluded layers); if that misses too, the model needs QAT. Every step is
measured against FP32 on held-out data, never on the calibration images.

Exit codes: 0 the target is met (PTQ or partial PTQ), 3 it is not met within the budget
(needs QAT), 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from calib import cli as _cli
from calib import planner

EXIT_NOT_MET = 3


# ---- budget and detection flags (plan, sensitivity, evaluate) ------------------------------------
def _fraction(text: str) -> float:
    """0.02 or 2% (= 2 points); a bare number >= 1 is refused rather than guessed."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction (0.02) or a percentage (2%), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not in [0, 1): write 0.02 or 2% for two points")
    return value


def add_detection_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("detection (--task detection)")
    g.add_argument("--score-threshold", type=float, default=None, metavar="S",
                   help="keep boxes scoring above S (default: the --config's, else 0.25)")
    g.add_argument("--iou-threshold", type=float, default=None, metavar="T",
                   help="NMS IoU threshold (default: the --config's, else 0.45)")
    g.add_argument("--match-iou", type=float, default=None, metavar="T",
                   help="IoU at which an INT8 box matches an FP32 box of the same class (default 0.5)")


def add_budget_options(p: argparse.ArgumentParser, min_f1_default: float | None = planner.DEFAULT_MIN_F1) -> None:
    g = p.add_argument_group("accuracy budget")
    g.add_argument("--target-drop", type=_fraction, default=None, metavar="X",
                   help=f"top-1 points a classifier may lose against FP32 (accuracy points with --labels; "
                        f"detection: F1 >= 1 - X), as 0.02 or 2%% (default {planner.DEFAULT_TARGET_DROP:g})")
    g.add_argument("--confidence", type=float, default=None, metavar="C",
                   help=f"confidence of the upper bound on the drop (0.5 = point estimate; default "
                        f"{planner.DEFAULT_CONFIDENCE:g})")
    g.add_argument("--min-f1", type=float, default=min_f1_default, metavar="F",
                   help="detectors: F1 of the INT8 boxes against the FP32 boxes the plan must keep"
                        + (f" (default {min_f1_default:g})" if min_f1_default is not None else ""))


def budget_from_args(args: argparse.Namespace, task: str) -> planner.Budget:
    try:
        return planner.Budget.from_options(task, getattr(args, "target_drop", None), getattr(args, "confidence", None),
                                           getattr(args, "min_f1", None), getattr(args, "min_top1", None))
    except ValueError as exc:
        raise _cli._UsageError(str(exc)) from None


def _max_excluded(text: str | None, total: int) -> int:
    if text is None:
        return planner.default_max_excluded(total)
    t = text.strip()
    try:
        value = round(total * float(t[:-1]) / 100) if t.endswith("%") else int(t)
    except ValueError:
        raise _cli._UsageError(f"--max-excluded {text!r}: expected a number of layers or a percentage (25%)") from None
    if value < 0:
        raise _cli._UsageError(f"--max-excluded {text!r} must not be negative")
    return min(value, total)


# ---- data -------------------------------------------------------------------------------------
def _split(source: Any, holdout: float) -> tuple[Any, Any]:
    """(calibration, held-out) halves of an image folder, held-out files spread over the sorted list."""
    files = getattr(source, "files", None)
    if files is None:
        raise _cli._UsageError("--data is not an image folder: give the calibration set apart "
                               "(--calib-data) or a --cache, so nothing is measured on calibration data")
    held_idx = {i for i in range(len(files)) if int((i + 1) * holdout) > int(i * holdout)}
    calib_files = [f for i, f in enumerate(files) if i not in held_idx]
    held_files = [f for i, f in enumerate(files) if i in held_idx]
    if not calib_files or not held_files:
        raise _cli._UsageError(f"--data has {len(files)} images: too few to hold out {holdout:.0%} for measurement")
    calib, held = copy.copy(source), copy.copy(source)
    calib.files, held.files = calib_files, held_files
    return calib, held


def _same_path(a: Any, b: Any) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, TypeError):
        return False


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- the command --------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    from calib import sensitivity
    from calib.cache import CalibrationCache, atomic_write_text
    from calib.datasets import as_source
    from calib.evaluate import detection_defaults, run_batches
    from calib.preprocess import PreprocessSpec

    t_start = time.perf_counter()
    progress = not args.no_progress
    task = _cli._task(args)
    budget = budget_from_args(args, task)
    if not 0.0 < args.holdout < 1.0:
        raise _cli._UsageError(f"--holdout {args.holdout} must be between 0 and 1")
    spec = _cli.spec_from_args(args)
    cache = None
    if args.cache:
        if args.calib_data:
            raise _cli._UsageError("give --cache or --calib-data, not both")
        cache = CalibrationCache.load(args.cache)
        if not args.no_check:
            cache.check_against(args.model)
        if spec is None and cache.preprocess is not None:
            spec = PreprocessSpec.from_dict(cache.preprocess)
        if cache.source.get("kind") == "images" and _same_path(cache.source.get("path"), args.data):
            raise _cli._UsageError(f"{args.cache} was calibrated on {args.data}: measure on other images "
                                   "(--data), or drop --cache to calibrate on a split of --data")
    feeds = _cli._feeds(args, args.model, spec)
    calib_source = None
    if cache is None:
        if args.calib_data:
            path = Path(args.calib_data)
            if not path.exists():
                raise FileNotFoundError(f"--calib-data {path}: no such file or directory")
            if _same_path(path, args.data):
                raise _cli._UsageError("--calib-data and --data are the same: measurement needs held-out data")
            calib_source = as_source(path, spec=spec)
        else:
            calib_source, feeds.source = _split(feeds.source, args.holdout)
    labels = _cli._load_labels(args.labels, feeds.source) if args.labels else None
    detection = _cli._detection(args)

    base = planner.prepared(args.model)
    if task == "detection":
        detection = detection_defaults(base, detection)
    steps: dict[str, Any] = {}

    # 1. calibration
    if cache is not None:
        amax, algorithm = cache.amax, cache.algorithm
        steps["calibration"] = {"cache": os.fspath(args.cache), "algorithm": algorithm, "params": dict(cache.params),
                                "samples": cache.num_samples}
    else:
        from calib import auto_algorithm

        _say(f"[1/4] calibrating ({args.algorithm}) on {len(calib_source)} samples")
        t0 = time.perf_counter()
        # auto chooses on the calibration data's own held-out part: --data stays unseen until step 2.
        result = auto_algorithm.calibrate(args.model, calib_source, args.algorithm, input_name=feeds.input_name,
                                          batch_size=feeds.batch_size, task=task, detection=detection,
                                          progress=progress, note=lambda text: _say(f"note: {text}"), show=_say)
        amax, algorithm = result.amax, result.algorithm
        steps["calibration"] = {"algorithm": algorithm, "params": result.params,
                                "samples": result.observations.num_samples, "seconds": time.perf_counter() - t0}
        if args.cache_out:
            cache = result.cache(args.model, spec.to_dict() if spec is not None else None)
            atomic_write_text(args.cache_out, cache.to_json())
            steps["calibration"]["cache"] = os.fspath(args.cache_out)
            _say(f"wrote {args.cache_out}")

    # 2. plain PTQ on held-out data
    batches = list(_progress(feeds, progress, "held-out data", len(feeds.source)))
    held_n = sum(planner.batch_len(b) for b in batches)
    _say(f"[2/4] plain INT8 vs FP32 on {held_n} held-out samples ({budget.describe(labels is not None)})")
    if task == "classification" and budget.target_drop < planner.smallest_provable_drop(held_n, budget.confidence):
        _say(f"note: {held_n} samples cannot show a drop below "
             f"{planner.smallest_provable_drop(held_n, budget.confidence) * 100:.1f} points at "
             f"{budget.confidence:.0%}: the target cannot be met; give more held-out data or lower --confidence")
    reference = run_batches(base, _bar(batches, progress, "FP32"))
    ptq_graph = planner.graph_for(base, amax, (), args.target, None)
    ptq = budget.judge(reference, run_batches(ptq_graph, _bar(batches, progress, "plain INT8")), labels=labels,
                       detection=detection)
    steps["ptq"] = ptq
    _say(f"plain INT8: {planner.describe_result(ptq)}: target {'met' if ptq['met'] else 'missed'}")
    total_layers = len(sensitivity.quantizable_layers(base))
    limit = _max_excluded(args.max_excluded, total_layers)
    report = None
    if ptq["met"]:
        plan = planner.grow([], base, amax, batches, budget, labels=labels, detection=detection, target=args.target,
                            max_excluded=0, reference=reference, known={0: {"excluded": 0, **ptq}},
                            speed_batch=batches[0], speed_repeats=args.speed_repeats, progress=progress)
        outcome = "ptq"
    else:
        # 3. rank layers (on calibration data when we have it: the ranking is not a measurement)
        _say(f"[3/4] sensitivity ({args.method}) of {total_layers} layers")
        rank_data = _cli._Feeds(calib_source, feeds.input_name, feeds.batch_size) if calib_source is not None else batches
        report = sensitivity.analyze(base, amax, rank_data, max_samples=args.max_samples, method=args.method,
                                     task=task, detection=detection, target=args.target, progress=progress)
        # 4. the shortest prefix of the ranking that meets the target, within --max-excluded
        _say(f"[4/4] growing the exclusion set (bisection, at most {limit} of {total_layers} layers)")
        plan = planner.grow([r.layer for r in report.rows], base, amax, batches, budget, labels=labels,
                            detection=detection, exclude_precision=args.exclude_precision, target=args.target,
                            max_excluded=limit, reference=reference, known={0: {"excluded": 0, **ptq}},
                            speed_batch=batches[0], speed_repeats=args.speed_repeats, progress=progress)
        outcome = "partial" if plan.met else "qat"
    wall = time.perf_counter() - t_start
    text = paragraph(args.model, outcome, budget, ptq, plan, labels is not None, args.exclude_precision, held_n,
                     steps["calibration"])
    print(text)
    print(f"({wall:.0f} s, load average {_load()})")
    cache_path = os.fspath(args.cache or args.cache_out) if (args.cache or args.cache_out) else None
    from calib import config_snippet

    print("\nfor the model's config.toml:\n" + config_snippet.snippet(
        plan.excluded, exclude_precision=args.exclude_precision,
        calibration_cache=Path(cache_path).name if cache_path else None).rstrip())
    if args.write_config:
        written = config_snippet.write_config(args.write_config, plan.excluded,
                                              exclude_precision=args.exclude_precision, calibration_cache=cache_path)
        _say(f"wrote {written}")
    if args.json:
        doc = {"model": os.fspath(args.model), "outcome": outcome, "paragraph": text,
               "budget": budget.describe(labels is not None), "held_out_samples": held_n,
               "steps": {**steps, "sensitivity": report.as_dict() if report else None, "plan": plan.as_dict()},
               "wall_seconds": wall, "load_average": _load()}
        atomic_write_text(args.json, json.dumps(doc, indent=2, default=float) + "\n")
    return 0 if plan.met else EXIT_NOT_MET


def _progress(feeds: Any, enabled: bool, desc: str, total: int | None) -> Any:
    if not enabled:
        return iter(feeds)
    from tqdm import tqdm

    batch = max(1, feeds.batch_size)
    return tqdm(iter(feeds), desc=desc, unit="batch", total=-(-total // batch) if total else None)


def _bar(batches: list, enabled: bool, desc: str) -> Any:
    if not enabled:
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc=desc, unit="batch")


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def _measured(r: dict, task: str, labels: bool) -> str:
    if task == "detection":
        return f"F1 {r['f1']:.3f} vs the FP32 detections"
    what = "accuracy drop" if labels else "top-1 drop vs FP32"
    return f"{what} {r['drop'] * 100:.1f} points (upper bound {r['drop_bound'] * 100:.1f})"


def _cost(plan: planner.PrecisionPlan) -> str:
    mac = plan.share.get("int8_mac_share")
    text = f"{plan.int8_layers} of {plan.total_layers} layers INT8" + (f" ({mac:.0%} of the MACs)" if mac is not None else "")
    if plan.speed and plan.speed.get("speedup_vs_fp32"):
        text += "; measured on this CPU: " + planner.speed_text(plan.speed)
    return text


def paragraph(model: str, outcome: str, budget: planner.Budget, ptq: dict, plan: planner.PrecisionPlan,
              labels: bool, exclude_precision: str, held_n: int, calibration: dict) -> str:
    """The one paragraph that says which step of the flow the model needs, with the numbers."""
    name = Path(os.fspath(model)).name
    target = budget.describe(labels)
    plain = _measured(ptq, budget.task, labels)
    algorithm = str(calibration.get("algorithm"))
    if (calibration.get("params") or {}).get("percentile") is not None:
        algorithm += f" {calibration['params']['percentile']:g}"
    head = (f"{name}: calibrated with {algorithm} on {calibration.get('samples')} samples, "
            f"measured on {held_n} held-out samples against a target of {target}. ")
    if outcome == "ptq":
        return head + f"PTQ is enough: plain INT8 measures {plain}; {_cost(plan)}."
    got = _measured(plan.achieved, budget.task, labels)
    if outcome == "partial":
        layers = ", ".join(plan.excluded)
        return (head + f"Partial PTQ with these {len(plan.excluded)} layers kept in {exclude_precision}: {layers}. "
                f"Plain INT8 measures {plain} and misses the target; the partial plan measures {got} "
                f"({plan.evaluations} whole-model evaluations); {_cost(plan)}.")
    return (head + f"Needs QAT: the best partial plan within the budget of {plan.max_excluded} excluded layers "
            f"reaches {got} against a target of {target} (plain INT8: {plain}); {_cost(plan)}. "
            f"Quantization-aware training (exported with Q/DQ, served as precision = \"explicit\") or a larger "
            f"--max-excluded are the ways on.")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan", help="PTQ, partial PTQ or QAT? measure the decision flow on held-out data",
        description="Calibrate (or take --cache), measure plain INT8 against FP32 on held-out data; if it misses "
                    "the target, rank layers by sensitivity and keep the shortest prefix of the ranking out of INT8 "
                    "that meets it, within --max-excluded; say in one paragraph which step the model needs. "
                    "Exit 0: target met, 3: not met within the budget (needs QAT), 2: bad input.")
    p.add_argument("model", help="ONNX model (FP32)")
    _cli._add_data_options(p)
    c = p.add_argument_group("calibration (one of; default: calibrate on a split of --data)")
    c.add_argument("--cache", help="calibration cache to use (must not come from the --data images)")
    c.add_argument("--calib-data", metavar="PATH", help="calibrate on these (preprocessed as --data)")
    c.add_argument("--holdout", type=float, default=0.5, metavar="F",
                   help="without --cache/--calib-data: share of --data held out for measurement (default 0.5)")
    c.add_argument("--algorithm", choices=("auto",) + _cli.ALGORITHMS, default="auto",
                   help="amax selection (default auto: each algorithm scored on a held-out part of the calibration "
                        "data, as tegrad calibrate)")
    c.add_argument("--cache-out", metavar="PATH", help="write the calibration cache made here")
    c.add_argument("--no-check", action="store_true", help="skip the model-hash check of --cache")
    add_budget_options(p)
    add_detection_options(p)
    p.add_argument("--labels", help="labels of the --data samples: the target becomes accuracy points")
    p.add_argument("--task", choices=("classification", "detection"), default=None,
                   help="default: detection for a --config with [postprocess] kind = 'yolo', else classification")
    p.add_argument("--max-excluded", default=None, metavar="N|P%",
                   help=f"most layers kept out of INT8 before the answer is 'needs QAT' (default "
                        f"{planner.DEFAULT_MAX_EXCLUDED_SHARE * 100:.0f}%% of the layers)")
    p.add_argument("--max-samples", type=int, default=32, help="samples used to rank layers (default 32)")
    p.add_argument("--method", choices=("single", "complement"), default="single", help="sensitivity measure")
    p.add_argument("--target", choices=("tensorrt", "cpu"), default="tensorrt", help="graph the accuracy is measured on")
    p.add_argument("--exclude-precision", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--speed-repeats", type=int, default=7, help="timed rounds per model for the speed-up (median)")
    p.add_argument("--json", metavar="PATH", help="also write every step as JSON")
    p.add_argument("--write-config", metavar="PATH", help="merge the plan (precision, exclude, exclude_precision, calibration_cache) into this config.toml "
                        "or model folder, keeping its other keys and comments")
    p.set_defaults(func=_cli._wrap(cmd_plan, "plan"))
