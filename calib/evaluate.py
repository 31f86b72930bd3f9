"""Compare a lowered model with its reference on ONNX Runtime (CPU).

Classifiers: top-1 agreement with the reference, top-1 accuracy of both when labels are
given, mean cosine similarity and mean relative error of the output per sample.
Detectors: F1 of the candidate's detections against the reference's own detections (same
class, IoU ≥ 0.5, greedy by score), plus the same output-level similarity numbers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from . import detection as det
from .ort_exact import keep_exact

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(bool)": np.bool_,
}


@dataclass
class EvalResult:
    task: str
    samples: int
    cosine: float
    rel_error: float
    top1_agreement: float | None = None
    accuracy_reference: float | None = None
    accuracy_candidate: float | None = None
    f1: float | None = None
    precision: float | None = None
    recall: float | None = None
    detections_reference: int | None = None
    detections_candidate: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def accuracy_drop(self) -> float | None:
        """Relative accuracy drop (0.01 = 1 %) of the candidate against the reference."""
        if self.accuracy_reference is None or self.accuracy_candidate is None or self.accuracy_reference == 0:
            return None
        return (self.accuracy_reference - self.accuracy_candidate) / self.accuracy_reference

    def as_dict(self) -> dict:
        d = asdict(self)
        d["accuracy_drop"] = self.accuracy_drop
        extra = d.pop("extra")
        d.update(extra)
        return {k: v for k, v in d.items() if v is not None}


def session(model: onnx.ModelProto | str | os.PathLike | ort.InferenceSession, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for a ModelProto, a path or an existing session."""
    if isinstance(model, ort.InferenceSession):
        return model
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    keep_exact(options, model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _feed(sess: ort.InferenceSession, batch) -> dict[str, np.ndarray]:
    inputs = sess.get_inputs()
    if not isinstance(batch, Mapping):
        if len(inputs) != 1:
            raise ValueError(f"model has {len(inputs)} inputs; pass each batch as a dict name → array")
        batch = {inputs[0].name: batch}
    feed = {}
    for spec in inputs:
        if spec.name not in batch:
            raise KeyError(f"batch has no input {spec.name!r} (has {sorted(batch)})")
        want = _ORT_TYPES.get(spec.type)
        value = np.asarray(batch[spec.name])
        feed[spec.name] = value.astype(want, copy=False) if want is not None else value
    return feed


def run_batches(model, data: Iterable, output: str | int = 0) -> list[np.ndarray]:
    """Run ``model`` on every batch of ``data``; one array (the chosen output) per batch."""
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    name = names[output] if isinstance(output, int) else output
    return [sess.run([name], _feed(sess, batch))[0] for batch in data]


def _per_sample(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = ref.reshape(ref.shape[0], -1).astype(np.float64)
    c = cand.reshape(cand.shape[0], -1).astype(np.float64)
    nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
    dot = (r * c).sum(axis=1)
    cos = np.where((nr > 0) & (nc > 0), dot / np.maximum(nr * nc, 1e-300), np.where((nr == 0) & (nc == 0), 1.0, 0.0))
    err = np.linalg.norm(c - r, axis=1) / np.maximum(nr, 1e-12)
    return cos, err


def compare_outputs(
    reference_outputs: list[np.ndarray],
    candidate_outputs: list[np.ndarray],
    labels=None,
    task: str = "classification",
    detection: Mapping | None = None,
    reference_detections: list | None = None,
) -> EvalResult:
    """Metrics from outputs already computed (lets sensitivity analysis reuse the reference run).

    ``reference_detections``: the reference's detections per batch (:func:`decode_reference`),
    so that comparing many candidates with one reference decodes it once.
    """
    if task not in ("classification", "detection"):
        raise ValueError(f"unknown task {task!r}; expected 'classification' or 'detection'")
    if len(reference_outputs) != len(candidate_outputs):
        raise ValueError("reference and candidate were run on different numbers of batches")
    if not reference_outputs:
        raise ValueError("no data to evaluate on")
    cos_all, err_all = [], []
    for r, c in zip(reference_outputs, candidate_outputs, strict=True):
        if r.shape != c.shape:
            raise ValueError(f"output shapes differ: reference {r.shape}, candidate {c.shape}")
        cos, err = _per_sample(r, c)
        cos_all.append(cos)
        err_all.append(err)
    cos = np.concatenate(cos_all)
    err = np.concatenate(err_all)
    result = EvalResult(task=task, samples=int(cos.size), cosine=float(cos.mean()), rel_error=float(err.mean()))
    if task == "classification":
        ref = np.concatenate([r.reshape(r.shape[0], -1) for r in reference_outputs])
        cand = np.concatenate([c.reshape(c.shape[0], -1) for c in candidate_outputs])
        top_r, top_c = ref.argmax(axis=1), cand.argmax(axis=1)
        result.top1_agreement = float((top_r == top_c).mean())
        if labels is not None:
            y = np.concatenate([np.asarray(v).reshape(-1) for v in labels]) if _is_batched(labels) else np.asarray(labels).reshape(-1)
            if y.shape[0] != top_r.shape[0]:
                raise ValueError(f"{y.shape[0]} labels for {top_r.shape[0]} samples")
            result.accuracy_reference = float((top_r == y).mean())
            result.accuracy_candidate = float((top_c == y).mean())
    else:
        params = dict(detection or {})
        iou_match = float(params.pop("match_iou", 0.5))
        tp = n_c = n_r = 0
        ref_dets = reference_detections or decode_reference(reference_outputs, detection)
        for dets, c in zip(ref_dets, candidate_outputs, strict=True):
            for dr, dc in zip(dets, det.postprocess(c, **params), strict=True):
                t, a, b = det.match_f1(dr, dc, iou_match)
                tp, n_c, n_r = tp + t, n_c + a, n_r + b
        result.precision, result.recall, result.f1 = det.precision_recall_f1(tp, n_c, n_r)
        result.detections_reference, result.detections_candidate = n_r, n_c
    return result


def decode_reference(reference_outputs: list[np.ndarray], detection: Mapping | None) -> list:
    """The reference's detections per batch, for :func:`compare_outputs`'s ``reference_detections``."""
    params = {k: v for k, v in (detection or {}).items() if k != "match_iou"}
    return [det.postprocess(r, **params) for r in reference_outputs]


def _is_batched(labels) -> bool:
    return isinstance(labels, list | tuple) and len(labels) > 0 and np.ndim(labels[0]) >= 1


def detection_defaults(model, detection: Mapping | None) -> dict:
    """Fill in ``input_hw`` for YOLOX decoding from the model's NCHW input when not given."""
    params = dict(detection or {})
    if params.get("layout", "yolox") == "yolox" and "input_hw" not in params:
        if isinstance(model, onnx.ModelProto):
            dims = model.graph.input[0].type.tensor_type.shape.dim
            shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        else:
            shape = session(model).get_inputs()[0].shape
        if len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:]):
            params["input_hw"] = (int(shape[2]), int(shape[3]))
    return params


def evaluate(
    reference,
    candidate,
    data: Iterable,
    labels=None,
    task: str = "classification",
    detection: Mapping | None = None,
    output: str | int = 0,
) -> EvalResult:
    """Run ``reference`` and ``candidate`` (ModelProto, path or session) on ``data`` and compare.

    ``data``: an iterable of feeds, each ``dict[name, array]`` with a batch dimension, or a
    plain array for single-input models; it is iterated once. ``labels``: class indices for
    all samples in order (flat, or one array per batch). ``detection``: keyword arguments for
    :func:`calib.detection.postprocess` (``layout``, ``input_hw``, ``score_threshold``,
    ``iou_threshold``, ...) plus ``match_iou`` (default 0.5). ``output``: which model output
    (index or name) is compared.
    """
    batches = list(data)
    if task == "detection":
        detection = detection_defaults(reference, detection)
    ref_out = run_batches(reference, batches, output)
    cand_out = run_batches(candidate, batches, output)
    return compare_outputs(ref_out, cand_out, labels=labels, task=task, detection=detection)
