"""Compact statistics of a model input over a data set, for drift detection in the field.

Recorded by :func:`calib.observe.observe` into the calibration cache's provenance
(``source["input_stats"]``), and recomputed by the daemon's precision monitor over live
traffic. The unit is the sample, not the pixel: the values of one image are strongly
correlated, so pooled pixel histograms of two halves of the same photo collection already
differ by a PSI of 0.6. Per channel (colour channel of an image batch, else the whole
sample) each sample gives two features, its mean and its standard deviation; per feature the
statistics keep a histogram over fixed bins (quantiles of the calibration samples).

Drift is the population stability index (PSI) of each feature between the calibration
histogram and the live window, averaged over the features. Shares are smoothed (half a
count added per bin) and the value expected from sampling alone, ``(bins - 1) * (1/n_live +
1/n_calibration)``, is subtracted (floored at 0), so a small window of unchanged inputs
reads near 0 instead of a large number::

    PSI_f = sum_b (l_b - r_b) * ln(l_b / r_b) - (B_f - 1) * (1/n + 1/m)
    score = mean_f max(PSI_f, 0)

Reading: below 0.1 small (the inputs look like the calibration set), 0.1 to 0.25 moderate,
0.25 and above large: the calibration ranges may no longer describe the field.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FORMAT = "tegrad-input-stats/2"
NUM_BINS = 10
PSI_SMALL = 0.1
PSI_LARGE = 0.25
FEATURES = ("mean", "std")


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
    """One sample ``x`` (batch dimension of 1 or none kept first) as [channels, values]."""
    x = np.asarray(x)
    axis = channel_axis(x.shape)
    if axis is None:
        return x.reshape(1, -1).astype(np.float64, copy=False)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).astype(np.float64, copy=False)


def features(batch: np.ndarray) -> np.ndarray:
    """[samples, 2 * channels]: each sample's per-channel mean, then its per-channel std."""
    batch = np.asarray(batch)
    rows = []
    for i in range(batch.shape[0]):
        v = per_channel(batch[i:i + 1])
        rows.append(np.concatenate([v.mean(axis=1), v.std(axis=1)]))
    return np.stack(rows) if rows else np.zeros((0, 0))


class InputStatsBuilder:
    """Accumulates over batches of one input; :meth:`result` is JSON-safe (None if empty)."""

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []
        self._shape: tuple[int, ...] | None = None

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch)
        if self._shape is None:
            self._shape = tuple(int(d) for d in batch.shape[1:])
        f = features(batch)
        if self._rows and f.shape[1] != self._rows[0].shape[1]:
            raise ValueError(f"input stats: {f.shape[1] // 2} channels after {self._rows[0].shape[1] // 2}")
        self._rows.append(f)

    def result(self) -> dict[str, Any] | None:
        if not self._rows:
            return None
        f = np.concatenate(self._rows)
        if f.shape[0] == 0:
            return None
        channels = f.shape[1] // 2
        feats = []
        for j in range(f.shape[1]):
            edges = np.unique(np.quantile(f[:, j], np.linspace(0, 1, NUM_BINS + 1)[1:-1]))
            counts = np.bincount(np.searchsorted(edges, f[:, j], side="right"), minlength=edges.size + 1)
            feats.append({"feature": f"{FEATURES[j // channels]}[{j % channels}]",
                          "edges": [float(e) for e in edges], "counts": [int(c) for c in counts]})
        return {"format": FORMAT, "shape": list(self._shape or ()), "samples": int(f.shape[0]),
                "channels": channels,
                "mean": [float(v) for v in f[:, :channels].mean(axis=0)],
                "std": [float(v) for v in f[:, channels:].mean(axis=0)],
                "features": feats}


def usable(stats: Any) -> bool:
    return isinstance(stats, dict) and stats.get("format") == FORMAT and bool(stats.get("features"))


def histogram(batch: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """Counts of ``batch``'s samples in each calibration bin: [features, bins] (padded with 0)."""
    f = features(batch)
    feats = stats["features"]
    if f.shape[1] != len(feats):
        raise ValueError(f"input has {f.shape[1] // 2} channels, the calibration statistics {stats['channels']}")
    width = max(len(s["counts"]) for s in feats)
    out = np.zeros((len(feats), width), dtype=np.int64)
    for j, s in enumerate(feats):
        counts = np.bincount(np.searchsorted(np.asarray(s["edges"]), f[:, j], side="right"),
                             minlength=len(s["counts"]))
        out[j, : counts.size] = counts
    return out


def psi(stats: dict[str, Any], counts: np.ndarray) -> float:
    """The drift score of live ``counts`` ([features, bins]) against the calibration statistics."""
    scores = []
    for j, s in enumerate(stats["features"]):
        ref = np.asarray(s["counts"], dtype=np.float64)
        bins = ref.size
        live = counts[j, :bins].astype(np.float64)
        n, m = live.sum(), ref.sum()
        if n == 0 or m == 0:
            continue
        l_share = (live + 0.5) / (n + 0.5 * bins)
        r_share = (ref + 0.5) / (m + 0.5 * bins)
        value = float(np.sum((l_share - r_share) * np.log(l_share / r_share)))
        scores.append(max(value - (bins - 1) * (1.0 / n + 1.0 / m), 0.0))
    return float(np.mean(scores)) if scores else 0.0


def drift_level(score: float) -> str:
    return "small" if score < PSI_SMALL else "moderate" if score < PSI_LARGE else "large"
