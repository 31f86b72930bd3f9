"""``--algorithm auto``: choose the amax algorithm by measured agreement with FP32 on held-out data.

No one amax algorithm is best for every model (measured through the CLI: entropy was the worst
of four on EfficientNet-Lite0 and on YOLOX-Nano, max the worst on other models), so tegrad
measures instead of guessing:

1. The calibration data is split by sample order: an evenly spaced ~20 % (at least
   ``MIN_HELD_OUT``, at most ``MAX_HELD_OUT`` samples) is held out, the rest sets the ranges.
   Held-out samples never enter the histograms.
2. One observation pass over the range samples; every candidate (``CANDIDATES``) computes its
   amax from the same histograms.
3. Each candidate is lowered to the CPU-target INT8 graph (exact on every x86, see
   :mod:`calib.ort_exact`) and run on the held-out samples against the FP32 model:
   classification by the mean KL divergence of the candidate's softmax from FP32's (a
   continuous agreement; top-1 on twenty images moves in 5-point steps), detection by the F1
   of the candidate's detections against FP32's (as ``tegrad evaluate`` computes it).
4. The best score wins (ties: higher output cosine, then the earlier candidate); its amax,
   computed on exactly the samples that were scored, go into the cache.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from calib import algorithms
from calib.datasets import DataSource, Feed, ImageFolder, batches
from calib.observe import Observations

HELD_OUT_FRACTION = 0.2
MIN_HELD_OUT = 8
MAX_HELD_OUT = 100
# Below this many samples a split leaves too little for either side; auto then falls back.
MIN_SAMPLES = 10
FALLBACK = "mse"  # the best fixed algorithm measured on the zoo's classifier and detector


@dataclass(frozen=True)
class Candidate:
    name: str
    algorithm: str
    params: Mapping[str, Any] = field(default_factory=dict)


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("max", "max"),
    Candidate("entropy", "entropy"),
    Candidate("percentile 99.9", "percentile", {"percentile": 99.9}),
    Candidate("percentile 99.99", "percentile", {"percentile": 99.99}),
    Candidate("percentile 99.999", "percentile", {"percentile": 99.999}),
    Candidate("mse", "mse"),
)


# ---- the split ----------------------------------------------------------------------------------
def held_out_count(n: int, fraction: float = HELD_OUT_FRACTION) -> int:
    """How many of ``n`` samples are held out (0: too few samples to split)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    if n < MIN_SAMPLES:
        return 0
    return min(MAX_HELD_OUT, n // 2, max(MIN_HELD_OUT, math.ceil(fraction * n)))


def held_out_indices(n: int, count: int) -> list[int]:
    """``count`` indices of ``range(n)`` spread evenly over the order (deterministic).

    Evenly spaced rather than the last ``count``: folders sorted by name are often grouped
    by subject, and the held-out part should look like the whole.
    """
    return [i for i in range(n) if (i + 1) * count // n > i * count // n]


class _Subset(DataSource):
    """The samples of ``base`` at ``keep`` (sorted indices), in order."""

    def __init__(self, base: DataSource, keep: Sequence[int]) -> None:
        self.base = base
        self.keep = list(keep)

    def __len__(self) -> int:
        return len(self.keep)

    def iter_chunks(self, input_name: str | None) -> Iterator[Feed]:
        wanted = set(self.keep)
        offset = 0
        for chunk in self.base.iter_chunks(input_name):
            n = next(iter(chunk.values())).shape[0]
            rows = [i - offset for i in range(offset, offset + n) if i in wanted]
            offset += n
            if rows:
                yield {k: np.ascontiguousarray(v[rows]) for k, v in chunk.items()}
            if offset > self.keep[-1]:
                return

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "count": len(self.keep)}


def _subset(source: DataSource, keep: Sequence[int]) -> DataSource:
    if isinstance(source, ImageFolder):
        # Picks files, so the other part's images are never decoded.
        sub = copy.copy(source)
        sub.files = [source.files[i] for i in keep]
        return sub
    return _Subset(source, keep)


@dataclass
class Split:
    ranges: DataSource
    held_out: DataSource
    range_indices: list[int]
    held_out_indices: list[int]


def split_source(source: DataSource, fraction: float = HELD_OUT_FRACTION) -> Split | None:
    """Range and held-out parts of ``source`` (None when it has too few samples to split)."""
    n = source.num_samples
    if n is None:
        raise ValueError("--algorithm auto needs data of known length (an image folder or .npy/.npz files)")
    count = held_out_count(n, fraction)
    if count == 0:
        return None
    held = held_out_indices(n, count)
    held_set = set(held)
    ranges = [i for i in range(n) if i not in held_set]
    return Split(_subset(source, ranges), _subset(source, held), ranges, held)


def model_batches(model: onnx.ModelProto, source: DataSource, input_name: str | None, batch_size: int) -> list[Feed]:
    """The held-out samples as feeds the model takes (a model with a fixed batch gets that batch)."""
    from calib.graph import data_input

    input_name, fixed = data_input(model, input_name)
    return list(batches(source, input_name=input_name, batch_size=fixed or batch_size))


# ---- scoring ------------------------------------------------------------------------------------
def _log_probs(x: np.ndarray) -> np.ndarray:
    """Per-sample log-probabilities of an output: taken as they are when the rows already are
    probabilities (a model ending in Softmax), else log-softmax of logits."""
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    if x.min() >= 0 and np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
        return np.log(np.maximum(x, 1e-12))
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def mean_kl(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Mean over samples of KL(softmax(reference) ‖ softmax(candidate))."""
    kls = []
    for r, c in zip(reference, candidate, strict=True):
        lr, lc = _log_probs(r), _log_probs(c)
        kls.append((np.exp(lr) * (lr - lc)).sum(axis=1))
    return float(np.concatenate(kls).mean())


@dataclass
class CandidateScore:
    name: str
    algorithm: str
    params: dict[str, Any]
    cosine: float
    kl: float | None = None
    top1_agreement: float | None = None
    f1: float | None = None
    same_as: str | None = None  # another candidate gave the very same amax

    def key(self, task: str) -> tuple[float, float]:
        """Sort key, best first."""
        primary = -(self.f1 or 0.0) if task == "detection" else float(self.kl if self.kl is not None else math.inf)
        return (primary, -self.cosine)

    def as_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "algorithm": self.algorithm, "params": self.params, "cosine": self.cosine,
             "kl": self.kl, "top1_agreement": self.top1_agreement, "f1": self.f1, "same_as": self.same_as}
        return {k: v for k, v in d.items() if v is not None}


@dataclass
class Choice:
    task: str
    chosen: CandidateScore
    candidates: list[CandidateScore]
    amax: dict[str, float]
    range_samples: int
    held_out_samples: int
    seconds: float

    @property
    def metric(self) -> str:
        return "f1" if self.task == "detection" else "kl"

    def to_table(self) -> str:
        what = ("F1 of detections vs FP32's" if self.task == "detection"
                else "mean KL of softmax vs FP32, lower is better")
        lines = [f"--algorithm auto: candidates scored on {self.held_out_samples} held-out samples "
                 f"(ranges from the other {self.range_samples}); {what}; {self.seconds:.1f} s",
                 f"  {'candidate':<20} {'F1' if self.task == 'detection' else 'KL':>10} {'top1':>7} {'cosine':>9}"]
        for c in sorted(self.candidates, key=lambda c: c.key(self.task)):
            score = f"{c.f1:.4f}" if self.task == "detection" else f"{c.kl:.3e}"
            top1 = "-" if c.top1_agreement is None else f"{c.top1_agreement:.4f}"
            mark = "  <- chosen" if c is self.chosen else (f"  (= {c.same_as})" if c.same_as else "")
            lines.append(f"  {c.name:<20} {score:>10} {top1:>7} {c.cosine:>9.6f}{mark}")
        return "\n".join(lines)

    def as_metadata(self) -> dict[str, Any]:
        """What the cache records about the choice (``selection``)."""
        return {
            "method": "auto",
            "chosen": self.chosen.name,
            "task": self.task,
            "metric": self.metric,
            "target": "cpu",
            "range_samples": self.range_samples,
            "held_out_samples": self.held_out_samples,
            "seconds": round(self.seconds, 3),
            "candidates": [c.as_dict() for c in self.candidates],
        }


def _score(cand: Candidate, reference: list[np.ndarray], outputs: list[np.ndarray], task: str,
           detection: Mapping[str, Any] | None) -> CandidateScore:
    from calib.evaluate import compare_outputs

    result = compare_outputs(reference, outputs, task=task, detection=detection)
    score = CandidateScore(cand.name, cand.algorithm, algorithms.resolved_params(cand.algorithm, **cand.params),
                           cosine=result.cosine, top1_agreement=result.top1_agreement, f1=result.f1)
    if task == "classification":
        score.kl = mean_kl(reference, outputs)
    return score


def choose(
    model: onnx.ModelProto | str | os.PathLike[str],
    observations: Observations,
    held_out: Sequence[Feed],
    *,
    task: str = "classification",
    detection: Mapping[str, Any] | None = None,
    candidates: Sequence[Candidate] = CANDIDATES,
    progress: bool = True,
) -> Choice:
    """Score every candidate algorithm on ``held_out`` (feeds the model takes) and pick the best.

    ``observations`` must come from samples other than ``held_out``.
    """
    from tqdm import tqdm

    from calib.evaluate import detection_defaults, run_batches
    from calib.graph import load
    from calib.lower import lower

    if task not in ("classification", "detection"):
        raise ValueError(f"unknown task {task!r}; expected 'classification' or 'detection'")
    if not held_out:
        raise ValueError("no held-out samples to score the candidates on")
    if not candidates:
        raise ValueError("no candidate algorithms")
    start = time.perf_counter()
    proto = load(model)
    if task == "detection":
        detection = detection_defaults(proto, detection)
    reference = run_batches(proto, held_out)
    scores: list[CandidateScore] = []
    amaxes: dict[str, dict[str, float]] = {}
    bar = tqdm(candidates, desc="auto: score candidates", unit="algo", disable=not progress, leave=False)
    for cand in bar:
        amax = algorithms.compute_all(observations, cand.algorithm, **cand.params)
        twin = next((name for name, other in amaxes.items() if other == amax), None)
        if twin is not None:
            score = copy.copy(next(s for s in scores if s.name == twin))
            score.name, score.algorithm, score.same_as = cand.name, cand.algorithm, twin
            score.params = algorithms.resolved_params(cand.algorithm, **cand.params)
        else:
            graph = lower(proto, "int8", amax=amax, target="cpu")
            score = _score(cand, reference, run_batches(graph, held_out), task, detection)
        amaxes[cand.name] = amax
        scores.append(score)
    bar.close()
    # min() keeps the first of equal keys: candidate order breaks exact ties.
    best = min(scores, key=lambda s: s.key(task))
    samples = sum(next(iter(f.values())).shape[0] for f in held_out)
    return Choice(task=task, chosen=best, candidates=scores, amax=amaxes[best.name],
                  range_samples=observations.num_samples, held_out_samples=samples,
                  seconds=time.perf_counter() - start)


# ---- one calibration, fixed or auto -------------------------------------------------------------
@dataclass
class Calibration:
    """The outcome of :func:`calibrate`: ranges, the algorithm they came from, and how it was chosen."""

    observations: Observations
    amax: dict[str, float]
    algorithm: str
    params: dict[str, Any]
    choice: Choice | None = None

    def describe(self) -> str:
        if self.choice is None:
            return self.algorithm
        return f"{self.choice.chosen.name} (chosen by --algorithm auto)"

    def cache(self, model: str | os.PathLike[str], preprocess: Mapping[str, Any] | None = None,
              created: str | None = None):
        """The portable calibration cache of these ranges."""
        from calib.cache import CalibrationCache

        provenance = dict(self.observations.source or {})
        provenance["model"] = os.fspath(model)
        return CalibrationCache(
            amax=self.amax,
            algorithm=self.algorithm,
            params=algorithms.resolved_params(self.algorithm, **self.params),
            num_samples=self.observations.num_samples,
            model_sha256=self.observations.model_sha256,
            preprocess=dict(preprocess) if preprocess is not None else None,
            source=provenance,
            created=created,
            selection=self.choice.as_metadata() if self.choice is not None else None,
        )


def calibrate(
    model: str | os.PathLike[str],
    source: DataSource | None,
    algorithm: str = "auto",
    *,
    params: Mapping[str, Any] | None = None,
    fraction: float = HELD_OUT_FRACTION,
    input_name: str | None = None,
    batch_size: int = 8,
    task: str = "classification",
    detection: Mapping[str, Any] | None = None,
    observations: Observations | None = None,
    keep_histograms: bool = False,
    progress: bool = True,
    note=lambda text: None,
    show=lambda text: None,
) -> Calibration:
    """Observe ``source`` and compute amax with ``algorithm`` (``"auto"``: choose it on a held-out split).

    The one calibration path of ``tegrad calibrate``, ``tegrad plan`` and ``bundle create``.
    ``observations`` (already collected on the range samples) skips the observation pass; auto
    still needs ``source`` for its held-out part. ``note`` receives one-line remarks (a fallback,
    mismatched observations), ``show`` the candidates' table.
    """
    from calib.observe import observe

    params = dict(params or {})
    split = None
    if algorithm == "auto":
        if source is None:
            raise ValueError("--algorithm auto scores each algorithm on held-out samples of the data: give the data "
                             "(with saved observations, the data they came from), or choose an algorithm")
        split = split_source(source, fraction)
        if split is None:
            algorithm = FALLBACK
            note(f"{source.num_samples} samples are too few to hold some out (--algorithm auto needs "
                 f"{MIN_SAMPLES}); using {algorithm}")
    if observations is not None:
        if split is not None and observations.num_samples != len(split.range_indices):
            note(f"the saved observations hold {observations.num_samples} samples, not the {len(split.range_indices)} "
                 "that --algorithm auto keeps for ranges: if they include the held-out ones, the held-out scores "
                 "are optimistic")
    else:
        if source is None:
            raise ValueError("no calibration data")
        observations = observe(model, split.ranges if split is not None else source, batch_size=batch_size,
                               input_name=input_name, histogram=algorithm != "max" or keep_histograms,
                               progress=progress)
    if split is None:
        return Calibration(observations, algorithms.compute_all(observations, algorithm, **params), algorithm, params)
    held = model_batches(onnx.load(os.fspath(model), load_external_data=False), split.held_out, input_name,
                         batch_size)
    choice = choose(model, observations, held, task=task, detection=detection, progress=progress)
    show(choice.to_table())
    return Calibration(observations, choice.amax, choice.chosen.algorithm, dict(choice.chosen.params), choice)
