"""The engine interface every backend implements.

An engine is built from a (lowered) ONNX model, knows its I/O tensors, and runs
``infer`` on one batch at a time. It is called from a worker thread, never from
the asyncio loop, so it may block.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

# Re-exported: code on other branches still imports these from here.
from daemon.tensor_spec import DATATYPE_TO_NUMPY, NUMPY_TO_DATATYPE, TensorSpec, datatype_of  # noqa: F401


class Engine(Protocol):
    """What the scheduler needs from a backend."""

    backend: str
    precision: str
    engine_id: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def infer(self, feeds: dict[str, np.ndarray], slot: int = 0) -> dict[str, np.ndarray]:
        """Run one batch on instance slot ``slot``; blocking; slots may run concurrently."""
        ...

    def close(self) -> None: ...
