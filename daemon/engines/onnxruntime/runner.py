"""Runs a model with ONNX Runtime: one InferenceSession per instance slot.

Separate sessions give each slot its own intra-op thread pool, so N slots run
N batches at once without sharing (and contending for) one pool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from daemon.config import ModelConfig
from daemon.engines import specs
from daemon.engines.onnxruntime.builder import providers, threads_per_slot
from daemon.errors import ConfigError
from daemon.tensor_spec import TensorSpec


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


def load(artifact: Path, config: ModelConfig, model_dir: Path, *, engine_id: str) -> OrtEngine:
    """Open an optimized model from the engine cache, one session per instance slot."""
    import onnxruntime as ort

    threads = threads_per_slot(config)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # The artifact was optimized when it was built; doing it again is the cost a warm start saves.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.onnxruntime.allow_spinning else "0")
    try:
        sessions = [ort.InferenceSession(str(artifact), options, providers=providers()) for _ in range(config.instances)]
    except Exception as exc:  # ORT raises its own exception types for unreadable or invalid models
        raise ConfigError(f"{artifact}: ONNX Runtime cannot load the engine: {exc}") from None
    first = sessions[0]
    inputs, outputs = specs.resolve(specs.from_ort(first.get_inputs(), config.name, "input"),
                                    specs.from_ort(first.get_outputs(), config.name, "output"), config, model_dir)
    return OrtEngine(sessions, inputs, outputs, precision=config.precision, engine_id=engine_id, threads_per_slot=threads)
