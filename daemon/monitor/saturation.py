"""How much of each calibrated tensor falls outside its calibrated range in the field.

INT8 clips a tensor at its calibrated ``amax``. The fraction of values beyond it, measured on
the FP32 reference's activations, says whether the calibration still covers the field. All
monitored tensors count for the maximum; the per-tensor gauge shows at most ``max_tensors``
of them, chosen by their ratio with hysteresis so that the label set stays stable.
"""

from __future__ import annotations

from collections import deque

import numpy as np

# A tensor displaces an exported one only when its ratio is this much larger (and at least
# _MIN_STEP larger): noise between two near-equal tensors must not churn label values.
_DISPLACE = 2.0
_MIN_STEP = 1e-3


def beyond(x: np.ndarray, amax: float) -> float:
    """Fraction of the values of ``x`` whose magnitude exceeds ``amax``."""
    x = np.asarray(x)
    return float(np.count_nonzero(np.abs(x) > amax)) / x.size if x.size else 0.0


class Saturation:
    def __init__(self, amax: dict[str, float], window: int, max_tensors: int) -> None:
        self.amax = dict(amax)
        self.max_tensors = max_tensors
        self._ratios = {name: deque(maxlen=window) for name in self.amax}
        self._sums = dict.fromkeys(self.amax, 0.0)
        self.exported: list[str] = []

    def add(self, activations: dict[str, np.ndarray]) -> None:
        for name, x in activations.items():
            if name not in self.amax:
                continue
            ratios = self._ratios[name]
            if len(ratios) == ratios.maxlen:
                self._sums[name] -= ratios[0]
            r = beyond(x, self.amax[name])
            ratios.append(r)
            self._sums[name] += r

    def ratio(self, name: str) -> float:
        n = len(self._ratios[name])
        return max(self._sums[name], 0.0) / n if n else 0.0

    def maximum(self) -> float:
        return max((self.ratio(n) for n in self.amax), default=0.0)

    def choose(self) -> tuple[list[str], list[str]]:
        """Update the exported tensor set; returns (exported now, removed)."""
        ranked = sorted(self.amax, key=lambda n: (-self.ratio(n), n))
        chosen = [n for n in self.exported if n in self.amax]
        for cand in ranked:
            if cand in chosen:
                continue
            if len(chosen) < self.max_tensors:
                chosen.append(cand)
                continue
            weakest = min(chosen, key=lambda n: (self.ratio(n), n))
            if self.ratio(cand) > max(_DISPLACE * self.ratio(weakest), self.ratio(weakest) + _MIN_STEP):
                chosen[chosen.index(weakest)] = cand
            else:
                break  # ranked: nobody after this one can displace either
        removed = [n for n in self.exported if n not in chosen]
        self.exported = chosen
        return chosen, removed
