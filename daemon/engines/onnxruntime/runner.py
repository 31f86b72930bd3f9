"""Runs a model with ONNX Runtime: one InferenceSession per instance slot.

Separate sessions give each slot its own intra-op thread pool, so N slots run
N batches at once without sharing (and contending for) one pool.
"""

from __future__ import annotations

import numpy as np

from daemon.engines.base import TensorSpec


class OrtEngine:
    backend = "onnxruntime"

    def __init__(
        self,
        sessions: list,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        *,
        precision: str,
        engine_id: str,
        threads_per_slot: int,
    ) -> None:
        self._sessions = sessions
        self.inputs = inputs
        self.outputs = outputs
        self.precision = precision
        self.engine_id = engine_id
        self.threads_per_slot = threads_per_slot
        self._output_names = [o.name for o in outputs]
        self._string_inputs = {i.name for i in inputs if i.datatype == "BYTES"}

    @property
    def slots(self) -> int:
        return len(self._sessions)

    def infer(self, feeds: dict[str, np.ndarray], slot: int = 0) -> dict[str, np.ndarray]:
        if self._string_inputs:
            # ONNX Runtime string tensors take str; KServe BYTES arrive as bytes.
            feeds = dict(feeds)
            for name in self._string_inputs:
                feeds[name] = np.vectorize(
                    lambda b: b.decode("utf-8", "replace") if isinstance(b, bytes) else b, otypes=[object]
                )(feeds[name])
        results = self._sessions[slot].run(self._output_names, feeds)
        return dict(zip(self._output_names, results))

    def close(self) -> None:
        # Dropping the sessions frees their memory and thread pools.
        self._sessions = []
