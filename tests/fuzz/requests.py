"""Valid KServe v2 requests for the fuzz repository, and hypothesis strategies that mutate them.

Requests are tritonclient's own ``service_pb2`` messages, so the daemon is attacked through the
protocol as Triton's clients define it. Images are small (at most 32 x 32) and only PNGs are
bit-flipped: PNG headers carry a CRC, so a flip never forges a 20000 x 20000 header (the
decompression bombs of issue 10 rows 1-3 have their own interop tests and would only make this
suite slow and memory-hungry on a 2-core CI machine).
"""

from __future__ import annotations

import struct
from functools import lru_cache

import cv2
import numpy as np
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb

from tests.interop.conftest import DIGITS

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES", "BF16"]
CONTENT_FIELDS = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                  "fp32_contents", "fp64_contents", "bytes_contents"]
MODELS = ["digits", "add_sub", "id_bytes", "id_int8", "id_fp16", "id_bool", "flat"]
TENSOR_NAMES = ["input", "image", "logits", "a", "b", "sum", "diff", "x", "y"]
PARAMETER_KEYS = ["timeout", "priority", "sequence_id", "sequence_start", "sequence_end",
                  "binary_data_output", "binary_data_size", "classification", "shared_memory_region"]

INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)


def frame(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


@lru_cache(maxsize=1)
def heldout() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DIGITS / "data" / "heldout.npz")
    return (data["x"].astype(np.float32) / 16.0)[:, None, :, :], data["y"]


def good_request(n: int = 2) -> tuple[pb.ModelInferRequest, list[int]]:
    """The known-good digits request and the classes it must get."""
    x, y = heldout()
    request = pb.ModelInferRequest(model_name="digits", id="known-good")
    request.inputs.add(name="input", datatype="FP32", shape=list(x[:n].shape))
    request.raw_input_contents.append(x[:n].tobytes())
    return request, [int(v) for v in y[:n]]


def digit_png(i: int) -> bytes:
    x, _ = heldout()
    ok, png = cv2.imencode(".png", (x[i, 0] * 255).astype(np.uint8))
    assert ok
    return png.tobytes()


# -- valid requests, one builder per model ----------------------------------------------------------


def _digits_tensor(draw) -> pb.ModelInferRequest:
    n = draw(st.integers(1, 3))
    x, _ = heldout()
    r = pb.ModelInferRequest(model_name="digits")
    r.inputs.add(name="input", datatype="FP32", shape=[n, 1, 8, 8])
    r.raw_input_contents.append(x[:n].tobytes())
    return r


def _digits_images(draw) -> pb.ModelInferRequest:
    images = [digit_png(i) for i in draw(st.lists(st.integers(0, 20), min_size=1, max_size=3))]
    r = pb.ModelInferRequest(model_name="digits")
    r.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
    r.raw_input_contents.append(frame(*images))
    return r


def _add_sub(draw) -> pb.ModelInferRequest:
    shape = [draw(st.integers(1, 4)), draw(st.integers(1, 5))]
    r = pb.ModelInferRequest(model_name="add_sub")
    for name in ("a", "b"):
        r.inputs.add(name=name, datatype="FP32", shape=shape)
        r.raw_input_contents.append(np.ones(shape, np.float32).tobytes())
    return r


def _identity(draw, model: str, datatype: str, typed: bool) -> pb.ModelInferRequest:
    n = draw(st.integers(1, 3))
    r = pb.ModelInferRequest(model_name=model)
    inp = r.inputs.add(name="x", datatype=datatype, shape=[n, 4])
    if datatype == "BYTES":
        items = draw(st.lists(st.binary(max_size=12), min_size=4 * n, max_size=4 * n))
        if typed:
            inp.contents.bytes_contents.extend(items)
        else:
            r.raw_input_contents.append(frame(*items))
    elif datatype == "INT8":
        values = draw(st.lists(st.integers(-128, 127), min_size=4 * n, max_size=4 * n))
        if typed:
            inp.contents.int_contents.extend(values)
        else:
            r.raw_input_contents.append(np.array(values, np.int8).tobytes())
    elif datatype == "BOOL":
        values = draw(st.lists(st.booleans(), min_size=4 * n, max_size=4 * n))
        if typed:
            inp.contents.bool_contents.extend(values)
        else:
            r.raw_input_contents.append(np.array(values, np.bool_).tobytes())
    else:  # FP16 has no typed field
        r.raw_input_contents.append(np.arange(4 * n, dtype=np.float16).tobytes())
    return r


def _flat(draw) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="flat")
    inp = r.inputs.add(name="x", datatype="FP32", shape=[4])
    if draw(st.booleans()):
        inp.contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    else:
        r.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return r


