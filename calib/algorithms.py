"""Activation range (amax) selection from streaming statistics.

All methods return a symmetric amax: the int8 grid is ``±amax`` with
``scale = amax / 127``. Histogram methods work on the ``|x|`` histogram of
:class:`calib.observe.TensorStats`; trailing empty bins (left by histogram
range growth) are dropped first, so the histogram ends at the data's max, as
TensorRT's does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from calib.observe import TensorStats

METHODS = ("max", "entropy", "percentile", "mse")
DEFAULTS: dict[str, dict[str, Any]] = {
    "max": {},
    "entropy": {"start_bin": 128, "stride": 1, "num_levels": 128, "damp_zero_bin": True},
    "percentile": {"percentile": 99.99},
    "mse": {"start_bin": 128, "stride": 1, "num_levels": 127},
}
# Q/DQ needs a strictly positive scale; an all-zero tensor is represented
# exactly by any scale, so the smallest normal-ish value is as good as any.
MIN_AMAX = 1e-8


def _trimmed(stats: TensorStats) -> tuple[np.ndarray, float]:
    """Histogram cut after its last non-empty bin, and the bin width."""
    if stats.hist is None:
        raise ValueError(f"{stats.name!r}: no histogram was collected (observe with histogram=True)")
    hist = np.asarray(stats.hist, dtype=np.float64)
    nz = np.flatnonzero(hist)
    if nz.size == 0 or stats.hist_range <= 0:
        return hist[:0], 0.0
    return hist[: nz[-1] + 1], stats.bin_width


def amax_max(stats: TensorStats) -> float:
    return stats.absmax


def amax_percentile(stats: TensorStats, percentile: float = 99.99) -> float:
    """The ``percentile`` of |x|, interpolated linearly inside the histogram bin."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    hist, width = _trimmed(stats)
    if hist.size == 0:
        return 0.0
    cdf = np.cumsum(hist)
    target = cdf[-1] * (percentile / 100.0)
    i = int(np.searchsorted(cdf, target, side="left"))
    i = min(i, hist.size - 1)
    below = cdf[i - 1] if i > 0 else 0.0
    frac = (target - below) / hist[i] if hist[i] > 0 else 1.0
    return float(min(stats.absmax, (i + frac) * width))


