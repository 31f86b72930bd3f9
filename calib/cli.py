"""Command-line front end of ``calib`` (``tegrad calibrate | quantize | sensitivity | cache | evaluate | plan``).

``register(subparsers)`` adds the subcommands to the daemon's argparse parser;
each sets ``func`` to a function ``(args) -> int`` (the exit code). ``main``
runs them standalone (``python -m calib.cli``).

Exit codes: 0 success, 2 bad input (missing file, invalid option, cache that
does not fit the model), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

from calib.preprocess import (
    ANCHORS,
    COLORS,
    DTYPES,
    INTERPOLATIONS,
    LAYOUTS,
    PRESETS,
    RESIZE_MODES,
    PreprocessSpec,
)

ALGORITHMS = ("max", "entropy", "percentile", "mse")
PRECISIONS = ("fp32", "fp16", "int8", "mixed", "explicit")


class _UsageError(ValueError):
    pass


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    parts = [p for p in text.lower().replace("x", ",").split(",") if p.strip()]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH or one number, got {text!r}") from None
    if len(vals) == 1:
        return (vals[0], vals[0])
    if len(vals) == 2:
        return (vals[0], vals[1])
    raise argparse.ArgumentTypeError(f"expected HEIGHT,WIDTH or one number, got {text!r}")


def _add_data_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", required=required, metavar="PATH",
                   help="image folder (preprocessed with the options below) or .npy/.npz file")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="use at most N samples")
    g.add_argument("--batch-size", type=int, default=8, metavar="N", help="samples per inference (default 8)")
    g.add_argument("--input-name", default=None, help="model input the data feeds (default: the only input)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    pp = p.add_argument_group("preprocessing (image folders)")
    pp.add_argument("--config", metavar="PATH",
                    help="model folder or its config.toml: take [preprocess] (and the input name, task and YOLO "
                         "settings of [postprocess]) from it; the flags below still win")
    pp.add_argument("--preset", choices=sorted(PRESETS), help="start from a known model's preprocessing")
    pp.add_argument("--preprocess", metavar="JSON", help="PreprocessSpec as a JSON file or inline JSON object")
    pp.add_argument("--resize", choices=RESIZE_MODES)
    pp.add_argument("--size", type=_size, metavar="H,W", help="model input height,width")
    pp.add_argument("--resize-short", type=int, metavar="N", help="center-crop: resize the short side to N first")
    pp.add_argument("--anchor", choices=ANCHORS, help="letterbox placement")
    pp.add_argument("--pad-value", type=_floats, metavar="V[,V,V]")
    pp.add_argument("--interpolation", choices=sorted(INTERPOLATIONS))
    pp.add_argument("--color", choices=COLORS)
    pp.add_argument("--mean", type=_floats, metavar="M[,M,M]")
    pp.add_argument("--std", type=_floats, metavar="S[,S,S]")
    pp.add_argument("--scale", type=_floats, metavar="S[,S,S]", help="y = x*scale + offset")
    pp.add_argument("--offset", type=_floats, metavar="O[,O,O]")
    pp.add_argument("--layout", choices=LAYOUTS)
    pp.add_argument("--dtype", choices=DTYPES)


_SPEC_FLAGS = ("resize", "size", "resize_short", "anchor", "pad_value", "interpolation", "color",
               "mean", "std", "scale", "offset", "layout", "dtype")


def spec_from_args(args: argparse.Namespace) -> PreprocessSpec | None:
    """PreprocessSpec from --preset / --preprocess plus individual overrides (None if nothing given)."""
    base: dict[str, Any] | None = None
    model_config = _model_config(args)
    if model_config is not None and model_config.preprocess:
        base = dict(model_config.preprocess)
    if getattr(args, "preset", None):
        base = PRESETS[args.preset].to_dict()
    if getattr(args, "preprocess", None):
        text = args.preprocess
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text(encoding="utf-8")
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _UsageError(f"--preprocess: invalid JSON: {exc}") from None
        base = {**(base or {}), **loaded}
    overrides = {k: getattr(args, k) for k in _SPEC_FLAGS if getattr(args, k, None) is not None}
    if base is None and not overrides:
        return None
    merged = {**(base or {}), **overrides}
    if overrides.get("resize") not in (None, "center-crop"):
        merged.pop("resize_short", None)
    if "mean" in overrides or "std" in overrides:
        merged.pop("scale", None)
        merged.pop("offset", None)
    if "scale" in overrides or "offset" in overrides:
        merged.pop("mean", None)
        merged.pop("std", None)
    if "size" not in merged:
        raise _UsageError("preprocessing needs --size (or --preset / --preprocess / --config)")
    if "size" in overrides and base and base.get("resize_short") and "resize_short" not in overrides \
            and merged.get("resize") == "center-crop":
        # A preset's crop ratio carries over to another size (ImageNet's 224 of 256 becomes 240 of 274).
        merged["resize_short"] = round(base["resize_short"] * overrides["size"][0] / _pair(base["size"])[0])
    try:
        return PreprocessSpec.from_dict(merged)
    except ValueError as exc:
        where = f" (with [preprocess] of {model_config.path})" if model_config and model_config.preprocess else ""
        raise _UsageError(f"preprocessing{where}: {exc}") from None


def _pair(size: Any) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ---- --config: a served model's config.toml ------------------------------------------------------
# Keys of [preprocess] that are calibration preprocessing; the others only matter to the server.
_SERVING_ONLY = ("input", "format", "model_input", "max_image_pixels")


class _ModelConfig:
    """What the calib commands take from a model's config.toml (read as TOML: calib does not need the
    daemon's validation, and the server validates the file anyway when it loads the model)."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        pre = data.get("preprocess")
        post = data.get("postprocess") or {}
        if pre is not None and not isinstance(pre, dict):
            raise _UsageError(f"{path}: [preprocess] must be a table")
        self.preprocess = {k: v for k, v in (pre or {}).items() if k not in _SERVING_ONLY} or None
        inputs = [t.get("name") for t in data.get("input", []) if isinstance(t, dict)]
        self.input_name = (pre or {}).get("model_input") or (inputs[0] if len(inputs) == 1 else None)
        kind = post.get("kind") if isinstance(post, dict) else None
        self.task = {"yolo": "detection", "classification": "classification"}.get(kind)
        self.detection: dict[str, Any] = {}
        if kind == "yolo":
            for src, dst in (("variant", "layout"), ("score_threshold", "score_threshold"),
                             ("iou_threshold", "iou_threshold"), ("max_detections", "max_detections"),
                             ("class_agnostic", "class_agnostic"), ("strides", "strides")):
                if src in post:
                    self.detection[dst] = post[src]


