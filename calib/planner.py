"""The precision plan: which layers leave INT8 so the model meets an accuracy budget, and what that costs.

A plan takes the layers ranked most sensitive first (:func:`calib.sensitivity.analyze`) and
finds the shortest prefix of that ranking whose exclusion meets the budget. Every check is
one whole-model evaluation on held-out data against the FP32 outputs (computed once).

Search: bisection over the prefix length ``k``. It assumes the budget is monotone in ``k``
(leaving one more layer out of INT8 never makes the model worse). That holds for the error
each layer adds on its own, not exactly for the sum (errors can cancel), so the answer is
the ``k`` where ``k`` passes and ``k - 1`` fails, both measured; it is the smallest prefix
only if the assumption holds. Linear growth made one evaluation per excluded layer (53 on
YOLOX-Nano); bisection makes about ``log2(max_excluded) + 2``.

Budget (:class:`Budget`): classification is judged by the top-1 drop against FP32 (without
labels: the share of samples whose top-1 changes; with labels: accuracy points lost) with a
one-sided Wilson upper confidence bound, not the point estimate: on a hundred images one
image is a whole point, so a point estimate passes or fails plans by luck. Detection is
judged by F1 of the INT8 detections against the FP32 detections (point estimate; F1 counts
boxes, which are many per image). Logit cosine and KL divergence are reported alongside.

A plan also reports the INT8 share (layers and multiply-accumulates) and, on request, the
measured CPU speed of FP32, plain INT8 and the mixed graph run side by side.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from . import lower as _lower
from . import qdq as _qdq
from .evaluate import _is_batched, compare_outputs, detection_defaults, run_batches, session
from .graph import ensure_node_names, ensure_opset, fold_constants, load

#: Default budget: top-1 may drop by at most 2 points against FP32, shown with 80 % confidence.
DEFAULT_TARGET_DROP = 0.02
DEFAULT_CONFIDENCE = 0.8
DEFAULT_MIN_F1 = 0.95
#: Share of the quantizable layers a plan may keep out of INT8 before it says "needs QAT".
DEFAULT_MAX_EXCLUDED_SHARE = 0.25

_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


# ---- statistics ---------------------------------------------------------------------------------
def wilson_upper(failures: int, n: int, confidence: float) -> float:
    """One-sided Wilson score upper bound on a proportion (``failures`` of ``n``) at ``confidence``.

    ``confidence`` 0.5 gives the point estimate.
    """
    if n <= 0:
        return 1.0
    z = statistics.NormalDist().inv_cdf(confidence)
    p = failures / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0)) / (1 + z2 / n)
    return float(min(1.0, centre + half))


def paired_drop_upper(lost: int, gained: int, n: int, confidence: float) -> float:
    """Upper bound on an accuracy drop from paired outcomes: ``lost`` samples FP32 got right and
    INT8 wrong, ``gained`` the reverse. Wilson on the lost ones alone when nothing was gained
    (zero events still leave doubt), else the normal bound on the paired difference."""
    if n <= 0:
        return 1.0
    if gained == 0:
        return wilson_upper(lost, n, confidence)
    z = statistics.NormalDist().inv_cdf(confidence)
    d = (lost - gained) / n
    var = max(lost + gained - n * d * d, 0.0) / (n * n)
    return float(d + z * math.sqrt(var))


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def _kl(ref: np.ndarray, cand: np.ndarray) -> float:
    """Mean KL(FP32 ‖ INT8) of the softmax of the outputs (treated as logits), in nats."""
    p, q = _softmax(ref.astype(np.float64)), _softmax(cand.astype(np.float64))
    return float(np.mean(np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), axis=1)))


# ---- the budget ---------------------------------------------------------------------------------
@dataclass
class Budget:
    """What "accurate enough" means. ``target_drop``: top-1 points (0.02 = 2 points) a classifier
    may lose against FP32; ``confidence``: how sure the bound must be (0.5 = point estimate);
    ``min_f1``: F1 of a detector's boxes against the FP32 boxes."""

    task: str = "classification"
    target_drop: float = DEFAULT_TARGET_DROP
    confidence: float = DEFAULT_CONFIDENCE
    min_f1: float = DEFAULT_MIN_F1

    def __post_init__(self) -> None:
        if self.task not in ("classification", "detection"):
            raise ValueError(f"unknown task {self.task!r}; expected 'classification' or 'detection'")
        if not 0.0 <= self.target_drop <= 1.0:
            raise ValueError(f"target drop {self.target_drop} must be in [0, 1] (0.02 = 2 points)")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence {self.confidence} must be in [0.5, 1)")
        if not 0.0 < self.min_f1 <= 1.0:
            raise ValueError(f"min F1 {self.min_f1} must be in (0, 1]")

    @classmethod
    def from_options(cls, task: str = "classification", target_drop: float | None = None,
                     confidence: float | None = None, min_f1: float | None = None,
                     min_top1: float | None = None) -> Budget:
        """The budget from optional settings: ``min_top1`` is the older point-estimate form
        (agreement >= ``min_top1``); a detector's ``target_drop`` is ``1 - min_f1``."""
        if task == "detection" and target_drop is not None:
            min_f1 = 1.0 - target_drop
        if min_top1 is not None and target_drop is None:
            target_drop, confidence = 1.0 - min_top1, 0.5 if confidence is None else confidence
        return cls(
            task=task,
            target_drop=DEFAULT_TARGET_DROP if target_drop is None else target_drop,
            confidence=DEFAULT_CONFIDENCE if confidence is None else confidence,
            min_f1=DEFAULT_MIN_F1 if min_f1 is None else min_f1,
        )

    def describe(self, labels: bool = False) -> str:
        if self.task == "detection":
            return f"F1 vs FP32 detections >= {self.min_f1:g}"
        what = "accuracy drop" if labels else "top-1 drop vs FP32"
        how = "point estimate" if self.confidence == 0.5 else f"{self.confidence:.0%} upper bound"
        return f"{what} <= {self.target_drop * 100:g} points ({how})"

    def judge(self, reference: list[np.ndarray], candidate: list[np.ndarray], labels=None,
              detection: Mapping | None = None) -> dict[str, Any]:
        """One whole-model measurement: the usual metrics plus ``drop``, ``drop_bound`` and ``met``."""
        r = compare_outputs(reference, candidate, labels=labels, task=self.task, detection=detection)
        out = r.as_dict()
        if self.task == "detection":
            out["met"] = bool((r.f1 or 0.0) >= self.min_f1)
            out["drop"] = 1.0 - (r.f1 or 0.0)
            return out
        ref = np.concatenate([a.reshape(a.shape[0], -1) for a in reference])
        cand = np.concatenate([a.reshape(a.shape[0], -1) for a in candidate])
        out["kl"] = _kl(ref, cand)
        n = ref.shape[0]
        top_r, top_c = ref.argmax(axis=1), cand.argmax(axis=1)
        if labels is not None:
            y = np.concatenate([np.asarray(v).reshape(-1) for v in labels]) if _is_batched(labels) \
                else np.asarray(labels).reshape(-1)
            lost = int(((top_r == y) & (top_c != y)).sum())
            gained = int(((top_r != y) & (top_c == y)).sum())
            out["drop"] = (lost - gained) / n
            out["drop_bound"] = paired_drop_upper(lost, gained, n, self.confidence)
        else:
            flips = int((top_r != top_c).sum())
            out["flips"] = flips
            out["drop"] = flips / n
            out["drop_bound"] = wilson_upper(flips, n, self.confidence)
        out["met"] = bool(out["drop_bound"] <= self.target_drop + 1e-12)
        return out


