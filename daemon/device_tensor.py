"""A tensor in device memory, as the TensorRT runner and the GPU processors hand it to each other.

Its own module below both, so neither package imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DeviceTensor:
    """A tensor in device memory that its holder does not own (for example an engine's buffer)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