@st.composite
def valid_requests(draw) -> pb.ModelInferRequest:
    kind = draw(st.sampled_from(["digits", "images", "add_sub", "bytes", "int8", "fp16", "bool", "flat"]))
    if kind == "digits":
        r = _digits_tensor(draw)
    elif kind == "images":
        r = _digits_images(draw)
    elif kind == "add_sub":
        r = _add_sub(draw)
    elif kind == "flat":
        r = _flat(draw)
    else:
        model, datatype = {"bytes": ("id_bytes", "BYTES"), "int8": ("id_int8", "INT8"),
                           "fp16": ("id_fp16", "FP16"), "bool": ("id_bool", "BOOL")}[kind]
        r = _identity(draw, model, datatype, typed=draw(st.booleans()))
    if draw(st.booleans()):
        r.id = draw(st.text(max_size=16))
    return r


# -- pieces of hostile input ------------------------------------------------------------------------

names = st.one_of(
    st.sampled_from(MODELS + TENSOR_NAMES + ["", ".", "..", "../digits", "/etc/passwd", "digits/1", "digits\x00",
                                             " digits", "DIGITS", "a" * 256, "é" * 200, "*", "%s%n", "\\"]),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=250, max_size=300),
)
versions = st.one_of(
    st.sampled_from(["", "1", "0", "-1", "2", "01", "1.0", " 1", "latest", "99999999999999999999999", "1\x00"]),
    st.text(max_size=12),
)
dims = st.one_of(
    st.integers(-3, 9),
    st.sampled_from([2**31 - 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63 - 1, -(2**63)]),
)
shapes = st.lists(dims, max_size=6)


@st.composite
def parameters(draw):
    """An InferParameter of any kind, values chosen to hit the edges."""
    kind = draw(st.sampled_from(["int64", "uint64", "bool", "string", "double", "unset"]))
    p = pb.InferParameter()
    if kind == "int64":
        p.int64_param = draw(st.one_of(st.integers(-5, 20), INT64))
    elif kind == "uint64":
        p.uint64_param = draw(st.one_of(st.integers(0, 20), UINT64))
    elif kind == "bool":
        p.bool_param = draw(st.booleans())
    elif kind == "string":
        p.string_param = draw(st.one_of(st.sampled_from(["1", "3", "1s", "-1", ""]), st.text(max_size=20)))
    elif kind == "double":
        p.double_param = draw(st.floats(allow_nan=True, allow_infinity=True))
    return p


@st.composite
def image_bytes(draw) -> bytes:
    """Something in the place of an encoded image: real, truncated, flipped or junk."""
    kind = draw(st.sampled_from(["png", "jpeg", "png_flipped", "png_truncated", "jpeg_truncated", "junk",
                                 "empty", "magic"]))
    h, w = draw(st.integers(1, 32)), draw(st.integers(1, 32))
    channels = draw(st.sampled_from([1, 3, 4]))
    pixels = np.full((h, w, channels), draw(st.integers(0, 255)), np.uint8)
    if kind.startswith("png"):
        ok, data = cv2.imencode(".png", pixels)
    elif kind.startswith("jpeg"):
        ok, data = cv2.imencode(".jpg", pixels[..., :3] if channels == 4 else pixels)
    else:
        ok, data = True, np.zeros(0, np.uint8)
    assert ok
    blob = data.tobytes()
    if kind == "png_flipped":
        buf = bytearray(blob)
        for pos in draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=4)):
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        blob = bytes(buf)
    elif kind.endswith("truncated"):
        blob = blob[:draw(st.integers(0, len(blob) - 1))]
    elif kind == "junk":
        blob = draw(st.binary(max_size=256))
    elif kind == "magic":
        magic = draw(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP",
                                      b"II*\x00", b"MM\x00*"]))
        blob = magic + draw(st.binary(max_size=64))
    return blob


@st.composite
def bytes_framing(draw) -> bytes:
    """KServe BYTES framing with lengths that may lie, overrun or stop short."""
    items = draw(st.lists(st.one_of(st.binary(max_size=16), image_bytes()), max_size=6))
    out = bytearray()
    for item in items:
        length = len(item)
        if draw(st.integers(0, 5)) == 0:
            length = draw(st.sampled_from([0, len(item) + 1, max(len(item) - 1, 0), 2**31, 2**32 - 1]))
        out += struct.pack("<I", length) + item
    tail = draw(st.sampled_from([b"", b"\x01", b"\x01\x00", b"\x05\x00\x00\x00ab"]))
    return bytes(out + tail)


# -- mutations --------------------------------------------------------------------------------------


def _pick(draw, seq) -> int:
    return draw(st.integers(0, len(seq) - 1))


