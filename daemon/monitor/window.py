"""Sliding windows of per-sample values."""

from __future__ import annotations

from collections import deque

import numpy as np


class Window:
    """The last ``size`` samples of several named scalar series."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._series: dict[str, deque] = {}

    def add(self, **values: float) -> None:
        for name, v in values.items():
            self._series.setdefault(name, deque(maxlen=self.size)).append(float(v))

    def mean(self, name: str) -> float | None:
        s = self._series.get(name)
        return float(np.mean(s)) if s else None

    def max(self, name: str) -> float | None:
        s = self._series.get(name)
        return float(max(s)) if s else None

    def sum(self, name: str) -> float:
        s = self._series.get(name)
        return float(sum(s)) if s else 0.0

    def count(self, name: str) -> int:
        s = self._series.get(name)
        return len(s) if s else 0


class CountWindow:
    """The last ``size`` count arrays (e.g. histograms), with their running sum."""

    def __init__(self, size: int) -> None:
        self._items: deque[np.ndarray] = deque()
        self.size = size
        self.total: np.ndarray | None = None

    def add(self, counts: np.ndarray) -> None:
        if self.total is None:
            self.total = np.zeros_like(counts)
        self._items.append(counts)
        self.total = self.total + counts
        if len(self._items) > self.size:
            self.total = self.total - self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)
