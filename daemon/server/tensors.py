"""KServe v2 tensor codec: request inputs to numpy, numpy to response outputs.

Everything here is pure (no gRPC server state) and runs on every request, so the
numeric paths stay vectorised; only BYTES tensors are walked element by element,
because their framing is variable-length.

Inputs decoded from ``raw_input_contents`` are views over the bytes objects that
protobuf hands out (no copy on our side) and are therefore read-only: engines must
treat their feeds as immutable and copy before writing into them.

Every problem with a request raises :class:`daemon.errors.InvalidArgument` with a
message that names the tensor and says what is wrong.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

import numpy as np

from daemon.errors import Internal, InvalidArgument
from daemon.processing.images import RegionFrames
from daemon.protogen import grpc_service_pb2 as pb
from daemon.tensor_spec import TensorSpec

__all__ = [
    "classify",
    "decode_inputs",
    "deserialize_bytes_tensor",
    "encode_response",
    "requested_outputs",
    "serialize_bytes_tensor",
]

_LENGTH = struct.Struct("<I")

# The wire is little-endian whatever the host is; on little-endian hosts these
# equal the native dtypes, so arrays built with them need no byte swapping later.
_WIRE_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

# Which InferTensorContents field carries each datatype; FP16/BF16 have none, so
# they can only travel as raw bytes.
_TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

# The typed fields are wider than these datatypes (int32/uint32 on the wire), so
# values must be range-checked before narrowing or they would silently wrap.
_NARROWED = {"INT8", "INT16", "UINT8", "UINT16"}

# Triton's classification extension supports only numeric outputs; FP16 is added
# here because FP16 engines are the norm on Jetson.
_CLASSIFIABLE = set(_WIRE_DTYPE) - {"BOOL"}

# No request carries 2^48 elements; a shape beyond that with a zero dimension passes the byte
# count check (0 bytes) but numpy cannot represent it, so it is refused up front.
_MAX_ELEMENTS = 2**48


# --------------------------------------------------------------------------- BYTES


def serialize_bytes_tensor(arr: np.ndarray) -> bytes:
    """Frame every element (row-major) as a 4-byte little-endian length plus its bytes.

    ``str`` elements are encoded as UTF-8; bytes-like elements are taken as they
    are; anything else is written as ``str(element)`` (as tritonclient does).
    """
    arr = np.asarray(arr)
    parts: list[bytes] = []
    append = parts.append
    pack = _LENGTH.pack
    # tolist() hands back the Python objects themselves (bytes stay bytes, np.str_
    # becomes str), which is cheaper to walk than numpy scalars.
    for item in arr.ravel(order="C").tolist():
        if isinstance(item, bytes):
            data = item
        elif isinstance(item, str):
            data = item.encode("utf-8")
        elif isinstance(item, (bytearray, memoryview)):
            data = bytes(item)
        else:
            data = str(item).encode("utf-8")
        append(pack(len(data)))
        append(data)
    return b"".join(parts)


def deserialize_bytes_tensor(buf: bytes, count: int | None, *, tensor: str = "BYTES tensor") -> np.ndarray:
    """Parse KServe BYTES framing into a 1-D object array of ``bytes``.

    ``count`` is the element count the shape promises (``None``: take however many
    there are). ``tensor`` names the tensor in error messages, e.g. ``"input 'text'"``.
    """
    # Slicing bytes makes each element in one step; a memoryview would need a second copy.
    data = buf if isinstance(buf, bytes) else bytes(buf)
    size = len(data)
    # Every element needs at least its 4-byte length, so an absurd count is
    # rejected before allocating anything for it.
    if count is not None and count * 4 > size:
        raise InvalidArgument(
            f"{tensor}: BYTES data holds {size} bytes, too few for the {count} elements its shape "
            "declares (each element needs a 4-byte length prefix)"
        )
    items: list[bytes] = []
    append = items.append
    unpack = _LENGTH.unpack_from
    offset = 0
    n = 0
    # -1 never equals n, so with no count the loop runs until the data ends.
    limit = -1 if count is None else count
    while offset < size and n != limit:
        try:
            (length,) = unpack(data, offset)
        except struct.error:
            raise InvalidArgument(
                f"{tensor}: BYTES data is truncated: element {n} needs a 4-byte length "
                f"but only {size - offset} bytes remain"
            ) from None
        start = offset + 4
        offset = start + length
        if offset > size:
            raise InvalidArgument(
                f"{tensor}: BYTES element {n} claims {length} bytes but only {size - start} remain"
            )
        append(data[start:offset])
        n += 1
    if offset < size:
        raise InvalidArgument(
            f"{tensor}: BYTES data has {size - offset} trailing bytes after the {count} elements its shape declares"
        )
    if count is not None and n != count:
        raise InvalidArgument(f"{tensor}: BYTES data holds {n} elements but its shape declares {count}")
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


# --------------------------------------------------------------------------- inputs


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"'{s.name}'" for s in specs) or "(none)"


def decode_inputs(
    request: pb.ModelInferRequest, specs: Sequence[TensorSpec], in_shared_memory: dict | None = None
) -> dict[str, np.ndarray]:
    """Turn ``request.inputs`` into numpy arrays checked against the model's ``specs``.

    Raw inputs become zero-copy, read-only views of ``raw_input_contents``; typed
    contents are converted (and range-checked where the wire type is wider).
    ``in_shared_memory`` maps inputs read from shared memory to their raw bytes; as in
    Triton, ``raw_input_contents`` then holds entries for the other inputs only. Raw frames
    left in their region for the GPU (:class:`RegionFrames`) pass through unread, for the
    model's ``admit``; their byte size was checked against the shape by the registry.
    """
    in_shm = in_shared_memory or {}
    by_name = {spec.name: spec for spec in specs}
    inputs = request.inputs

    # Name-level problems first: they usually mean the client targets another model.
    seen: set[str] = set()
    for inp in inputs:
        name = inp.name
        if name not in by_name:
            raise InvalidArgument(
                f"input '{name}' is not an input of model '{request.model_name}'; "
                f"its inputs are {_names(specs)}"
            )
        if name in seen:
            raise InvalidArgument(f"input '{name}' appears more than once in the request")
        seen.add(name)
    missing = [s.name for s in specs if s.name not in seen and not s.optional]
    if missing:
        listed = ", ".join(f"'{m}'" for m in missing)
        raise InvalidArgument(
            f"the request lacks input {listed}; model '{request.model_name}' needs all of {_names(specs)}"
        )

    shapes: list[tuple[int, ...]] = []
    typed_fields: list[list] = []
    for inp in inputs:
        spec = by_name[inp.name]
        if inp.datatype != spec.datatype:
            raise InvalidArgument(
                f"input '{inp.name}': expected datatype {spec.datatype}, got {inp.datatype or '(empty)'}"
            )
        shape = tuple(inp.shape)
        if any(d < 0 for d in shape):
            raise InvalidArgument(
                f"input '{inp.name}': shape {_fmt_shape(shape)} has a negative dimension; "
                "request shapes must give every dimension's actual size"
            )
        if math.prod(d or 1 for d in shape) > _MAX_ELEMENTS:
            raise InvalidArgument(
                f"input '{inp.name}': shape {_fmt_shape(shape)} describes more elements than any request "
                f"can carry (at most {_MAX_ELEMENTS} per tensor)"
            )
        if not spec.accepts_shape(shape):
            raise InvalidArgument(
                f"input '{inp.name}': shape {_fmt_shape(shape)} does not match the model's shape "
                f"{_fmt_shape(spec.shape)} (-1 accepts any size)"
            )
        shapes.append(shape)
        typed_fields.append(inp.contents.ListFields())

    raw = request.raw_input_contents
    if raw:
        typed = [inp.name for inp, fields in zip(inputs, typed_fields, strict=True) if fields and inp.name not in in_shm]
        if typed:
            raise InvalidArgument(
                f"input '{typed[0]}' sets typed contents while the request also uses raw_input_contents; "
                "send every input one way or the other"
            )
        if len(raw) != len(inputs) - len(in_shm):
            raise InvalidArgument(
                f"the request has {len(raw)} raw_input_contents entries for {len(inputs) - len(in_shm)} inputs "
                "not in shared memory; send exactly one per input, in inputs order"
            )

    out: dict[str, np.ndarray] = {}
    next_raw = 0
    for i, inp in enumerate(inputs):
        spec = by_name[inp.name]
        if inp.name in in_shm and isinstance(in_shm[inp.name], RegionFrames):
            out[inp.name] = in_shm[inp.name]
        elif inp.name in in_shm:
            out[inp.name] = _decode_raw(inp.name, spec.datatype, shapes[i], in_shm[inp.name])
        elif raw:
            out[inp.name] = _decode_raw(inp.name, spec.datatype, shapes[i], raw[next_raw])
            next_raw += 1
        else:
            out[inp.name] = _decode_typed(inp, spec.datatype, shapes[i], typed_fields[i])
    return out


def _decode_raw(name: str, datatype: str, shape: tuple[int, ...], data: bytes) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return deserialize_bytes_tensor(data, count, tensor=f"input '{name}'").reshape(shape)
    dtype = _WIRE_DTYPE[datatype]
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"input '{name}': raw data is {len(data)} bytes but shape {_fmt_shape(shape)} of {datatype} "
            f"needs {expected} bytes"
        )
    if datatype == "BOOL":
        # numpy reads any nonzero byte as a bool whose later arithmetic is undefined;
        # the protocol only defines 0 and 1.
        as_bytes = np.frombuffer(data, dtype=np.uint8)
        if count and as_bytes.max() > 1:
            raise InvalidArgument(f"input '{name}': raw BOOL data must hold only bytes 0 and 1")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _decode_typed(inp, datatype: str, shape: tuple[int, ...], fields: list) -> np.ndarray:
    name = inp.name
    count = math.prod(shape)
    wanted = _TYPED_FIELD.get(datatype)
    if wanted is None:
        if not fields and count == 0:
            return np.empty(shape, dtype=_WIRE_DTYPE[datatype])
        raise InvalidArgument(
            f"input '{name}': {datatype} data can only be sent in raw_input_contents "
            "(the typed contents fields have no slot for it)"
        )
    for field, _ in fields:
        if field.name != wanted:
            raise InvalidArgument(
                f"input '{name}': datatype {datatype} belongs in contents.{wanted}, "
                f"but the request set contents.{field.name}"
            )
    values = getattr(inp.contents, wanted)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}': contents.{wanted} holds {len(values)} elements but shape "
            f"{_fmt_shape(shape)} needs {count}"
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    dtype = _WIRE_DTYPE[datatype]
    if datatype in _NARROWED:
        wide = np.fromiter(values, dtype=np.int64, count=count)
        info = np.iinfo(dtype)
        if count and (wide.min() < info.min or wide.max() > info.max):
            bad = wide[(wide < info.min) | (wide > info.max)][0]
            raise InvalidArgument(
                f"input '{name}': value {bad} in contents.{wanted} is out of range for {datatype} "
                f"({info.min}..{info.max})"
            )
        return wide.astype(dtype).reshape(shape)
    return np.fromiter(values, dtype=dtype, count=count).reshape(shape)


# --------------------------------------------------------------------------- outputs


def requested_outputs(
    request: pb.ModelInferRequest, specs: Sequence[TensorSpec]
) -> list[tuple[TensorSpec, int | None]]:
    """The outputs to return, in request order, each with its classification count or None.

    No requested outputs means all of the model's outputs, in model order, as raw tensors.
    """
    if not request.outputs:
        return [(spec, None) for spec in specs]
    by_name = {spec.name: spec for spec in specs}
    result: list[tuple[TensorSpec, int | None]] = []
    seen: set[str] = set()
    for out in request.outputs:
        spec = by_name.get(out.name)
        if spec is None:
            raise InvalidArgument(
                f"output '{out.name}' is not an output of model '{request.model_name}'; "
                f"its outputs are {_names(specs)}"
            )
        if out.name in seen:
            raise InvalidArgument(f"output '{out.name}' is requested more than once")
        seen.add(out.name)
        k: int | None = None
        if "classification" in out.parameters:
            param = out.parameters["classification"]
            kind = param.WhichOneof("parameter_choice")
            if kind == "int64_param":
                k = param.int64_param
            elif kind == "uint64_param":
                k = param.uint64_param
            else:
                raise InvalidArgument(
                    f"output '{out.name}': the classification parameter must be an integer "
                    f"(int64_param or uint64_param), got {kind or 'nothing'}"
                )
            if k < 1:
                raise InvalidArgument(
                    f"output '{out.name}': the classification parameter asks for {k} classes; it must be at least 1"
                )
            if spec.datatype not in _CLASSIFIABLE:
                raise InvalidArgument(
                    f"output '{out.name}': classification needs a numeric output, but its datatype is {spec.datatype}"
                )
        result.append((spec, k))
    return result


def _descending(values: np.ndarray) -> np.ndarray:
    """Indices sorting the last axis by value descending, ties in ascending index.

    Sorting the reversed values stably and reversing that order gives exactly this,
    without negating (which would wrap for unsigned types).
    """
    n = values.shape[-1]
    return (n - 1) - np.argsort(values[..., ::-1], axis=-1, kind="stable")[..., ::-1]


def _top_indices(rows: np.ndarray, k: int) -> np.ndarray:
    """Per row, the indices of the ``k`` largest values in ``_descending`` order."""
    batch, n = rows.shape
    if rows.dtype.kind == "f" and np.isnan(rows).any():
        # NaN compares false with everything; rank it below every number instead of
        # letting it land wherever the sort leaves it.
        rows = np.where(np.isnan(rows), -np.inf, rows)
    if k == 0 or k * 8 >= n:
        return _descending(rows)[:, :k]
    # A full stable sort costs ~50 us per 1000 classes; partitioning first leaves only
    # the few values at or above the k-th largest (ties included) to sort.
    kth = np.partition(rows, n - k, axis=1)[:, n - k]
    out = np.empty((batch, k), dtype=np.intp)
    for b in range(batch):
        candidates = np.flatnonzero(rows[b] >= kth[b])
        out[b] = candidates[_descending(rows[b, candidates])[:k]]
    return out


def classify(scores: np.ndarray, k: int, labels: Sequence[str], batched: bool) -> np.ndarray:
    """Top-``k`` classes per batch item as Triton's ``"<value>:<index>[:<label>]"`` BYTES.

    Values print like C++ ``std::to_string`` (which Triton uses): ``%f`` for floating
    types, plain integers for integer types. Order is by value descending, ties to the
    lower index (Triton's sort leaves ties unspecified; this makes them deterministic).
    The result has shape ``[batch, k]`` when ``batched`` else ``[k]``, with ``k``
    clipped to the number of classes.
    """
    scores = np.asarray(scores)
    kind = scores.dtype.kind
    if kind not in "iuf":
        raise InvalidArgument(f"classification needs numeric scores, got numpy dtype {scores.dtype}")
    if batched:
        if scores.ndim == 0:
            raise InvalidArgument("classification of a batched output needs a batch dimension")
        rows = scores.reshape(scores.shape[0], -1)
    else:
        rows = scores.reshape(1, -1)
    n_classes = rows.shape[1]
    k = min(k, n_classes)
    top_idx = _top_indices(rows, k)
    top_val = np.take_along_axis(rows, top_idx, axis=1)
    if kind == "f":
        values = [[f"{v:f}" for v in row] for row in top_val.astype(np.float64).tolist()]
    else:
        values = [[str(v) for v in row] for row in top_val.tolist()]
    n_labels = len(labels)
    out = np.empty((rows.shape[0], k), dtype=object)
    for b, (vals, idxs) in enumerate(zip(values, top_idx.tolist(), strict=True)):
        for j, (val, idx) in enumerate(zip(vals, idxs, strict=True)):
            text = f"{val}:{idx}:{labels[idx]}" if idx < n_labels else f"{val}:{idx}"
            out[b, j] = text.encode("utf-8")
    return out if batched else out[0]


def encode_response(
    response: pb.ModelInferResponse,
    outputs: list[tuple[TensorSpec, int | None]],
    arrays: dict[str, np.ndarray],
    batched: bool,
    in_shared_memory: dict | None = None,
) -> None:
    """Append each requested output to ``response`` as raw data, in ``outputs`` order.

    Data always goes to ``raw_output_contents`` (never typed contents): tritonclient's
    ``as_numpy`` reads raw data and it avoids a per-element conversion. Outputs named in
    ``in_shared_memory`` (name -> window with ``write``) go there instead and, as in Triton,
    keep an empty ``raw_output_contents`` entry so the indices still line up.
    """
    windows = in_shared_memory or {}

    def append(name: str, data) -> None:
        window = windows.get(name)
        if window is None:
            response.raw_output_contents.append(data if isinstance(data, bytes) else data.tobytes())
        else:
            window.write(np.ascontiguousarray(data) if isinstance(data, np.ndarray) else data)
            response.raw_output_contents.append(b"")

    for spec, k in outputs:
        try:
            arr = arrays[spec.name]
        except KeyError:
            raise Internal(f"the engine did not produce output '{spec.name}'") from None
        arr = np.asarray(arr)
        tensor = response.outputs.add()
        tensor.name = spec.name
        if k is not None:
            try:
                cls = classify(arr, k, spec.labels, batched)
            except InvalidArgument as exc:
                raise InvalidArgument(f"output '{spec.name}': {exc}") from None
            tensor.datatype = "BYTES"
            tensor.shape.extend(cls.shape)
            response.raw_output_contents.append(serialize_bytes_tensor(cls))
            continue
        tensor.datatype = spec.datatype
        tensor.shape.extend(arr.shape)
        if spec.datatype == "BYTES":
            append(spec.name, serialize_bytes_tensor(arr))
            continue
        wire = _WIRE_DTYPE[spec.datatype]
        if arr.dtype != wire:
            # ORT returns the declared type, so this only runs for engines that widen or
            # narrow (or hand back a big-endian view); the client trusts the datatype.
            arr = arr.astype(wire)
        # tobytes() emits C order for any layout, so non-contiguous views need no special case.
        append(spec.name, arr)