def _mutate_once(draw, r: pb.ModelInferRequest) -> str:
    ops = ["model_name", "model_version", "id", "parameters", "outputs"]
    if r.inputs:
        ops += ["input_name", "datatype", "shape", "drop_input", "duplicate_input", "input_parameters",
                "typed_contents"]
    if r.raw_input_contents:
        ops += ["raw_truncate", "raw_extend", "raw_replace", "raw_drop", "raw_framing", "raw_image"]
    ops += ["extra_input", "extra_raw"]
    op = draw(st.sampled_from(ops))
    if op == "model_name":
        r.model_name = draw(names)
    elif op == "model_version":
        r.model_version = draw(versions)
    elif op == "id":
        r.id = draw(st.text(max_size=300))
    elif op == "parameters":
        key = draw(st.one_of(st.sampled_from(PARAMETER_KEYS), st.text(max_size=12)))
        r.parameters[key].CopyFrom(draw(parameters()))
    elif op == "outputs":
        out = r.outputs.add(name=draw(st.one_of(st.sampled_from(TENSOR_NAMES + ["scores", "classes", "labels"]), names)))
        if draw(st.booleans()):
            key = draw(st.sampled_from(["classification", "binary_data", "shared_memory_region"]))
            out.parameters[key].CopyFrom(draw(parameters()))
    elif op == "input_name":
        r.inputs[_pick(draw, r.inputs)].name = draw(st.one_of(st.sampled_from(TENSOR_NAMES), names))
    elif op == "datatype":
        r.inputs[_pick(draw, r.inputs)].datatype = draw(st.one_of(st.sampled_from(DATATYPES + ["", "fp32"]),
                                                                  st.text(max_size=8)))
    elif op == "shape":
        inp = r.inputs[_pick(draw, r.inputs)]
        del inp.shape[:]
        inp.shape.extend(draw(shapes))
    elif op == "drop_input":
        i = _pick(draw, r.inputs)
        del r.inputs[i]
        if i < len(r.raw_input_contents) and draw(st.booleans()):
            del r.raw_input_contents[i]
    elif op == "duplicate_input":
        i = _pick(draw, r.inputs)
        r.inputs.add().CopyFrom(r.inputs[i])
        if i < len(r.raw_input_contents):
            r.raw_input_contents.append(r.raw_input_contents[i])
    elif op == "input_parameters":
        key = draw(st.one_of(st.sampled_from(PARAMETER_KEYS), st.text(max_size=12)))
        r.inputs[_pick(draw, r.inputs)].parameters[key].CopyFrom(draw(parameters()))
    elif op == "typed_contents":
        contents = r.inputs[_pick(draw, r.inputs)].contents
        field = draw(st.sampled_from(CONTENT_FIELDS))
        count = draw(st.integers(0, 12))
        values = {
            "bool_contents": st.booleans(), "int_contents": st.integers(-(2**31), 2**31 - 1),
            "int64_contents": INT64, "uint_contents": st.integers(0, 2**32 - 1), "uint64_contents": UINT64,
            "fp32_contents": st.floats(width=32), "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=8),
        }[field]
        getattr(contents, field).extend(draw(st.lists(values, min_size=count, max_size=count)))
    elif op == "raw_truncate":
        i = _pick(draw, r.raw_input_contents)
        r.raw_input_contents[i] = r.raw_input_contents[i][:draw(st.integers(0, len(r.raw_input_contents[i])))]
    elif op == "raw_extend":
        i = _pick(draw, r.raw_input_contents)
        r.raw_input_contents[i] = r.raw_input_contents[i] + draw(st.binary(min_size=1, max_size=64))
    elif op == "raw_replace":
        r.raw_input_contents[_pick(draw, r.raw_input_contents)] = draw(st.binary(max_size=2048))
    elif op == "raw_drop":
        del r.raw_input_contents[_pick(draw, r.raw_input_contents)]
    elif op == "raw_framing":
        r.raw_input_contents[_pick(draw, r.raw_input_contents)] = draw(bytes_framing())
    elif op == "raw_image":
        images = draw(st.lists(image_bytes(), min_size=1, max_size=4))
        r.raw_input_contents[_pick(draw, r.raw_input_contents)] = frame(*images)
    elif op == "extra_input":
        r.inputs.add(name=draw(st.one_of(st.sampled_from(TENSOR_NAMES), names)),
                     datatype=draw(st.sampled_from(DATATYPES)), shape=draw(shapes))
    elif op == "extra_raw":
        r.raw_input_contents.append(draw(st.binary(max_size=256)))
    return op


@st.composite
def mutated_requests(draw) -> pb.ModelInferRequest:
    r = draw(valid_requests())
    for _ in range(draw(st.integers(1, 4))):
        _mutate_once(draw, r)
    return r


@st.composite
def corrupted_bytes(draw) -> bytes:
    """A serialized ModelInferRequest that is no longer one: flipped, cut, spliced or random."""
    kind = draw(st.sampled_from(["random", "flip", "truncate", "splice", "varint"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=512))
    blob = bytearray(draw(valid_requests()).SerializeToString())
    if kind == "flip":
        for pos in draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8)):
            blob[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        blob = blob[:draw(st.integers(1, len(blob) - 1))]
    elif kind == "splice":
        pos = draw(st.integers(0, len(blob)))
        blob[pos:pos] = draw(st.binary(min_size=1, max_size=32))
    else:  # an overlong varint or a length-delimited field that claims more than is there
        blob += draw(st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\xff" * 11, b"\x12\x80", b"\x0b", b"\x3a\x05ab"]))
    return bytes(blob)
