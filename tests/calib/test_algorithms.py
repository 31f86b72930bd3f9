"""Known-answer tests of the amax algorithms."""

from __future__ import annotations

import numpy as np
import pytest

from calib.algorithms import MIN_AMAX, _entropy_divergences, compute_all, compute_amax
from calib.observe import TensorStats


def _stats(x: np.ndarray, name: str = "t", chunks: int = 4) -> TensorStats:
    st = TensorStats(name)
    for part in np.array_split(np.asarray(x, np.float32), chunks):
        st.update(part)
    return st


def _gauss_with_outliers(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(400_000).astype(np.float32)
    x[:5] = [60.0, -55.0, 58.0, 61.0, -59.0]  # a few far outliers
    return x


def test_max_of_uniform_sample() -> None:
    x = np.random.default_rng(1).uniform(-3.0, 2.0, size=50_000).astype(np.float32)
    assert compute_amax(_stats(x), "max") == float(np.abs(x).max())


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_within_one_bin(p: float) -> None:
    x = np.random.default_rng(2).laplace(size=200_000).astype(np.float32)
    st = _stats(x)
    got = compute_amax(st, "percentile", percentile=p)
    assert abs(got - np.percentile(np.abs(x), p)) <= st.bin_width
    assert compute_amax(st, "percentile") == compute_amax(st, "percentile", percentile=99.99)


def test_entropy_clips_gaussian_outliers() -> None:
    x = _gauss_with_outliers()
    st = _stats(x)
    amax = compute_amax(st, "entropy")
    assert st.absmax == pytest.approx(61.0)
    assert 2.0 < amax < 0.2 * st.absmax


def test_entropy_keeps_uniform_range() -> None:
    x = np.random.default_rng(3).uniform(-1.0, 1.0, size=300_000).astype(np.float32)
    st = _stats(x)
    assert compute_amax(st, "entropy") >= 0.97 * st.absmax


def test_entropy_on_relu_like_data_not_collapsed_by_zero_spike() -> None:
    rng = np.random.default_rng(4)
    x = np.maximum(rng.standard_normal(300_000), 0).astype(np.float32)  # half exact zeros
    st = _stats(x)
    damped = compute_amax(st, "entropy")
    assert damped > 2.0
    assert damped >= compute_amax(st, "entropy", damp_zero_bin=False)


def _naive_kl(hist: np.ndarray, i: int, levels: int = 128) -> float:
    """Direct transcription of the TensorRT procedure for one candidate, for comparison."""
    p = hist[:i].astype(np.float64).copy()
    p[i - 1] += hist[i:].sum()
    q = np.zeros(i)
    group = (np.arange(i) * levels) // i
    for k in range(levels):
        members = np.flatnonzero(group == k)
        mask = members[p[members] > 0]
        if mask.size:
            q[mask] = hist[members].sum() / mask.size
    p /= p.sum()
    if q.sum() == 0:
        return np.inf
    q /= q.sum()
    nz = p > 0
    if (q[nz] == 0).any():
        return np.inf
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def test_vectorised_kl_equals_direct_procedure() -> None:
    rng = np.random.default_rng(5)
    hist = rng.poisson(50 * np.exp(-np.arange(600) / 80.0)).astype(np.float64)
    hist[300:310] = 0  # some empty bins, including ones that become the folded last bin
    cand, kl = _entropy_divergences(hist, 128, 1, 128)
    for i in (128, 129, 200, 301, 305, 457, 600):
        j = int(np.flatnonzero(cand == i)[0])
        ref = _naive_kl(hist, i)
        if np.isinf(ref):
            assert np.isinf(kl[j])
        else:
            assert kl[j] == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_mse_clips_outliers_and_beats_its_neighbours() -> None:
    x = np.random.default_rng(6).standard_normal(400_000).astype(np.float32)
    x[:2] = [20.0, -19.0]  # rare outliers: clipping them costs less than a 5x coarser grid
    st = _stats(x)
    amax = compute_amax(st, "mse")
    assert 2.0 < amax < 0.5 * st.absmax

    def err(a: float) -> float:
        s = a / 127
        return float(np.mean((np.clip(np.round(x / s), -127, 127) * s - x) ** 2))

    assert err(amax) <= err(st.absmax)
    assert err(amax) <= err(amax * 0.5)


def test_mse_uniform_near_max() -> None:
    x = np.random.default_rng(7).uniform(-4.0, 4.0, size=200_000).astype(np.float32)
    assert compute_amax(_stats(x), "mse") >= 0.95 * 4.0


def test_compute_all_and_errors() -> None:
    obs = {"a": _stats(np.linspace(-1, 1, 1000)), "b": _stats(np.linspace(0, 5, 1000))}
    out = compute_all(obs, "max")
    assert list(out) == ["a", "b"] and out["b"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="unknown calibration method"):
        compute_amax(obs["a"], "kl")
    with pytest.raises(ValueError, match="percentile"):
        compute_amax(obs["a"], "entropy", percentile=99.0)
    with pytest.raises(ValueError, match="no values"):
        compute_amax(TensorStats("empty"), "max")
    nohist = TensorStats("n", histogram=False)
    nohist.update(np.ones(4, np.float32))
    assert compute_amax(nohist, "max") == 1.0
    with pytest.raises(ValueError, match="histogram"):
        compute_amax(nohist, "entropy")
    zeros = _stats(np.zeros(100))
    for method in ("max", "entropy", "percentile", "mse"):
        assert compute_amax(zeros, method) == MIN_AMAX
