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

Both build one graph per layer and run it on the same slice. For "single" only the subgraph
the layer's Q/DQ change runs (:mod:`calib.subgraph`), fed with FP32 tensors computed once per
chunk of the slice; the ranking stops early once its top is stable over a growing slice; and
every row can be appended to a resumable file (:mod:`calib.sensitivity_state`). A model that
already carries Q/DQ is ranked by the error its own pairs add.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from . import explicit as _explicit
from . import lower as _lower
from . import planner as _planner
from . import progress as _progress
from . import qdq as _qdq
from .detection import precision_recall_f1
from .evaluate import EvalResult, compare_outputs, decode_reference, detection_defaults, run_batches
from .evaluate import session as evaluate_session
from .graph import Graph, ensure_node_names, ensure_opset, fold_batchnorm, fold_constants, load, prune
from .sensitivity_state import StateFile, digest
from .subgraph import Baseline, RegionRunner, TensorCache, changed_region


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
    stopped_early: bool = False  # the ranking was stable before the slice's end (see analyze)
    explicit: bool = False  # ranked the model's own Q/DQ pairs

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
            "stopped_early": self.stopped_early,
            "explicit": self.explicit,
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


def _strip_qdq(model: onnx.ModelProto, keep: Iterable[str] = ()) -> onnx.ModelProto:
    """``model`` (modified) without its Q/DQ, except the pairs read by the nodes named in ``keep``."""
    keep = set(keep)
    g = Graph(model)
    for dq in list(g.graph.node):
        if dq.op_type != "DequantizeLinear":
            continue
        if g.is_constant(dq.input[0]):
            replacement = None  # made on first use: a float copy of the constant
        else:
            q = g.producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            replacement = q.input[0]
        for reader in g.consumers.get(dq.output[0], []):
            if reader.name in keep:
                continue
            if replacement is None:
                replacement = g.add_initializer(f"{dq.output[0]}_float", _explicit._dequantize(g, dq))
            reader.input[:] = [replacement if x == dq.output[0] else x for x in reader.input]
    prune(model)
    return model


class _Candidates:
    """The graphs one analysis compares: FP32 reference, full INT8, and one per layer."""

    def __init__(self, model, amax, method: str, target: str):
        src = load(model)
        self.explicit = _explicit.has_qdq(src)
        self.method, self.target = method, target
        if self.explicit:
            # A pre-quantized model: its own Q/DQ are what is measured; reference = all of them removed.
            ensure_node_names(src)
            _explicit.validate(src)
            # Not normalized: a QAT export's float weights (behind Q→DQ) are the reference's weights;
            # a PTQ export has int8 weights only, so its reference has their dequantized values.
            m = fold_constants(ensure_opset(src), keep_ops=_explicit.QDQ_OPS)
            self.quantized = m
            self.base = _strip_qdq(load(m))
            self.activations = self.base
            precisions = _lower.layer_precisions(m)
            self.layers = [(n.name, n.op_type) for n in Graph(m).weighted_nodes() if precisions.get(n.name) == "int8"]
        else:
            if amax is None:
                raise ValueError("a float model needs amax values from a calibration cache (the model has no Q/DQ)")
            self.amax = amax
            self.base = _planner.prepared(model)
            self.layers = quantizable_layers(self.base)
            # What the lowering does before Q/DQ on the CPU target, so unchanged regions match.
            self.activations = fold_batchnorm(load(self.base)) if target == "cpu" else self.base
        self.names = [n for n, _ in self.layers]

    def full(self) -> onnx.ModelProto:
        if self.explicit:
            return self._for_target(load(self.quantized))
        return _planner.graph_for(self.base, self.amax, (), self.target, None)

    def layer(self, name: str) -> onnx.ModelProto:
        if self.explicit:
            m = load(self.quantized)
            if self.method == "single":
                return self._for_target(_strip_qdq(m, keep=[name]))
            _explicit.remove_pairs(m, [name])
            return self._for_target(m)
        excluded = [n for n in self.names if n != name] if self.method == "single" else [name]
        return _planner.graph_for(self.base, self.amax, excluded, self.target, None)

    def _for_target(self, m: onnx.ModelProto) -> onnx.ModelProto:
        return _explicit.to_u8_grid(m) if self.target == "cpu" else m


def _chunks(batches: list, chunk_samples: int | None) -> list[list]:
    """Whole batches grouped into chunks of at least ``chunk_samples`` samples (the last may be short)."""
    if not chunk_samples:
        return [batches]
    out, cur, n = [], [], 0
    for b in batches:
        cur.append(b)
        n += _batch_size(b)
        if n >= chunk_samples:
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


def _data_digest(batches: list) -> str:
    parts = []
    for b in batches:
        items = sorted(b.items()) if isinstance(b, Mapping) else [("", b)]
        for k, v in items:
            a = np.ascontiguousarray(v)
            parts += [k, str(a.dtype), str(a.shape), a.tobytes()]
    return digest(*parts)