def smallest_provable_drop(n: int, confidence: float) -> float:
    """The bound with no sample changed: targets below it cannot be met on ``n`` samples."""
    return wilson_upper(0, n, confidence)


# ---- the search ---------------------------------------------------------------------------------
def smallest_prefix(check: Callable[[int], bool], limit: int, search: str = "bisect") -> tuple[int | None, list[int]]:
    """Smallest ``k`` in ``[0, limit]`` with ``check(k)``, assuming ``check`` is monotone.

    Returns ``(k, evaluated ks in order)``; ``k`` is None when even ``limit`` fails. With
    ``"bisect"`` the answer is verified: ``check(k)`` passed and ``check(k - 1)`` failed (or
    ``k`` is 0). ``"linear"`` tries 0, 1, 2, … as the plan did before.
    """
    if search not in ("bisect", "linear"):
        raise ValueError(f"unknown search {search!r}; expected 'bisect' or 'linear'")
    seen: dict[int, bool] = {}

    def ok(k: int) -> bool:
        if k not in seen:
            seen[k] = bool(check(k))
        return seen[k]

    if search == "linear":
        for k in range(limit + 1):
            if ok(k):
                return k, list(seen)
        return None, list(seen)
    if ok(0):
        return 0, list(seen)
    if limit == 0 or not ok(limit):
        return None, list(seen)
    lo, hi = 0, limit  # lo fails, hi passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi, list(seen)


