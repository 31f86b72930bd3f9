"""Per-layer INT8 sensitivity and a precision plan (which layers to keep out of INT8).

The automatic, CPU-runnable version of ``polygraphy debug precision``: every graph is the
real lowered graph run on ONNX Runtime, compared with FP32 outputs computed once.

Measures (``method``):

- ``"single"`` (default): quantize only that layer, everything else FP32; the error it
  causes on the model outputs. Cheap to interpret, independent of the other layers.
- ``"complement"``: quantize every layer except that one; the error removed by leaving it
  out (full-INT8 error minus this error). It sees interactions between layers (errors that
  only matter once the rest is quantized) and measures exactly what :func:`plan` does,
  at the same cost.

Both build one graph and one ONNX Runtime session per layer and run them on the same small
slice, so cost is layers × (lowering + session + slice inference); see ``max_samples``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from . import lower as _lower
from . import planner as _planner
from . import qdq as _qdq
from .evaluate import EvalResult, compare_outputs, detection_defaults, run_batches
from .graph import ensure_node_names, ensure_opset, fold_constants, load


@dataclass
class SensitivityRow:
    layer: str
    op_type: str
    top1_agreement: float | None
    cosine: float
    rel_error: float
    f1: float | None = None
    score: float = 0.0  # higher = more sensitive; what the ranking uses


@dataclass
class SensitivityReport:
    rows: list[SensitivityRow]
    method: str
    samples: int
    seconds: float
    task: str = "classification"
    full_int8: EvalResult | None = None

    def to_table(self, limit: int | None = None) -> str:
        head = f"{'#':>3}  {'layer':<48} {'op':<14} {'top1':>7} {'cosine':>9} {'rel_err':>9}"
        if self.task == "detection":
            head += f" {'F1':>7}"
        lines = [
            f"INT8 sensitivity ({self.method}: "
            + ("only this layer quantized" if self.method == "single" else "all layers but this one quantized")
            + f"), {self.samples} samples, {self.seconds:.1f} s",
            head,
        ]
        for i, r in enumerate(self.rows[:limit] if limit else self.rows, 1):
            top1 = "-" if r.top1_agreement is None else f"{r.top1_agreement:.4f}"
            line = f"{i:>3}  {r.layer[-48:]:<48} {r.op_type:<14} {top1:>7} {r.cosine:>9.6f} {r.rel_error:>9.5f}"
            if self.task == "detection":
                line += f" {'-' if r.f1 is None else f'{r.f1:.4f}':>7}"
            lines.append(line)
        if self.full_int8 is not None:
            f = self.full_int8
            lines.append(
                f"full INT8: top1 {f.top1_agreement if f.top1_agreement is not None else '-'}"
                f"  cosine {f.cosine:.6f}  rel_err {f.rel_error:.5f}" + (f"  F1 {f.f1:.4f}" if f.f1 is not None else "")
            )
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "samples": self.samples,
            "seconds": self.seconds,
            "rows": [r.__dict__.copy() for r in self.rows],
        }


# The plan's type lives with the planner; kept under this name for callers of plan().
Plan = _planner.PrecisionPlan


def _take(data: Iterable, max_samples: int | None) -> list:
    """The first ``max_samples`` samples of ``data`` (batches are cut, not dropped)."""
    out, n = [], 0
    for batch in data:
        if max_samples is not None and n >= max_samples:
            break
        size = _batch_size(batch)
        if max_samples is not None and n + size > max_samples:
            batch = _cut(batch, max_samples - n)
            size = max_samples - n
        out.append(batch)
        n += size
    if not out:
        raise ValueError("no data for sensitivity analysis")
    return out


def _batch_size(batch) -> int:
    if isinstance(batch, Mapping):
        return int(np.asarray(next(iter(batch.values()))).shape[0])
    return int(np.asarray(batch).shape[0])


def _cut(batch, n: int):
    if isinstance(batch, Mapping):
        return {k: np.asarray(v)[:n] for k, v in batch.items()}
    return np.asarray(batch)[:n]


def quantizable_layers(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(name, op type) of the weighted layers INT8 lowering quantizes, in graph order."""
    m = load(model)
    ensure_node_names(m)
    plan = _qdq.build_plan(fold_constants(m), (), "tensorrt")
    return [(n.name, n.op_type) for n in plan.quantized_nodes]