def _merge(stats: list[dict], task: str) -> EvalResult:
    """One result from per-chunk results: sample-weighted means, detection counts summed."""
    n = sum(s["samples"] for s in stats)
    r = EvalResult(task=task, samples=n, cosine=sum(s["cosine"] * s["samples"] for s in stats) / n,
                   rel_error=sum(s["rel_error"] * s["samples"] for s in stats) / n)
    if all("top1_agreement" in s for s in stats):
        r.top1_agreement = sum(s["top1_agreement"] * s["samples"] for s in stats) / n
    if task == "detection":
        n_c = sum(s["detections_candidate"] for s in stats)
        n_r = sum(s["detections_reference"] for s in stats)
        tp = sum(round(s["precision"] * s["detections_candidate"]) for s in stats)
        r.precision, r.recall, r.f1 = precision_recall_f1(tp, n_c, n_r)
        r.detections_candidate, r.detections_reference = n_c, n_r
    return r


def _chunk_stats(result: EvalResult) -> dict:
    keys = ("samples", "cosine", "rel_error", "top1_agreement", "precision", "detections_candidate",
            "detections_reference")
    return {k: getattr(result, k) for k in keys if getattr(result, k) is not None}


def _ranked(layers, per_layer: dict[str, list[dict]], full: EvalResult, method: str, task: str) -> list[SensitivityRow]:
    rows = []
    for name, op in layers:
        r = _merge(per_layer[name], task)
        score = r.rel_error if method == "single" else full.rel_error - r.rel_error
        rows.append(SensitivityRow(name, op, r.top1_agreement, r.cosine, r.rel_error, r.f1, float(score)))
    rows.sort(key=lambda r: r.score, reverse=True)  # stable: ties keep graph order
    return rows


def analyze(
    model: onnx.ModelProto | str | os.PathLike,
    amax: Mapping[str, float] | None,
    data: Iterable,
    max_samples: int | None = None,
    method: str = "single",
    task: str = "classification",
    detection: Mapping | None = None,
    target: str = "tensorrt",
    progress: bool = False,
    chunk_samples: int | None = 16,
    stable_top: int = 10,
    state: str | os.PathLike | None = None,
    fast: bool = True,
    log: Callable[[str], None] | None = None,
) -> SensitivityReport:
    """Rank the quantizable layers by the output error INT8 causes there, most sensitive first.

    ``data`` as for :func:`calib.evaluate.evaluate`; ``max_samples`` caps the slice used.
    A model that already carries Q/DQ (QAT / PTQ export) is ranked by the error its own pairs
    add (``amax`` unused, reference = the model without Q/DQ); otherwise ``amax`` is needed.

    The slice is measured in chunks of ``chunk_samples`` (whole batches). After each chunk from
    the second on, the ranking over all chunks so far is compared with the one before; when its
    first ``stable_top`` layers are the same, in the same order, the analysis stops there
    (``stable_top=0`` or ``chunk_samples=None``: the whole slice). With ``fast`` and method
    "single", each layer runs only its subgraph (see :mod:`calib.subgraph`) on FP32 tensors
    computed once per chunk. ``state``: a file every row is appended to as it is measured; a
    second call with the same inputs reuses those rows (see :mod:`calib.sensitivity_state`).
    ``log``: where one-line notes go (state reused or restarted, early stop).
    """
    if method not in ("single", "complement"):
        raise ValueError(f"unknown method {method!r}; expected 'single' or 'complement'")
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    cands = _Candidates(model, amax, method, target)
    base = cands.base
    if task == "detection":
        detection = detection_defaults(base, detection)
    layers, names = cands.layers, cands.names
    if not layers:
        raise ValueError("the model has no quantized layers to rank")
    batches = _take(data, max_samples)
    chunks = _chunks(batches, chunk_samples)
    output = base.graph.output[0].name
    key = {
        "model": digest(load(model).SerializeToString()),
        "amax": digest(json.dumps(dict(amax or {}), sort_keys=True, default=float)),
        "data": _data_digest(batches),
        "method": method, "task": task, "target": target, "detection": dict(detection or {}),
        # Not stable_top: rows do not depend on where the ranking stops, so a rerun that measures
        # further (--stable-top 0) reuses the chunks already there.
        "chunk_samples": chunk_samples,
    }
    record = StateFile(state, key) if state is not None else None
    if record is not None:
        if record.reason:
            say(record.reason)
        elif record.count("layer"):
            say(f"{record.path}: reusing {record.count('layer')} measured rows")

    def stored(kind: str, ci: int, layer: str = "") -> dict | None:
        row = record.get(kind, ci, layer) if record is not None else None
        return row["stats"] if row is not None else None

    def keep(kind: str, ci: int, result: EvalResult, layer: str = "") -> dict:
        stats = _chunk_stats(result)
        if record is not None:
            record.add(kind, ci, layer, stats=stats)
        return stats

    use_regions = fast and method == "single"
    runners: dict[str, object] = {}
    cache = None
    full_session = None
    full_stats: list[dict] = []
    per_layer: dict[str, list[dict]] = {n: [] for n in names}
    bar = _progress.bar(len(layers) * len(chunks), f"sensitivity ({method})", progress, unit="layer")
    previous_top = None
    rows: list[SensitivityRow] = []
    used = 0
    stopped = False
    try:
        for ci, chunk in enumerate(chunks):
            n_chunk = sum(_batch_size(b) for b in chunk)
            bar.set_postfix_str(f"chunk {ci + 1}/{len(chunks)}, {used + n_chunk} samples")
            missing = [n for n in names if stored("layer", ci, n) is None]
            if missing or stored("full", ci) is None:
                if use_regions and cache is None:
                    cache, runners = _regions(cands, output, chunk[0], progress)
                if cache is not None:
                    tensors = _run_phase(cache.run, chunk, "FP32 reference", progress)
                    reference = ([t[output] for t in tensors] if cands.activations is base
                                 else run_batches(base, chunk))
                else:
                    tensors = None
                    reference = _run_phase(lambda bs: run_batches(base, bs), chunk, "FP32 reference", progress)
                ref_dets = decode_reference(reference, detection) if task == "detection" else None

                def compare(outs, ref=reference, dets=ref_dets) -> EvalResult:
                    return compare_outputs(ref, outs, task=task, detection=detection, reference_detections=dets)

            f = stored("full", ci)
            if f is None:
                full_session = full_session or evaluate_session(cands.full())
                outs = _run_phase(lambda bs, s=full_session: run_batches(s, bs), chunk, "full INT8", progress)
                f = keep("full", ci, compare(outs))
            full_stats.append(f)
            for name in names:
                r = stored("layer", ci, name)
                if r is None:
                    runner = runners.get(name)
                    if runner is not None:
                        outs = runner.run(tensors)
                    else:
                        outs = run_batches(cands.layer(name), chunk)
                    r = keep("layer", ci, compare(outs), name)
                per_layer[name].append(r)
                bar.update(1)
            used += n_chunk
            full = _merge(full_stats, task)
            rows = _ranked(layers, per_layer, full, method, task)
            top = [r.layer for r in rows[:stable_top]]
            if stable_top and previous_top == top and ci + 1 < len(chunks):
                stopped = True
                break
            previous_top = top
    finally:
        bar.close()
    if stopped:
        say(f"ranking stable: top {len(top)} in the same order after {used} of {sum(map(_batch_size, batches))} "
            "samples; stopped there (--stable-top 0 measures them all)")
    return SensitivityReport(rows, method, used, time.perf_counter() - t0, task, _merge(full_stats, task),
                             stopped, cands.explicit)