# ---- cost of a plan -----------------------------------------------------------------------------
def layer_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates per sample of every weighted Conv / Gemm / MatMul layer, by node name.

    From ONNX shape inference; a layer whose output shape is not known (dynamic spatial size)
    is left out, so shares are over the layers that are known.
    """
    m = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int | None]] = {}
    for v in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    weights = {i.name: list(i.dims) for i in m.graph.initializer}
    macs: dict[str, int] = {}
    for node in m.graph.node:
        if node.op_type not in _MAC_OPS or len(node.input) < 2 or node.input[1] not in weights:
            continue
        w = weights[node.input[1]]
        # Each weight is used once per spatial position (Conv: of the output, ConvTranspose: of
        # the input) or once per row of a matrix product (every dim between batch and features).
        shape = shapes.get(node.input[0] if node.op_type == "ConvTranspose" else node.output[0])
        if shape is None:
            continue
        spatial = shape[2:] if node.op_type.startswith("Conv") else shape[1:-1]
        if any(d is None or d <= 0 for d in spatial):
            continue
        macs[node.name] = int(np.prod(w, dtype=np.int64) * np.prod(spatial or [1], dtype=np.int64))
    return macs


def int8_share(base: onnx.ModelProto, excluded: Sequence[str], target: str) -> dict[str, Any]:
    """Layers and MACs that run INT8 with ``excluded`` left out, against all weighted layers."""
    quantizable = [n.name for n in _qdq.build_plan(base, (), target).quantized_nodes]
    int8 = [n.name for n in _qdq.build_plan(base, tuple(excluded), target).quantized_nodes]
    macs = layer_macs(base)
    total_macs = sum(macs.values())
    int8_macs = sum(macs.get(n, 0) for n in int8)
    return {
        "int8_layers": len(int8),
        "total_layers": len(quantizable),
        "weighted_layers": sum(1 for n in base.graph.node if n.op_type in _MAC_OPS),
        "int8_macs": int8_macs,
        "total_macs": total_macs,
        "int8_mac_share": (int8_macs / total_macs) if total_macs else None,
    }


def measure_speed(models: Mapping[str, onnx.ModelProto], batch, repeats: int = 7, progress: bool = False) -> dict[str, Any]:
    """Median seconds per run of each model on the same batch, runs interleaved so load hits all alike.

    One warm-up run each, then ``repeats`` rounds of one run per model.
    """
    sessions = {name: session(m) for name, m in models.items()}
    feeds = {}
    for name, s in sessions.items():
        spec = s.get_inputs()[0]
        value = batch if not isinstance(batch, Mapping) else batch[spec.name]
        feeds[name] = {spec.name: np.asarray(value, dtype=np.float32)}
        s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    rounds: Iterable[int] = range(repeats)
    if progress:
        from tqdm import tqdm

        rounds = tqdm(rounds, desc="speed (FP32 / INT8 / mixed)", unit="round")
    for _ in rounds:
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append(time.perf_counter() - t0)
    median = {name: statistics.median(t) for name, t in times.items()}
    out: dict[str, Any] = {"repeats": repeats, "seconds": median}
    if "fp32" in median:
        out["speedup_vs_fp32"] = {n: median["fp32"] / t for n, t in median.items() if n != "fp32" and t > 0}
    if "int8" in median and "mixed" in median and median["mixed"] > 0:
        out["mixed_vs_int8"] = median["int8"] / median["mixed"]
    try:
        out["load_average"] = list(os.getloadavg())
    except OSError:  # pragma: no cover - not on every platform
        pass
    return out


# ---- the plan -----------------------------------------------------------------------------------
@dataclass
class PrecisionPlan:
    excluded: list[str]
    int8_layers: int
    total_layers: int
    achieved: dict
    met: bool
    history: list[dict] = field(default_factory=list)
    budget: str = ""
    search: str = "bisect"
    max_excluded: int | None = None
    share: dict = field(default_factory=dict)
    speed: dict | None = None

    @property
    def evaluations(self) -> int:
        return len(self.history)

    def as_dict(self) -> dict:
        return {
            "excluded": list(self.excluded),
            "int8_layers": self.int8_layers,
            "total_layers": self.total_layers,
            "achieved": dict(self.achieved),
            "met": self.met,
            "budget": self.budget,
            "search": self.search,
            "max_excluded": self.max_excluded,
            "evaluations": self.evaluations,
            "share": dict(self.share),
            "speed": self.speed,
            "history": list(self.history),
        }

    def summary(self) -> str:
        """One line: how much stays INT8 and what it measures."""
        mac = self.share.get("int8_mac_share")
        text = (f"{len(self.excluded)} of {self.total_layers} layers out of INT8 ({self.int8_layers} stay INT8"
                + (f", {mac:.1%} of the MACs" if mac is not None else "") + f"); {self.budget}: "
                + ("met" if self.met else "NOT met") + f" ({describe_result(self.achieved)}); "
                + f"{self.evaluations} whole-model evaluations ({self.search})")
        if self.speed and self.speed.get("speedup_vs_fp32"):
            text += "; CPU " + speed_text(self.speed)
        return text


def describe_result(r: Mapping[str, Any]) -> str:
    """The measured numbers of one evaluation, short."""
    parts = []
    if r.get("f1") is not None:
        parts.append(f"F1 {r['f1']:.3f}")
    if r.get("top1_agreement") is not None:
        parts.append(f"top-1 agreement {r['top1_agreement']:.3f}")
    if r.get("accuracy_candidate") is not None:
        parts.append(f"accuracy {r['accuracy_candidate']:.3f} vs {r['accuracy_reference']:.3f}")
    if r.get("drop_bound") is not None:
        parts.append(f"drop {r['drop'] * 100:.1f} pt (bound {r['drop_bound'] * 100:.1f})")
    if r.get("kl") is not None:
        parts.append(f"KL {r['kl']:.4f}")
    if r.get("cosine") is not None:
        parts.append(f"cosine {r['cosine']:.4f}")
    return ", ".join(parts)


def speed_text(speed: Mapping[str, Any]) -> str:
    s = speed.get("speedup_vs_fp32", {})
    parts = [f"{name} {v:.2f}x" for name, v in s.items()]
    text = "speed-up vs FP32: " + ", ".join(parts)
    if speed.get("mixed_vs_int8") is not None:
        text += f"; mixed runs at {speed['mixed_vs_int8']:.2f}x the speed of plain INT8"
    return text


def prepared(model) -> onnx.ModelProto:
    """Fold and upgrade once (nodes named first, so names match lower(..., exclude=...))."""
    base = load(model)
    ensure_node_names(base)
    return ensure_opset(fold_constants(base))


def graph_for(base: onnx.ModelProto, amax, excluded: Sequence[str], target: str, exclude_precision: str | None):
    """The lowered graph with ``excluded`` kept out of INT8 (the cheap path when nothing is)."""
    if exclude_precision is None or not excluded:
        m = onnx.ModelProto()
        m.CopyFrom(base)
        return _qdq.insert_qdq(m, amax, exclude=sorted(excluded), target=target)
    return _lower.lower(base, "mixed", amax=amax, exclude=sorted(excluded), exclude_precision=exclude_precision,
                        target=target)


def default_max_excluded(total_layers: int, share: float = DEFAULT_MAX_EXCLUDED_SHARE) -> int:
    return max(1, math.ceil(total_layers * share)) if total_layers else 0


def grow(
    order: Sequence[str],
    model,
    amax: Mapping[str, float],
    data: Iterable,
    budget: Budget,
    labels=None,
    detection: Mapping | None = None,
    exclude_precision: str = "fp16",
    target: str = "tensorrt",
    max_excluded: int | None = None,
    search: str = "bisect",
    reference: list[np.ndarray] | None = None,
    progress: bool = False,
    speed_batch=None,
    speed_repeats: int = 7,
    known: Mapping[int, dict] | None = None,
) -> PrecisionPlan:
    """Exclude the shortest prefix of ``order`` (most sensitive first) that meets ``budget``.

    ``data`` is held-out data (never the calibration set). ``max_excluded`` caps the prefix
    (default: all of ``order``). ``speed_batch``: when given, FP32, plain INT8 and the plan's
    graph are timed on it side by side, lowered for the CPU target (the U8 grid ONNX Runtime
    fuses; excluded layers FP32) whatever ``target`` the accuracy is measured on. ``known``:
    measurements already made (prefix length → :meth:`Budget.judge` result plus ``excluded``),
    not repeated.
    """
    base = prepared(model)
    if budget.task == "detection":
        detection = detection_defaults(base, detection)
    batches = list(data)
    if reference is None:
        reference = run_batches(base, batches)
    limit = len(order) if max_excluded is None else max(0, min(max_excluded, len(order)))
    measured: dict[int, dict] = dict(known or {})
    bar = None
    if progress:
        from tqdm import tqdm

        expected = limit + 1 if search == "linear" else (math.ceil(math.log2(limit)) + 2 if limit > 1 else limit + 1)
        bar = tqdm(total=expected, desc=f"plan ({search})", unit="eval")

    def check(k: int) -> bool:
        if k in measured:
            return bool(measured[k]["met"])
        excluded = list(order[:k])
        graph = graph_for(base, amax, excluded, target, exclude_precision if excluded else None)
        r = budget.judge(reference, run_batches(graph, batches), labels=labels, detection=detection)
        entry = {"excluded": k, **r}
        if k:
            entry["layer"] = order[k - 1]
        measured[k] = entry
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"k={k} {'met' if r['met'] else 'not met'}")
        return r["met"]

    try:
        k, tried = smallest_prefix(check, limit, search)
    finally:
        if bar is not None:
            bar.close()
    met = k is not None
    chosen = k if met else limit
    if chosen not in measured:  # linear search stopped early or limit never tried
        check(chosen)
        tried.append(chosen)
    excluded = list(order[:chosen])
    share = int8_share(base, excluded, target)
    plan = PrecisionPlan(
        excluded=excluded,
        int8_layers=share["int8_layers"],
        total_layers=share["total_layers"],
        achieved=measured[chosen],
        met=met,
        history=[measured[t] for t in tried],
        budget=budget.describe(labels is not None),
        search=search,
        max_excluded=limit,
        share=share,
    )
    if speed_batch is not None:
        plan.speed = speed_of(base, amax, excluded, speed_batch, speed_repeats, progress)
    return plan


def speed_of(base: onnx.ModelProto, amax, excluded: Sequence[str], batch, repeats: int = 7,
             progress: bool = False) -> dict[str, Any]:
    """CPU speed of FP32, plain INT8 and (when something is excluded) the mixed graph, side by side."""
    models = {"fp32": base, "int8": graph_for(base, amax, (), "cpu", None)}
    if excluded:
        models["mixed"] = graph_for(base, amax, excluded, "cpu", "fp32")
    return measure_speed(models, batch, repeats=repeats, progress=progress)


def batch_len(batch) -> int:
    if isinstance(batch, Mapping):
        return int(np.asarray(next(iter(batch.values()))).shape[0])
    return int(np.asarray(batch).shape[0])