def _model_config(args: argparse.Namespace, announce: bool = True) -> _ModelConfig | None:
    """The --config file, read once per command (and said on stderr, so nobody wonders which)."""
    given = getattr(args, "config", None)
    if not given:
        return None
    cached = getattr(args, "_model_config", None)
    if cached is not None:
        return cached
    path = Path(given)
    path = path / "config.toml" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--config {given}: {path} does not exist (give a model folder or its config.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _UsageError(f"--config {path}: not valid TOML: {exc}") from None
    config = _ModelConfig(path, data)
    read = [name for name, present in (("[preprocess]", config.preprocess), ("input name", config.input_name),
                                       ("task", config.task)) if present]
    if announce:
        print(f"using {path}: {', '.join(read) or 'nothing to use (no [preprocess], input or [postprocess])'}"
              f"{'; flags given override it' if read else ''}", file=sys.stderr)
    args._model_config = config
    return config


def _task(args: argparse.Namespace) -> str:
    config = _model_config(args)
    return args.task or (config.task if config and config.task else "classification")


def _detection(args: argparse.Namespace) -> dict[str, Any] | None:
    config = _model_config(args)
    params = dict(config.detection) if config and config.detection else {}
    # --score-threshold / --iou-threshold / --match-iou (calib.plan_cli) win over [postprocess].
    for key in ("score_threshold", "iou_threshold", "match_iou"):
        value = getattr(args, key, None)
        if value is not None:
            if not 0.0 <= value <= 1.0:
                raise _UsageError(f"--{key.replace('_', '-')} {value} must be between 0 and 1")
            params[key] = value
    return params or None


def _data_source(args: argparse.Namespace, spec: PreprocessSpec | None) -> Any:
    from calib.datasets import as_source, is_capture

    path = Path(args.data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    if path.is_dir() and spec is None and not is_capture(path):
        raise _UsageError(f"--data {path} is an image folder: give its preprocessing (--preset, --preprocess or --size ...)")
    return as_source(path, spec=spec, limit=args.limit)


class _Feeds:
    """Re-iterable batches of a source: sensitivity analysis walks the data more than once."""

    def __init__(self, source: Any, input_name: str, batch_size: int) -> None:
        self.source, self.input_name, self.batch_size = source, input_name, batch_size

    def __iter__(self) -> Any:
        from calib.datasets import batches

        return batches(self.source, self.input_name, self.batch_size)


def _input_name(args: argparse.Namespace) -> str | None:
    config = _model_config(args)
    return args.input_name or (config.input_name if config else None)


def _feeds(args: argparse.Namespace, model: str, spec: PreprocessSpec | None) -> _Feeds:
    import onnx

    from calib.graph import data_input

    try:
        name, fixed = data_input(onnx.load(model, load_external_data=False), _input_name(args), what=model)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    batch_size = args.batch_size
    if fixed > 0 and batch_size != fixed:
        # As calibrate does: a model exported with a fixed batch runs that batch, not --batch-size.
        if batch_size > fixed:
            print(f"note: model input {name!r} has a fixed batch of {fixed}; using --batch-size {fixed}", file=sys.stderr)
        batch_size = fixed
    return _Feeds(_data_source(args, spec), name, batch_size)


def _default_out(model: str, suffix: str) -> Path:
    p = Path(model)
    return p.with_name(p.stem + suffix)


# ---- calibrate -----------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> int:
    from calib import auto_algorithm
    from calib.cache import atomic_write_text
    from calib.observe import Observations

    spec = spec_from_args(args)
    method = args.algorithm
    params: dict[str, Any] = {}
    if args.percentile is not None:
        if method != "percentile":
            raise _UsageError("--percentile only applies to --algorithm percentile")
        params["percentile"] = args.percentile
    if args.held_out is not None and method != "auto":
        raise _UsageError("--held-out only applies to --algorithm auto")
    # With --observations, a fixed algorithm needs no data; auto needs it for the held-out part.
    source = _data_source(args, spec) if args.data and (method == "auto" or not args.observations) else None
    if method == "auto" and source is None:
        raise _UsageError("--algorithm auto scores each algorithm on held-out samples of --data: give --data "
                          "(with --observations, the data they came from), or choose an --algorithm")
    obs = None
    if args.observations:
        from calib.cache import model_sha256

        obs = Observations.load(args.observations)
        if obs.model_sha256 != model_sha256(args.model):
            raise _UsageError(f"{args.observations} was collected on another model")
    result = auto_algorithm.calibrate(
        args.model, source, method, params=params,
        fraction=auto_algorithm.HELD_OUT_FRACTION if args.held_out is None else args.held_out,
        input_name=_input_name(args), batch_size=args.batch_size, task=_task(args), detection=_detection(args),
        observations=obs, keep_histograms=bool(args.save_observations), progress=not args.no_progress,
        note=lambda text: print(f"note: {text}", file=sys.stderr), show=print)
    if args.save_observations and obs is None:
        result.observations.save(args.save_observations)
    cache = result.cache(args.model, spec.to_dict() if spec is not None else None)
    out = Path(args.out) if args.out else _default_out(args.model, ".calib.json")
    atomic_write_text(out, cache.to_json())
    held = f" (+{result.choice.held_out_samples} held out)" if result.choice is not None else ""
    print(f"wrote {out}: {len(result.amax)} tensors, {result.describe()}, {result.observations.num_samples} "
          f"samples{held}")
    if args.trt_out:
        atomic_write_text(args.trt_out, cache.to_trt_text(trt_version=args.trt_version))
        print(f"wrote {args.trt_out} (TensorRT calibration cache)")
    return 0


# ---- quantize ------------------------------------------------------------------------------------
def _save_model(model: Any, out: Path) -> None:
    try:
        from calib.graph import save_atomic
    except ImportError:  # pragma: no cover - calib.graph ships with calib
        import onnx

        tmp = out.with_name(f".{out.name}.tmp")
        onnx.save(model, tmp)
        os.replace(tmp, out)
        return
    save_atomic(model, out)


def _quantize_from_config(args: argparse.Namespace) -> None:
    """--config fills what the served model says (precision, cache, exclusions, target); flags win."""
    config = _model_config(args, announce=False)
    data = config.data if config else {}
    if config:
        keys = [k for k in ("precision", "calibration_cache", "exclude", "exclude_precision", "backend") if k in data]
        print(f"using {config.path}: {', '.join(keys) or 'nothing to use'}{'; flags given override it' if keys else ''}",
              file=sys.stderr)
    if args.precision is None:
        args.precision = data.get("precision", "int8")
    if args.cache is None and data.get("calibration_cache"):
        cache = Path(data["calibration_cache"])
        args.cache = str(cache if cache.is_absolute() else config.path.parent / cache)
    if args.exclude is None and data.get("exclude"):
        args.exclude = list(data["exclude"])
    if args.exclude_precision is None:
        args.exclude_precision = data.get("exclude_precision", "fp16")
    if args.target is None:
        args.target = "cpu" if config and data.get("backend", "onnxruntime") == "onnxruntime" else "tensorrt"


def cmd_quantize(args: argparse.Namespace) -> int:
    from calib.cache import CalibrationCache
    from calib.lower import lower

    _quantize_from_config(args)
    amax = None
    if args.precision in ("int8", "mixed"):
        if not args.cache:
            raise _UsageError(f"--precision {args.precision} needs --cache")
        cache = CalibrationCache.load(args.cache)
        if not args.no_check:
            cache.check_against(args.model)
        amax = cache.amax
    elif args.cache:
        print(f"note: --cache is not used for --precision {args.precision}", file=sys.stderr)
    model = lower(args.model, args.precision, amax=amax, exclude=args.exclude or (),
                  exclude_precision=args.exclude_precision, target=args.target, glue=args.glue)
    out = Path(args.out) if args.out else _default_out(args.model, f".{args.precision}.onnx")
    _save_model(model, out)
    glue = f", {args.glue or ('fp16' if args.target == 'tensorrt' else 'fp32')} glue" if args.precision in ("int8", "mixed") else ""
    print(f"wrote {out} ({args.precision}, target {args.target}{glue})")
    return 0


# ---- sensitivity ---------------------------------------------------------------------------------
def cmd_sensitivity(args: argparse.Namespace) -> int:
    import onnx

    from calib import sensitivity
    from calib.cache import CalibrationCache, atomic_write_text
    from calib.explicit import has_qdq

    explicit = has_qdq(onnx.load(args.model, load_external_data=False))
    cache = None
    if args.cache:
        cache = CalibrationCache.load(args.cache)
        if not args.no_check and not explicit:
            cache.check_against(args.model)
    elif not explicit:
        raise _UsageError(f"{args.model} has no Q/DQ: give its calibration cache with --cache (from `tegrad calibrate`)")
    spec = spec_from_args(args)
    if spec is None and cache is not None and cache.preprocess is not None:
        # The cache remembers how its calibration images were prepared.
        spec = PreprocessSpec.from_dict(cache.preprocess)
    data = _feeds(args, args.model, spec)
    labels = _load_labels(args.labels, data.source) if args.labels else None
    task = _task(args)
    state = Path(args.state) if args.state else (
        Path(args.json).with_suffix(".jsonl") if args.json else Path(Path(args.model).stem + ".sensitivity.jsonl"))
    if args.no_resume and state.exists():
        state.unlink()

    def note(msg: str) -> None:
        print(f"note: {msg}", file=sys.stderr)

    if explicit:
        note(f"{args.model} carries Q/DQ: ranking its own pairs against the model without them")
    try:
        report = sensitivity.analyze(args.model, cache.amax if cache else None, data, max_samples=args.max_samples,
                                     method=args.method, task=task, target=args.target,
                                     progress=not args.no_progress, detection=_detection(args),
                                     chunk_samples=args.chunk_samples or None, stable_top=args.stable_top,
                                     state=state, fast=not args.full_graph, log=note)
    except KeyboardInterrupt:
        note(f"the rows measured so far are in {state}: run the same command again to continue")
        raise
    if explicit:
        return _explicit_ranking(args, report, state)
    from calib import plan_cli

    budget = plan_cli.budget_from_args(args, task)
    plan = sensitivity.plan(report, args.model, cache.amax, data, labels=labels, task=task, target=args.target,
                            exclude_precision=args.exclude_precision, detection=_detection(args), budget=budget,
                            progress=not args.no_progress, speed_batch=next(iter(data)))
    print(report.to_table())
    excluded = list(plan.excluded)
    print(f"\nsuggested exclusion: {plan.summary()}")
    if excluded:
        print("  tegrad quantize --precision mixed " + " ".join(f"--exclude '{n}'" for n in excluded))
    _suggest_config(args, excluded)
    if args.json:
        doc = {"model": os.fspath(args.model), "cache": os.fspath(args.cache),
               "report": report.as_dict(), "plan": plan.as_dict()}
        atomic_write_text(args.json, json.dumps(doc, indent=2, default=float) + "\n")
    return 0


def _suggest_config(args: argparse.Namespace, excluded: list[str]) -> None:
    """The plan as config.toml keys on stdout, and merged into --write-config's file."""
    from calib import config_snippet

    print("\nfor the model's config.toml:\n" + config_snippet.snippet(
        excluded, exclude_precision=args.exclude_precision, calibration_cache=Path(args.cache).name).rstrip())
    if args.write_config:
        written = config_snippet.write_config(args.write_config, excluded, exclude_precision=args.exclude_precision,
                                              calibration_cache=args.cache)
        print(f"wrote {written}")


def _explicit_ranking(args: argparse.Namespace, report: Any, state: Path) -> int:
    """A Q/DQ model's ranking is the result: the planner lowers float models."""
    from calib.cache import atomic_write_text

    print(report.to_table())
    if args.json:
        doc = {"model": os.fspath(args.model), "cache": None, "state": os.fspath(state),
               "report": report.as_dict(), "plan": None}
        atomic_write_text(args.json, json.dumps(doc, indent=2, default=float) + "\n")
    return 0


# ---- cache convert -------------------------------------------------------------------------------
def _format_of(path: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".cache", ".calib", ".txt", ".table", ".bin"):
        return "trt"
    raise _UsageError(f"cannot tell the format of {path} from its extension; pass --to json|trt")


def cmd_cache_convert(args: argparse.Namespace) -> int:
    from calib.cache import CalibrationCache, atomic_write_text

    cache = CalibrationCache.load(args.input)
    fmt = _format_of(args.output, args.to)
    if fmt == "json":
        text = cache.to_json()
    else:
        text = cache.to_trt_text(trt_version=args.trt_version, algorithm=args.trt_algorithm)
    atomic_write_text(args.output, text)
    print(f"wrote {args.output} ({'tegrad JSON' if fmt == 'json' else 'TensorRT text'}, {len(cache.amax)} tensors)")
    return 0


# ---- evaluate ------------------------------------------------------------------------------------
def _load_labels(path: str, data: Any) -> Any:
    import numpy as np

    p = Path(path)
    if p.suffix.lower() == ".npy":
        return np.load(p, allow_pickle=False)
    if p.suffix.lower() == ".csv":
        import csv

        with open(p, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and not rows[0][1].strip().lstrip("-").isdigit():
            rows = rows[1:]  # header
        by_name = {r[0].strip(): int(r[1]) for r in rows}
        files = getattr(data, "files", None)
        if files is None:
            return np.array([int(r[1]) for r in rows])
        missing = [f.name for f in files if f.name not in by_name]
        if missing:
            raise _UsageError(f"{p}: no label for {missing[:5]}")
        return np.array([by_name[f.name] for f in files])
    return np.array([int(line) for line in p.read_text(encoding="utf-8").split() if line.strip()])


def cmd_evaluate(args: argparse.Namespace) -> int:
    from calib import evaluate

    spec = spec_from_args(args)
    data = _feeds(args, args.reference, spec)
    labels = _load_labels(args.labels, data.source) if args.labels else None
    task = _task(args)
    result = evaluate.evaluate(args.reference, args.candidate, data, labels=labels, task=task,
                               detection=_detection(args))
    doc = result.as_dict()
    verdict = _evaluate_verdict(args, task, result)
    if verdict is not None:
        doc["budget"] = verdict
    text = json.dumps(doc, indent=2, default=float)
    print(text)
    if args.json:
        from calib.cache import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    if verdict is not None and not verdict["met"]:
        print(f"tegrad evaluate: {verdict['text']}: NOT met", file=sys.stderr)
        return 3
    return 0


def _evaluate_verdict(args: argparse.Namespace, task: str, result: Any) -> dict[str, Any] | None:
    """With --min-f1 (detection) or --target-drop (classification): whether the candidate meets it."""
    from calib import plan_cli

    if task == "detection" and args.min_f1 is None and args.target_drop is None:
        return None
    if task == "classification" and args.target_drop is None:
        return None
    budget = plan_cli.budget_from_args(args, task)
    if task == "detection":
        return {"text": budget.describe(), "met": bool((result.f1 or 0.0) >= budget.min_f1)}
    # The bound needs per-sample outcomes; evaluate keeps aggregates, so judge the point estimate
    # of the drop (1 - agreement, or accuracy points with labels) here.
    drop = (result.accuracy_reference - result.accuracy_candidate) if result.accuracy_reference is not None \
        else 1.0 - (result.top1_agreement or 0.0)
    return {"text": f"drop {drop * 100:.1f} points <= {budget.target_drop * 100:g}", "drop": drop,
            "met": bool(drop <= budget.target_drop + 1e-12)}


# ---- wiring --------------------------------------------------------------------------------------
def _wrap(func: Callable[[argparse.Namespace], int], name: str) -> Callable[[argparse.Namespace], int]:
    from calib.cache import CacheMismatchError
    from daemon.errors import ConfigError  # --write-config refusing a config that would not load

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (CacheMismatchError, ConfigError, _UsageError, FileNotFoundError, ValueError) as exc:
            print(f"tegrad {name}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"tegrad {name}: interrupted", file=sys.stderr)
            return 130

    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


def register(subparsers: Any) -> None:
    """Add ``calibrate``, ``quantize``, ``sensitivity``, ``cache`` and ``evaluate`` to ``subparsers``."""
    p = subparsers.add_parser("calibrate", help="collect activation ranges and write a calibration cache",
                              description="Run the model over calibration data with ONNX Runtime and "
                                          "write a portable calibration cache (JSON).")
    p.add_argument("model", help="ONNX model")
    _add_data_options(p, required=False)
    p.add_argument("--algorithm", choices=("auto",) + ALGORITHMS, default="auto",
                   help="amax selection (default auto: each algorithm is scored against FP32 on held-out samples "
                        "of --data and the best is kept)")
    p.add_argument("--percentile", type=float, default=None, help="for --algorithm percentile (default 99.99)")
    p.add_argument("--held-out", type=float, default=None, metavar="FRACTION",
                   help="for --algorithm auto: share of --data held out to score the algorithms (default 0.2; "
                        "at least 8, at most 100 samples)")
    p.add_argument("--task", choices=("classification", "detection"), default=None,
                   help="how auto scores: default detection for a --config with [postprocess] kind = 'yolo', "
                        "else classification")
    p.add_argument("-o", "--out", help="output JSON (default <model>.calib.json)")
    p.add_argument("--trt-out", metavar="PATH", help="also write a TensorRT calibration cache")
    p.add_argument("--trt-version", default=None, help="TensorRT version in the header (default 100300)")
    p.add_argument("--save-observations", metavar="NPZ", help="keep the histograms to try other algorithms later")
    p.add_argument("--observations", metavar="NPZ", help="use saved histograms instead of running the model")
    p.set_defaults(func=_wrap(_require_data(cmd_calibrate), "calibrate"))

    p = subparsers.add_parser("quantize", help="lower an ONNX model to fp16 / int8 / mixed precision",
                              description="Insert Q/DQ (from a calibration cache) and/or FP16 casts.")
    p.add_argument("model", help="ONNX model")
    p.add_argument("--cache", help="calibration cache (tegrad JSON or TensorRT text)")
    p.add_argument("--config", metavar="PATH",
                   help="model folder or its config.toml: precision, calibration_cache, exclude, exclude_precision "
                        "and the target (backend onnxruntime: cpu) from it; flags given still win")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="default: int8 (or the --config's)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="node name or fnmatch pattern kept out of INT8 (repeatable)")
    p.add_argument("--exclude-precision", choices=("fp16", "fp32"), default=None,
                   help="precision of excluded layers in --precision mixed (default: fp16)")
    p.add_argument("--target", choices=("tensorrt", "cpu"), default=None,
                   help="default: tensorrt (cpu for a --config with backend onnxruntime)")
    p.add_argument("--glue", choices=("fp16", "fp32"), default=None,
                   help="type of everything outside Q/DQ (default: fp16 for --target tensorrt, fp32 for cpu)")
    p.add_argument("--no-check", action="store_true", help="skip the model-hash / tensor-name check of the cache")
    p.add_argument("-o", "--out", help="output ONNX (default <model>.<precision>.onnx)")
    p.set_defaults(func=_wrap(cmd_quantize, "quantize"))

    p = subparsers.add_parser("sensitivity", help="rank layers by INT8 sensitivity and suggest exclusions")
    p.add_argument("model", help="ONNX model")
    p.add_argument("--cache", help="calibration cache (not needed for a model that already carries Q/DQ)")
    _add_data_options(p)
    p.add_argument("--max-samples", type=int, default=None, help="samples used to rank layers")
    p.add_argument("--chunk-samples", type=int, default=16, metavar="N",
                   help="rank on a growing slice, N samples at a time (default 16; 0: the whole slice at once)")
    p.add_argument("--stable-top", type=int, default=10, metavar="K",
                   help="stop once the first K layers of the ranking keep their order for one more chunk "
                        "(default 10; 0: measure the whole slice)")
    p.add_argument("--state", metavar="PATH",
                   help="rows are appended here as they are measured, and reused when the same command runs "
                        "again (default: next to --json as .jsonl, else ./<model>.sensitivity.jsonl)")
    p.add_argument("--no-resume", action="store_true", help="measure every row again (the state file restarts)")
    p.add_argument("--full-graph", action="store_true",
                   help="run the whole graph per layer instead of only the subgraph the layer changes (slower)")
    p.add_argument("--write-config", metavar="PATH",
                   help="merge the suggestion (precision, exclude, exclude_precision) into this config.toml "
                        "or model folder, keeping its other keys and comments")
    p.add_argument("--method", choices=("single", "complement"), default="single",
                   help="quantize only this layer (single) or all but this layer (complement)")
    p.add_argument("--min-top1", type=float, default=None,
                   help="older budget: top-1 agreement with FP32 the plan must keep (point estimate; "
                        "default: --target-drop)")
    p.add_argument("--labels", help="labels (.npy, .csv filename,class, or one integer per line): "
                                    "budget becomes accuracy points lost")
    p.add_argument("--task", choices=("classification", "detection"), default=None,
                   help="default: detection for a --config with [postprocess] kind = 'yolo', else classification")
    p.add_argument("--target", choices=("tensorrt", "cpu"), default="tensorrt")
    p.add_argument("--exclude-precision", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    _plan_flags().add_budget_options(p)
    _plan_flags().add_detection_options(p)
    p.set_defaults(func=_wrap(cmd_sensitivity, "sensitivity"))

    p = subparsers.add_parser("cache", help="calibration cache tools")
    sub = p.add_subparsers(dest="cache_command", metavar="{convert}")
    sub.required = True
    c = sub.add_parser("convert", help="convert between tegrad JSON and TensorRT text caches",
                       description="Format by extension (.json = tegrad, .cache/.calib/.txt = TensorRT) or --to.")
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--to", choices=("json", "trt"))
    c.add_argument("--trt-version", default=None, help="header version for TensorRT output")
    c.add_argument("--trt-algorithm", default=None, help="header algorithm for TensorRT output")
    c.set_defaults(func=_wrap(cmd_cache_convert, "cache convert"))

    p = subparsers.add_parser("evaluate", help="compare a lowered model against its reference")
    p.add_argument("reference", help="reference ONNX (usually fp32)")
    p.add_argument("candidate", help="candidate ONNX (fp16 / int8 / mixed)")
    _add_data_options(p)
    p.add_argument("--labels", help="labels: .npy, .csv (filename,class) or one integer per line")
    p.add_argument("--task", choices=("classification", "detection"), default=None,
                   help="default: detection for a --config with [postprocess] kind = 'yolo', else classification")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    _plan_flags().add_budget_options(p, min_f1_default=None)
    _plan_flags().add_detection_options(p)
    p.set_defaults(func=_wrap(cmd_evaluate, "evaluate"))

    _plan_flags().register(subparsers)


def _plan_flags() -> Any:
    from calib import plan_cli

    return plan_cli


def _require_data(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if not args.data and not args.observations:
            raise _UsageError("give --data (or --observations)")
        return func(args)

    return run


def build_parser(prog: str = "tegrad") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="tegrad calibration tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
