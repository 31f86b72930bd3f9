"""Served outputs against the FP32 reference, one sample at a time, by task.

Per sample the monitor keeps what the window needs: classification keeps top-1 agreement
and the cosine of the logits; detection keeps matched / served / reference box counts, so
the window's F1 is pooled over its boxes (not an average of per-image F1s); raw keeps the
cosine and the relative L2 error ``|served - ref| / |ref|``, whose window maximum is
``max_rel_error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calib.evaluate import compare_outputs
from daemon.monitor.window import Window


@dataclass(frozen=True)
class Task:
    kind: str  # classification | detection | raw
    output: str
    detection: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> tuple[str, ...]:
        return {"classification": ("top1_agreement", "cosine"), "detection": ("f1",),
                "raw": ("max_rel_error", "cosine")}[self.kind]


def task_of(config, output_names: list[str]) -> Task:
    """What to compare for a model: its ``[postprocess]`` kind, else labels mean classification."""
    post = config.postprocess
    labelled = [o.name for o in config.output if o.labels]
    output = (post.output if post is not None and post.output else None) or (labelled[0] if labelled else None)
    output = output or output_names[0]
    if post is not None and post.kind == "yolo":
        det = post.detection_params(config.preprocess) or {}
        det.pop("output", None)
        return Task("detection", output, det)
    if (post is not None and post.kind == "classification") or output in labelled:
        return Task("classification", output)
    return Task("raw", output)


def score(task: Task, served: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """One sample's entries for the window (arrays carry a batch dimension of 1)."""
    served = np.asarray(served, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    if task.kind == "detection":
        r = compare_outputs([reference], [served], task="detection", detection=task.detection)
        matched = round((r.precision or 0.0) * (r.detections_candidate or 0))
        return {"matched": matched, "served_boxes": r.detections_candidate or 0,
                "reference_boxes": r.detections_reference or 0}
    r = compare_outputs([reference], [served], task="classification")
    if task.kind == "classification":
        return {"top1_agreement": float(r.top1_agreement), "cosine": r.cosine}
    return {"rel_error": r.rel_error, "cosine": r.cosine}


def window_values(task: Task, window: Window) -> dict[str, float]:
    """The window's value of each of the task's metrics (those with samples)."""
    out: dict[str, float] = {}
    if task.kind == "detection":
        served, ref = window.sum("served_boxes"), window.sum("reference_boxes")
        if window.count("matched"):
            out["f1"] = 1.0 if served + ref == 0 else 2.0 * window.sum("matched") / (served + ref)
        return out
    for name in task.metrics:
        value = window.max("rel_error") if name == "max_rel_error" else window.mean(name)
        if value is not None:
            out[name] = value
    return out
