"""Staged validation: a freshly built engine must reproduce a bundle's golden FP32 outputs.

:func:`validate` runs the golden inputs through the engine and scores each
golden output with :func:`calib.evaluate.compare_outputs`, the code calibration
uses, against the manifest's :class:`~daemon.rollout.manifest.Validation`
thresholds. Every problem, an engine that raises included, becomes a sentence
in a failed :class:`ValidationReport`: the report is kept with the version it
refused, so it must exist even when nothing could be measured.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from calib.evaluate import compare_outputs
from daemon.rollout.bundle import VerifiedBundle
from daemon.rollout.manifest import Validation

# threshold key -> (score key, words used in failure sentences, True when the score must stay below it)
_CHECKS: dict[str, tuple[str, str, bool]] = {
    "min_top1_agreement": ("top1_agreement", "top-1 agreement", False),
    "min_cosine": ("cosine", "cosine", False),
    "min_f1": ("f1", "detection F1", False),
    "max_rel_error": ("max_rel_error", "max relative error", True),
}
_TASK_SCORES = {"classification": {"top1_agreement", "cosine"}, "detection": {"f1", "cosine"},
                "regression": {"cosine", "max_rel_error"}}
_HIGHER_IS_WORSE = {s for s, _, upper in _CHECKS.values() if upper}


@dataclass(frozen=True)
class ValidationReport:
    passed: bool
    task: str
    scores: dict[str, float]
    thresholds: dict[str, float]
    failures: list[str] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # json.dumps writes NaN, which is not JSON; a NaN score (an engine emitting NaN) is stored as null.
        d["scores"] = {k: v if math.isfinite(v) else None for k, v in self.scores.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ValidationReport:
        return cls(passed=bool(d["passed"]), task=str(d["task"]),
                   scores={k: math.nan if v is None else float(v) for k, v in d["scores"].items()},
                   thresholds={k: float(v) for k, v in d["thresholds"].items()},
                   failures=[str(f) for f in d["failures"]], samples=int(d["samples"]),
                   seconds=float(d["seconds"]))

    def summary(self) -> str:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in self.scores.items()) or "no scores"
        head = f"validation {'passed' if self.passed else 'FAILED'} ({self.task}, {self.samples} samples, {scores})"
        return head if self.passed else f"{head}: {'; '.join(self.failures)}"


def validate(engine: Any, golden_inputs: dict[str, np.ndarray], golden_outputs: dict[str, np.ndarray],
             validation: Validation, *, batch: int | None = None, detection: dict | None = None) -> ValidationReport:
    """Run ``engine`` (slot 0) on the golden inputs and check its outputs against the golden ones.

    Scores are measured on every golden output and the worst one counts:

    * ``top1_agreement`` - share of samples whose argmax matches (classification);
    * ``cosine`` - mean per-sample cosine similarity of the flattened outputs;
    * ``f1`` - F1 of the engine's detections against the golden FP32 detections (same class,
      IoU >= ``match_iou``, default 0.5), on the detection output only;
    * ``max_rel_error`` - the largest per-sample relative error ``||c - r||2 / max(||r||2, 1e-12)``
      (calib's per-sample measure; the epsilon only keeps an all-zero reference finite).

    A task's own scores are always reported; another is measured when its threshold is set.
    ``detection``: :func:`calib.detection.postprocess` keywords (``layout``, ``input_hw``,
    ``score_threshold``, ``iou_threshold``, ``strides``, ...) plus ``match_iou`` and ``output``
    (the detection output; default: the first golden output). YOLOX ``input_hw``
    defaults to the spatial size of a single NCHW golden input.
    """
    start = time.perf_counter()
    thresholds = {k: float(v) for k in _CHECKS if (v := getattr(validation, k)) is not None}
    wanted = _TASK_SCORES[validation.task] | {_CHECKS[k][0] for k in thresholds}
    samples = min((int(a.shape[0]) for a in golden_inputs.values() if a.ndim), default=0)
    det = _detection_params(detection, golden_inputs, golden_outputs) if "f1" in wanted else {}
    det_output = det.pop("output", None)
    scores: dict[str, float] = {}
    failures: list[str] = []
    try:
        got = _run(engine, golden_inputs, samples, batch)
    except Exception as exc:  # any backend's error: the report records it instead of the caller crashing
        failures.append(f"the engine failed on the golden inputs: {type(exc).__name__}: {exc}")
        got = None
    for name, ref in golden_outputs.items() if got is not None else ():
        cand = got.get(name)
        if cand is None:
            failures.append(f"output {name!r} is missing from the engine's results (it gave {sorted(got)})")
        elif cand.shape != ref.shape:
            failures.append(f"output {name!r} has shape {list(cand.shape)}, the golden output {list(ref.shape)}")
        else:
            try:
                measured = _score(ref, cand, wanted, det if name == det_output else None)
            except Exception as exc:  # e.g. a detection decode that does not fit this output
                failures.append(f"output {name!r} could not be compared: {exc}")
                continue
            for key, value in measured.items():
                worse = max if key in _HIGHER_IS_WORSE else min
                # NaN must win, or an engine emitting NaN could hide behind a finite output.
                scores[key] = value if key not in scores or math.isnan(value) else worse(scores[key], value)
    for key, limit in thresholds.items():
        score_key, words, upper = _CHECKS[key]
        value = scores.get(score_key)
        if value is None:
            if not failures:
                failures.append(f"{words} could not be measured (threshold {limit:g})")
        # Written as "not within" so that NaN fails too.
        elif upper and not value <= limit:
            failures.append(f"{words} {value:.4f} > {limit:g}")
        elif not upper and not value >= limit:
            failures.append(f"{words} {value:.4f} < {limit:g}")
    return ValidationReport(passed=not failures, task=validation.task, scores=scores, thresholds=thresholds,
                            failures=failures, samples=samples, seconds=time.perf_counter() - start)


def _run(engine: Any, inputs: dict[str, np.ndarray], samples: int, batch: int | None) -> dict[str, np.ndarray]:
    step = batch if batch and batch > 0 else max(samples, 1)
    parts = []
    for i in range(0, samples, step):
        out = engine.infer({k: v[i:i + step] for k, v in inputs.items()}, 0)
        # Copied at once: an engine may hand back buffers that its next run overwrites.
        parts.append({k: np.array(v) for k, v in out.items()})
    names = set.intersection(*(set(p) for p in parts)) if parts else set()
    return {n: np.concatenate([p[n] for p in parts]) if len(parts) > 1 else parts[0][n] for n in names}


def _score(ref: np.ndarray, cand: np.ndarray, wanted: set[str], det: dict | None) -> dict[str, float]:
    task = "detection" if det is not None else "classification"
    r = compare_outputs([ref], [cand], task=task, detection=det)
    found = {"cosine": r.cosine, "top1_agreement": r.top1_agreement, "f1": r.f1}
    if "max_rel_error" in wanted:
        found["max_rel_error"] = max(compare_outputs([ref[i:i + 1]], [cand[i:i + 1]]).rel_error
                                     for i in range(ref.shape[0]))
    return {k: float(v) for k, v in found.items() if k in wanted and v is not None}


def _detection_params(detection: Mapping | None, inputs: Mapping[str, np.ndarray],
                      outputs: Mapping[str, np.ndarray]) -> dict:
    params = dict(detection or {})
    params.setdefault("output", next(iter(outputs), None))
    if params.get("layout", "yolox") == "yolox" and "input_hw" not in params and len(inputs) == 1:
        shape = next(iter(inputs.values())).shape
        if len(shape) == 4:
            params["input_hw"] = (int(shape[2]), int(shape[3]))
    return params


def bundle_detection(bundle: VerifiedBundle) -> dict | None:
    """Detection options from the bundle config's ``postprocess`` (kind "yolo"), or None."""
    post = bundle.config.postprocess
    return post.detection_params(bundle.config.preprocess) if post is not None else None


async def validate_bundle(bundle: VerifiedBundle, engine: Any) -> ValidationReport:
    """:func:`validate` in a worker thread with the bundle's golden data and thresholds.

    ``engine`` is the model's own engine (tensors in, tensors out), not the pre/post-processing
    wrapper: golden samples are model tensors. Batches follow ``max_batch``, or a fixed first
    dimension of the engine's first input when the model does not batch.
    """
    batch = bundle.config.max_batch or None
    if batch is None and getattr(engine, "inputs", None) and engine.inputs[0].shape:
        batch = engine.inputs[0].shape[0] if engine.inputs[0].shape[0] > 0 else None
    return await asyncio.to_thread(validate, engine, bundle.golden_inputs, bundle.golden_outputs,
                                   bundle.manifest.validation, batch=batch, detection=bundle_detection(bundle))