def _entropy_divergences(hist: np.ndarray, start: int, stride: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """KL(P‖Q) for every candidate bin count ``i`` in ``start..n`` (step ``stride``).

    For candidate ``i``: P = hist[:i] with the mass of all bins ≥ i added to
    bin i-1; Q = hist[:i] merged into ``levels`` groups (bin j belongs to
    group floor(j·levels/i)), each group's mass spread evenly over the bins
    where P is non-zero. Both are normalised. Everything reduces to prefix
    sums, so the cost is O(#candidates × levels), not O(#candidates × n).
    """
    n = hist.size
    cand = np.arange(start, n + 1, stride, dtype=np.int64)
    total = hist.sum()
    C = np.concatenate(([0.0], np.cumsum(hist)))  # C[j] = sum(hist[:j])
    nz = np.concatenate(([0], np.cumsum(hist > 0))).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(hist > 0, hist * np.log(np.where(hist > 0, hist, 1.0)), 0.0)
    HL = np.concatenate(([0.0], np.cumsum(hlogh)))

    outliers = total - C[cand]  # mass folded into bin i-1
    last = hist[cand - 1] + outliers  # P's last bin, unnormalised
    # Σ P log P with P = h/total (the last bin replaced by the folded mass).
    with np.errstate(divide="ignore", invalid="ignore"):
        last_term = np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
    plogp = (HL[cand - 1] + last_term) / total - np.log(total) * (C[cand - 1] + last) / total

    # Group boundaries: group k spans bins [ceil(k·i/levels), ceil((k+1)·i/levels)).
    k = np.arange(levels + 1, dtype=np.int64)
    bounds = -((-k[None, :] * cand[:, None]) // levels)  # (m, levels+1), exact integer ceil
    lo, hi = bounds[:, :-1], bounds[:, 1:]
    qsum = C[hi] - C[lo]  # unfolded mass per group
    qnnz = (nz[hi] - nz[lo]).astype(np.float64)
    # The folded last bin is non-zero in P even where hist[i-1] == 0.
    qnnz[:, -1] += ((hist[cand - 1] == 0) & (outliers > 0)).astype(np.float64)
    pmass = qsum.copy()
    pmass[:, -1] += outliers
    qtotal = C[cand]
    with np.errstate(divide="ignore", invalid="ignore"):
        # Q value of each non-zero P bin of group k, normalised over Q's total.
        qval = qsum / (qnnz * qtotal[:, None])
        log_q = np.log(np.where(qval > 0, qval, 1.0))
    cross = (pmass * log_q).sum(axis=1) / total
    kl = plogp - cross
    # P has mass where Q has none (a group whose only mass is folded outliers): infinite KL.
    impossible = ((pmass > 0) & ~(qval > 0)).any(axis=1) | (qtotal <= 0)
    kl = np.where(impossible, np.inf, kl)
    return cand, kl


def amax_entropy(
    stats: TensorStats,
    start_bin: int = 128,
    stride: int = 1,
    num_levels: int = 128,
    damp_zero_bin: bool = True,
) -> float:
    """TensorRT's entropy (KL-divergence) calibration on the |x| histogram."""
    hist, width = _trimmed(stats)
    if hist.size == 0:
        return 0.0
    hist = hist.copy()
    if damp_zero_bin and hist.size > 1:
        # ReLU-like tensors pile a large share of exact zeros into bin 0. Zero is
        # exact on the int8 grid, yet that spike dominates KL(P‖Q) because Q
        # spreads group 0's mass over its bins; the search then favours tiny
        # groups, i.e. small thresholds that clip real signal. Flattening bin 0
        # to its neighbour (as ModelOpt does) removes that bias, and changes
        # little for symmetric tensors whose bin 0 is already like bin 1.
        hist[0] = hist[1]
    n = hist.size
    if n <= start_bin:
        # Fewer bins than int8 levels: the data fits the grid at full range.
        return float(stats.absmax)
    cand, kl = _entropy_divergences(hist, start_bin, max(1, stride), num_levels)
    finite = np.isfinite(kl)
    if not finite.any():
        return float(stats.absmax)
    best = np.where(finite, kl, np.inf)
    # Ties go to the largest threshold: less clipping for the same divergence.
    idx = len(best) - 1 - int(np.argmin(best[::-1]))
    return float(min(stats.absmax, cand[idx] * width))


def amax_mse(stats: TensorStats, start_bin: int = 128, stride: int = 1, num_levels: int = 127) -> float:
    """amax minimising the expected squared int8 error over the |x| histogram.

    Each bin's mass sits at its centre; a candidate amax quantizes the centres
    to ``num_levels`` steps (round half to even, clipped at amax) and the
    count-weighted squared error is compared. Candidates are bin upper edges
    from ``start_bin`` on.
    """
    hist, width = _trimmed(stats)
    if hist.size == 0:
        return 0.0
    n = hist.size
    centres = (np.arange(n) + 0.5) * width
    first = min(start_bin, n)
    cand = np.arange(first, n + 1, max(1, stride), dtype=np.float64) * width
    nzi = np.flatnonzero(hist)
    c, h = centres[nzi], hist[nzi]
    errs = np.empty(cand.size)
    # Chunked to bound the (candidates × bins) work array to a few MB.
    chunk = max(1, (1 << 19) // max(1, c.size))
    for s in range(0, cand.size, chunk):
        a = cand[s : s + chunk, None]
        step = a / num_levels
        q = np.minimum(np.round(c[None, :] / step), num_levels) * step
        errs[s : s + chunk] = ((q - c[None, :]) ** 2 * h[None, :]).sum(axis=1)
    best = len(errs) - 1 - int(np.argmin(errs[::-1]))
    return float(min(stats.absmax, cand[best]))


_FUNCS = {"max": amax_max, "entropy": amax_entropy, "percentile": amax_percentile, "mse": amax_mse}


def compute_amax(stats: TensorStats, method: str, **params: Any) -> float:
    """amax of one tensor by ``method`` (max | entropy | percentile | mse)."""
    if method not in _FUNCS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    allowed = DEFAULTS[method]
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise ValueError(f"method {method!r} has no parameter {unknown[0]!r}"
                         + (f" (parameters: {', '.join(allowed)})" if allowed else " (it takes none)"))
    if stats.count == 0:
        raise ValueError(f"{stats.name!r}: no values were observed")
    amax = _FUNCS[method](stats, **params)
    return max(float(amax), MIN_AMAX)


def compute_all(
    observations: Mapping[str, TensorStats], method: str, *, clip_inputs: bool = False, **params: Any
) -> dict[str, float]:
    """amax for every observed tensor, in observation order.

    Model inputs, and tensors that only rearrange them (``observations.input_like``),
    get ``max`` unless ``clip_inputs``: their range is set by preprocessing, so
    nothing there is an outlier, and a clipping method can be badly fooled by their
    few discrete levels (the digits model's 17 pixel values made entropy pick amax
    0.063 for a range of 1.0 and took INT8 accuracy from 99 % to 10 %; on YOLOX-Nano
    entropy clipped the Focus-sliced pixels at 114 of 255).
    """
    keep = set() if clip_inputs else set(getattr(observations, "input_like", ()))
    return {
        name: compute_amax(st, "max") if name in keep else compute_amax(st, method, **params)
        for name, st in observations.items()
    }


def resolved_params(method: str, **params: Any) -> dict[str, Any]:
    """The full parameter set a method runs with (defaults filled in), for provenance."""
    if method not in DEFAULTS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    out = dict(DEFAULTS[method])
    out.update(params)
    return out