def _prepared(model) -> onnx.ModelProto:
    """Fold and upgrade once, so the per-layer graphs skip that work."""
    # Same order as lower(): unnamed nodes get their names before folding renumbers them,
    # so report names can be passed to lower(..., exclude=...) on the original model.
    base = load(model)
    ensure_node_names(base)
    return ensure_opset(fold_constants(base))


def _int8_graph(base: onnx.ModelProto, amax, excluded: Iterable[str], target: str, exclude_precision: str | None):
    excluded = sorted(excluded)
    if exclude_precision is None or not excluded:
        m = onnx.ModelProto()
        m.CopyFrom(base)
        # Lowering internals without the full checker: analysis builds dozens of graphs.
        return _qdq.insert_qdq(m, amax, exclude=excluded, target=target)
    return _lower.lower(base, "mixed", amax=amax, exclude=excluded, exclude_precision=exclude_precision, target=target)


def analyze(
    model: onnx.ModelProto | str | os.PathLike,
    amax: Mapping[str, float],
    data: Iterable,
    max_samples: int | None = None,
    method: str = "single",
    task: str = "classification",
    detection: Mapping | None = None,
    target: str = "tensorrt",
    progress: bool = False,
) -> SensitivityReport:
    """Rank the quantizable layers by the output error INT8 causes there, most sensitive first.

    ``data`` as for :func:`calib.evaluate.evaluate`; ``max_samples`` caps the slice used (a
    few dozen held-out samples rank layers well; the cost grows linearly with it).
    """
    if method not in ("single", "complement"):
        raise ValueError(f"unknown method {method!r}; expected 'single' or 'complement'")
    t0 = time.perf_counter()
    base = _prepared(model)
    if task == "detection":
        detection = detection_defaults(base, detection)
    layers = quantizable_layers(base)
    names = [n for n, _ in layers]
    batches = _take(data, max_samples)
    samples = sum(_batch_size(b) for b in batches)
    reference = run_batches(base, batches)
    full = compare_outputs(reference, run_batches(_int8_graph(base, amax, (), target, None), batches), task=task, detection=detection)
    rows = []
    iterator = layers
    if progress:
        from tqdm import tqdm

        iterator = tqdm(layers, desc=f"sensitivity ({method})", unit="layer")
    for name, op in iterator:
        excluded = [n for n in names if n != name] if method == "single" else [name]
        graph = _int8_graph(base, amax, excluded, target, None)
        r = compare_outputs(reference, run_batches(graph, batches), task=task, detection=detection)
        if method == "single":
            score = r.rel_error
        else:
            score = full.rel_error - r.rel_error
        rows.append(SensitivityRow(name, op, r.top1_agreement, r.cosine, r.rel_error, r.f1, float(score)))
    rows.sort(key=lambda r: r.score, reverse=True)
    return SensitivityReport(rows, method, samples, time.perf_counter() - t0, task, full)


def plan(
    report: SensitivityReport,
    model: onnx.ModelProto | str | os.PathLike,
    amax: Mapping[str, float],
    data: Iterable,
    min_top1: float | None = None,
    labels=None,
    task: str = "classification",
    detection: Mapping | None = None,
    min_f1: float | None = None,
    exclude_precision: str = "fp16",
    target: str = "tensorrt",
    max_excluded: int | None = None,
    target_drop: float | None = None,
    confidence: float | None = None,
    search: str = "bisect",
    progress: bool = False,
    speed_batch=None,
) -> Plan:
    """Leave the shortest prefix of the report's ranking out of INT8 that meets the budget.

    See :mod:`calib.planner`. Budget: ``target_drop`` top-1 points against FP32 (accuracy
    points with ``labels``) at ``confidence`` (defaults: 2 points, 80 % upper bound); the
    older ``min_top1`` is the point-estimate form (top-1 agreement >= ``min_top1``);
    detectors: F1 against the FP32 detections >= ``min_f1``. ``data``: held-out data.
    """
    budget = _planner.Budget.from_options(task, target_drop, confidence, min_f1, min_top1)
    order = [r.layer for r in report.rows]
    return _planner.grow(order, model, amax, data, budget, labels=labels, detection=detection,
                         exclude_precision=exclude_precision, target=target, max_excluded=max_excluded,
                         search=search, progress=progress, speed_batch=speed_batch)