def _regions(cands: _Candidates, output: str, example_batch, progress: bool):
    """A runner per layer (its changed subgraph) and the FP32 tensor cache their cuts need."""
    act = cands.activations
    probe = TensorCache(act).run([example_batch])[0]  # one batch, to type the cut inputs
    runners, cut = {}, {output}
    baseline = Baseline(act)
    bar = _progress.bar(len(cands.names), "preparing subgraphs", progress, unit="layer", leave=False)
    try:
        for name in cands.names:
            cand = cands.layer(name)
            region = changed_region(baseline, cand, output)
            if region is not None:
                runners[name] = RegionRunner(cand, region, probe)
                cut.update(region.cut)
            bar.update(1)
    finally:
        bar.close()
    del probe
    return TensorCache(act, cut), runners


def _run_phase(run, chunk: list, desc: str, progress: bool) -> list:
    """``run`` over the chunk's batches one at a time, with a progress bar."""
    bar = _progress.bar(len(chunk), desc, progress, unit="batch", leave=False)
    out = []
    try:
        for b in chunk:
            out.extend(run([b]))
            bar.update(1)
    finally:
        bar.close()
    return out


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
    budget: _planner.Budget | None = None,
) -> Plan:
    """Leave the shortest prefix of the report's ranking out of INT8 that meets the budget.

    See :mod:`calib.planner`. Budget: ``target_drop`` top-1 points against FP32 (accuracy
    points with ``labels``) at ``confidence`` (defaults: 2 points, 80 % upper bound); the
    older ``min_top1`` is the point-estimate form (top-1 agreement >= ``min_top1``);
    detectors: F1 against the FP32 detections >= ``min_f1``. ``data``: held-out data. A
    ``budget`` given whole replaces those settings.
    """
    if budget is None:
        budget = _planner.Budget.from_options(task, target_drop, confidence, min_f1, min_top1)
    order = [r.layer for r in report.rows]
    return _planner.grow(order, model, amax, data, budget, labels=labels, detection=detection,
                         exclude_precision=exclude_precision, target=target, max_excluded=max_excluded,
                         search=search, progress=progress, speed_batch=speed_batch)
