"""The tensors a model takes and returns as clients see them, and the KServe datatype tables.

Below every package that describes tensors (engines, processing, server, config), so none of
them needs another for these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# KServe v2 datatype names and their numpy equivalents; BYTES holds Python bytes objects.
DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_DATATYPE: dict[np.dtype, str] = {v: k for k, v in DATATYPE_TO_NUMPY.items()}


def datatype_of(dtype: np.dtype) -> str:
    """KServe datatype for a numpy dtype (strings and bytes map to BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_DATATYPE[dtype]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no KServe datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as clients see it.

    ``shape`` is the full shape including the batch dimension when the model
    batches (then ``shape[0] == -1``); -1 marks any variable dimension.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    labels: tuple[str, ...] = field(default=(), compare=False)
    # Requests may leave it out (a model that takes images or its preprocessed tensor).
    optional: bool = field(default=False, compare=False)

    @property
    def dtype(self) -> np.dtype:
        return DATATYPE_TO_NUMPY[self.datatype]

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        return all(want < 0 or want == got for want, got in zip(self.shape, shape))
