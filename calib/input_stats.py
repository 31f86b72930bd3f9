"""Compact statistics of a model input over a data set, for drift detection in the field.

Recorded by :func:`calib.observe.observe` into the calibration cache's provenance
(``source["input_stats"]``), and recomputed by the daemon's precision monitor over live
traffic. Per channel: mean, std and a histogram over fixed bin edges (the calibration
data's quantiles, so each bin holds about the same share of the calibration values).

Drift is the population stability index (PSI) between the calibration histogram ``r`` and
the live one ``l``, per channel, averaged over channels::

    PSI = sum_b (l_b - r_b) * ln(l_b / r_b)      (shares clipped at 1e-4)

Conventional reading: below 0.1 the distributions match (small), 0.1 to 0.25 moderate
drift, 0.25 and above large drift: calibration ranges no longer describe the input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FORMAT = "tegrad-input-stats/1"
NUM_BINS = 16
PSI_SMALL = 0.1
PSI_LARGE = 0.25
_EPS = 1e-4
# Values kept per channel to place the quantile edges: enough for 16 bins, bounded memory.
_KEEP = 1 << 16


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The colour-channel axis of an image-like batch (NCHW or NHWC with at most 4 channels).

    Anything else (features, sequences) is treated as a single channel.
    """
    if len(shape) == 4:
        if 1 <= shape[1] <= 4:
            return 1
        if 1 <= shape[3] <= 4:
            return 3
    return None


def per_channel(x: np.ndarray) -> np.ndarray:
    """``x`` (batch first) as a [channels, values] float array."""
    x = np.asarray(x)
    axis = channel_axis(x.shape)
    if axis is None:
        return x.reshape(1, -1).astype(np.float64, copy=False)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).astype(np.float64, copy=False)


class InputStatsBuilder:
    """Streaming accumulation over batches of one input; :meth:`result` is JSON-safe."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)
        self._sum: np.ndarray | None = None
        self._sq: np.ndarray | None = None
        self._n = 0
        self._kept: list[np.ndarray] = []
        self._shape: tuple[int, ...] | None = None

    def update(self, x: np.ndarray) -> None:
        v = per_channel(x)
        if self._sum is None:
            self._sum, self._sq = np.zeros(v.shape[0]), np.zeros(v.shape[0])
            self._shape = tuple(int(d) for d in np.asarray(x).shape[1:])
        elif v.shape[0] != self._sum.shape[0]:
            raise ValueError(f"input stats: {v.shape[0]} channels after {self._sum.shape[0]}")
        self._sum += v.sum(axis=1)
        self._sq += np.square(v).sum(axis=1)
        self._n += v.shape[1]
        take = min(v.shape[1], _KEEP)
        idx = self._rng.choice(v.shape[1], size=take, replace=False) if take < v.shape[1] else slice(None)
        self._kept.append(v[:, idx])
        if sum(k.shape[1] for k in self._kept) > 2 * _KEEP:
            allv = np.concatenate(self._kept, axis=1)
            self._kept = [allv[:, self._rng.choice(allv.shape[1], size=_KEEP, replace=False)]]

    def result(self) -> dict[str, Any] | None:
        if self._sum is None or self._n == 0:
            return None
        values = np.concatenate(self._kept, axis=1)
        mean = self._sum / self._n
        std = np.sqrt(np.maximum(self._sq / self._n - mean ** 2, 0.0))
        channels = []
        for c in range(values.shape[0]):
            qs = np.quantile(values[c], np.linspace(0, 1, NUM_BINS + 1)[1:-1])
            edges = np.unique(qs)
            counts = np.bincount(np.searchsorted(edges, values[c], side="right"), minlength=edges.size + 1)
            channels.append({
                "mean": float(mean[c]), "std": float(std[c]),
                "edges": [float(e) for e in edges],
                "shares": [float(s) for s in counts / counts.sum()],
            })
        return {"format": FORMAT, "shape": list(self._shape or ()), "values": int(self._n), "channels": channels}


def histogram(x: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Counts of ``x`` in each calibration bin: [channels, bins] (ragged bins padded with 0)."""
    v = per_channel(x)
    chans = stats["channels"]
    if v.shape[0] != len(chans):
        raise ValueError(f"input has {v.shape[0]} channels, the calibration statistics {len(chans)}")
    width = max(len(c["shares"]) for c in chans)
    out = np.zeros((len(chans), width), dtype=np.int64)
    for c, ch in enumerate(chans):
        edges = np.asarray(ch["edges"], dtype=np.float64)
        counts = np.bincount(np.searchsorted(edges, v[c], side="right"), minlength=edges.size + 1)
        out[c, : counts.size] = counts
    return out


def psi(stats: dict[str, Any], counts: np.ndarray) -> float:
    """Mean PSI over channels between the calibration shares and live ``counts`` ([channels, bins])."""
    scores = []
    for c, ch in enumerate(stats["channels"]):
        ref = np.clip(np.asarray(ch["shares"], dtype=np.float64), _EPS, None)
        live = counts[c, : ref.size].astype(np.float64)
        total = live.sum()
        if total == 0:
            continue
        live = np.clip(live / total, _EPS, None)
        scores.append(float(np.sum((live - ref) * np.log(live / ref))))
    return float(np.mean(scores)) if scores else 0.0


def drift_level(score: float) -> str:
    return "small" if score < PSI_SMALL else "moderate" if score < PSI_LARGE else "large"
