"""The KServe tensor codec: decoding request inputs, encoding responses, BYTES framing, classification."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from daemon.engines.base import TensorSpec, datatype_of
from daemon.errors import Internal, InvalidArgument
from daemon.protogen import grpc_service_pb2 as pb
from daemon.server.tensors import (
    classify,
    decode_inputs,
    deserialize_bytes_tensor,
    encode_response,
    requested_outputs,
    serialize_bytes_tensor,
)

NUMERIC = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Values that exercise each type's extremes, so a wrong width or sign would show."""
    n = int(np.prod(shape))
    if datatype == "BOOL":
        return (np.arange(n) % 3 == 0).reshape(shape)
    if datatype == "BYTES":
        words = [b"", b"a", "h\u00e9llo \u2603".encode(), b"\x00\xff", b"x" * 300]
        arr = np.empty(n, dtype=object)
        arr[:] = [words[i % len(words)] for i in range(n)]
        return arr.reshape(shape)
    dtype = TensorSpec("x", datatype, shape).dtype
    if dtype.kind == "f":
        vals = np.linspace(-1000.5, 1000.25, n)
    else:
        info = np.iinfo(dtype)
        ints = [int(info.min), int(info.max), 0, 1, int(info.max) - 1][:n] + list(range(2, 2 + max(0, n - 5)))
        return np.array(ints, dtype=dtype).reshape(shape)
    return vals.astype(dtype).reshape(shape)


def raw_request(arrays: dict[str, np.ndarray]) -> pb.ModelInferRequest:
    """A request carrying every array as raw_input_contents, in dict order."""
    req = pb.ModelInferRequest(model_name="m")
    for name, arr in arrays.items():
        datatype = datatype_of(arr.dtype)
        req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        req.raw_input_contents.append(serialize_bytes_tensor(arr) if datatype == "BYTES" else arr.tobytes())
    return req


def typed_request(name: str, datatype: str, arr: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    inp = req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
    getattr(inp.contents, TYPED_FIELD[datatype]).extend(arr.ravel().tolist())
    return req


def assert_invalid(fn, *words: str) -> str:
    with pytest.raises(InvalidArgument) as info:
        fn()
    msg = str(info.value)
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"
    return msg


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("datatype", NUMERIC + ["BYTES"])
def test_raw_round_trip_every_datatype(datatype):
    arr = sample(datatype, (2, 3))
    spec = TensorSpec("x", datatype, (-1, 3))
    got = decode_inputs(raw_request({"x": arr}), [spec])["x"]
    assert got.shape == (2, 3)
    assert got.dtype == spec.dtype
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("datatype", [d for d in NUMERIC if d != "FP16"] + ["BYTES"])
def test_typed_round_trip_every_datatype(datatype):
    arr = sample(datatype, (2, 3))
    if datatype == "FP32":
        arr = arr.astype(np.float32)
    spec = TensorSpec("x", datatype, (2, -1))
    got = decode_inputs(typed_request("x", datatype, arr), [spec])["x"]
    assert got.shape == (2, 3)
    assert got.dtype == spec.dtype
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("datatype", NUMERIC + ["BYTES"])
def test_encode_then_decode_every_datatype(datatype):
    arr = sample(datatype, (4, 2))
    spec = TensorSpec("y", datatype, (-1, 2))
    resp = pb.ModelInferResponse()
    encode_response(resp, [(spec, None)], {"y": arr}, batched=True)
    assert len(resp.outputs) == 1 and len(resp.raw_output_contents) == 1
    out = resp.outputs[0]
    assert (out.name, out.datatype, tuple(out.shape)) == ("y", datatype, (4, 2))
    assert not out.contents.ListFields()
    # Reading it back the way a client would.
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="y", datatype=out.datatype, shape=out.shape)
    req.raw_input_contents.append(resp.raw_output_contents[0])
    np.testing.assert_array_equal(decode_inputs(req, [spec])["y"], arr)


def test_fp16_typed_is_rejected():
    req = pb.ModelInferRequest(model_name="m")
    inp = req.inputs.add(name="h", datatype="FP16", shape=[2])
    inp.contents.fp32_contents.extend([1.0, 2.0])
    assert_invalid(
        lambda: decode_inputs(req, [TensorSpec("h", "FP16", (2,))]), "'h'", "FP16", "raw_input_contents"
    )
    # ...even when no contents field is set at all.
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="h", datatype="FP16", shape=[2])
    assert_invalid(lambda: decode_inputs(req, [TensorSpec("h", "FP16", (2,))]), "'h'", "raw_input_contents")


def test_raw_inputs_are_zero_copy_views():
    arr = np.arange(12, dtype=np.float32)
    req = raw_request({"x": arr})
    got = decode_inputs(req, [TensorSpec("x", "FP32", (12,))])["x"]
    assert not got.flags.writeable
    assert not got.flags.owndata


def test_dynamic_dims_accept_any_size_including_zero():
    spec = TensorSpec("x", "INT64", (-1, -1, 2))
    for shape in [(1, 1, 2), (7, 3, 2), (0, 5, 2), (3, 0, 2)]:
        arr = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
        got = decode_inputs(raw_request({"x": arr}), [spec])["x"]
        assert got.shape == shape
        got = decode_inputs(typed_request("x", "INT64", arr), [spec])["x"]
        assert got.shape == shape


def test_scalar_input():
    arr = np.array(3.5, dtype=np.float64)
    got = decode_inputs(raw_request({"s": arr}), [TensorSpec("s", "FP64", ())])["s"]
    assert got.shape == () and got == 3.5


def test_multiple_inputs_in_any_request_order():
    specs = [
        TensorSpec("image", "UINT8", (-1, 2, 2)),
        TensorSpec("scale", "FP32", (-1, 1)),
        TensorSpec("tag", "BYTES", (-1,)),
    ]
    image = np.arange(8, dtype=np.uint8).reshape(2, 2, 2)
    scale = np.array([[0.5], [2.0]], dtype=np.float32)
    tag = np.array([b"a", "\u00fc".encode()], dtype=object)
    req = raw_request({"tag": tag, "scale": scale, "image": image})
    got = decode_inputs(req, specs)
    assert set(got) == {"image", "scale", "tag"}
    np.testing.assert_array_equal(got["image"], image)
    np.testing.assert_array_equal(got["scale"], scale)
    assert got["tag"].tolist() == [b"a", "\u00fc".encode()]


def test_typed_multiple_inputs():
    specs = [TensorSpec("a", "INT32", (2,)), TensorSpec("b", "BOOL", (3,))]
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="a", datatype="INT32", shape=[2]).contents.int_contents.extend([-5, 7])
    req.inputs.add(name="b", datatype="BOOL", shape=[3]).contents.bool_contents.extend([True, False, True])
    got = decode_inputs(req, specs)
    assert got["a"].tolist() == [-5, 7] and got["a"].dtype == np.int32
    assert got["b"].tolist() == [True, False, True]


def test_typed_narrow_ints_at_their_limits():
    for dt, lo, hi in [
        ("INT8", -128, 127),
        ("INT16", -32768, 32767),
        ("UINT8", 0, 255),
        ("UINT16", 0, 65535),
    ]:
        arr = np.array([lo, hi], dtype=TensorSpec("x", dt, ()).dtype)
        got = decode_inputs(typed_request("x", dt, arr), [TensorSpec("x", dt, (2,))])["x"]
        assert got.tolist() == [lo, hi]


# ----------------------------------------------------------------------------- BYTES framing


def test_bytes_framing_layout_and_round_trip():
    arr = np.array(["", "abc", "\u65e5\u672c", b"\x00"], dtype=object)
    buf = serialize_bytes_tensor(arr)
    ja = "\u65e5\u672c".encode()
    assert buf == (
        struct.pack("<I", 0)
        + struct.pack("<I", 3)
        + b"abc"
        + struct.pack("<I", len(ja))
        + ja
        + struct.pack("<I", 1)
        + b"\x00"
    )
    back = deserialize_bytes_tensor(buf, 4)
    assert back.dtype == object
    assert back.tolist() == [b"", b"abc", ja, b"\x00"]
    assert deserialize_bytes_tensor(buf, None).tolist() == back.tolist()


def test_bytes_serialize_is_row_major_and_accepts_numpy_string_dtypes():
    arr = np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object).T  # non-contiguous
    assert deserialize_bytes_tensor(serialize_bytes_tensor(arr), 4).tolist() == [b"a", b"c", b"b", b"d"]
    assert deserialize_bytes_tensor(serialize_bytes_tensor(np.array(["x", "yz"])), 2).tolist() == [
        b"x",
        b"yz",
    ]
    assert deserialize_bytes_tensor(serialize_bytes_tensor(np.array([b"x", b"yz"])), 2).tolist() == [
        b"x",
        b"yz",
    ]


def test_bytes_empty_tensor_and_all_empty_strings():
    assert serialize_bytes_tensor(np.empty((0,), dtype=object)) == b""
    assert deserialize_bytes_tensor(b"", 0).shape == (0,)
    three_empty = np.array([b"", b"", b""], dtype=object)
    assert deserialize_bytes_tensor(serialize_bytes_tensor(three_empty), 3).tolist() == [b"", b"", b""]


@pytest.mark.parametrize(
    "buf,count,words",
    [
        (b"\x01\x00", 1, ["too few"]),
        (struct.pack("<I", 1) + b"a" + b"\x02\x00", None, ["truncated", "element 1"]),
        (struct.pack("<I", 10) + b"abc", 1, ["element 0", "claims 10 bytes"]),
        (struct.pack("<I", 1) + b"a" + b"zzzz", 1, ["trailing"]),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 0) * 2, 2, ["trailing"]),
        (struct.pack("<I", 0) * 3, 2, ["trailing", "2 elements"]),
        (struct.pack("<I", 5) + b"hello" + struct.pack("<I", 0) * 2, 4, ["3 elements", "declares 4"]),
        (struct.pack("<I", 0) * 100, 10**15, ["too few"]),
    ],
)
def test_bytes_malformed_framing(buf, count, words):
    assert_invalid(
        lambda: deserialize_bytes_tensor(buf, count, tensor="input 'text'"), "input 'text'", *words
    )


def test_bytes_malformed_framing_in_request_names_the_input():
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="text", datatype="BYTES", shape=[2])
    req.raw_input_contents.append(struct.pack("<I", 3) + b"abc" + struct.pack("<I", 9) + b"x")
    assert_invalid(
        lambda: decode_inputs(req, [TensorSpec("text", "BYTES", (-1,))]), "input 'text'", "claims 9"
    )


# ----------------------------------------------------------------------------- invalid requests

SPECS = [TensorSpec("input", "FP32", (-1, 3)), TensorSpec("mask", "BOOL", (-1, 3))]


def good_arrays(n: int = 2) -> dict[str, np.ndarray]:
    return {"input": np.ones((n, 3), dtype=np.float32), "mask": np.ones((n, 3), dtype=bool)}


def test_unknown_input_lists_the_model_inputs():
    req = raw_request({**good_arrays(), "extra": np.ones(3, dtype=np.float32)})
    assert_invalid(lambda: decode_inputs(req, SPECS), "'extra'", "'input'", "'mask'")


def test_duplicate_input():
    req = raw_request(good_arrays())
    req.inputs.add(name="input", datatype="FP32", shape=[2, 3])
    req.raw_input_contents.append(np.ones((2, 3), dtype=np.float32).tobytes())
    assert_invalid(lambda: decode_inputs(req, SPECS), "'input'", "more than once")


def test_missing_input_is_named():
    req = raw_request({"input": good_arrays()["input"]})
    msg = assert_invalid(lambda: decode_inputs(req, SPECS), "'mask'", "lacks")
    assert "'input'" in msg  # the full list of required inputs is there to help


def test_wrong_datatype():
    arrays = good_arrays()
    arrays["input"] = arrays["input"].astype(np.int32)
    req = raw_request(arrays)
    msg = assert_invalid(lambda: decode_inputs(req, SPECS))
    assert msg == "input 'input': expected datatype FP32, got INT32"


@pytest.mark.parametrize("shape", [(2,), (2, 3, 1), (2, 4)])
def test_shape_not_matching_spec(shape):
    arrays = good_arrays()
    arrays["input"] = np.ones(shape, dtype=np.float32)
    req = raw_request(arrays)
    assert_invalid(lambda: decode_inputs(req, SPECS), "input 'input'", "shape", "[-1, 3]")


def test_negative_request_dim():
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="input", datatype="FP32", shape=[-1, 3])
    req.inputs.add(name="mask", datatype="BOOL", shape=[1, 3])
    assert_invalid(lambda: decode_inputs(req, SPECS), "input 'input'", "negative")


@pytest.mark.parametrize("shape", [(0, 2**62), (2**40, 0, 2**40), (0, 2**63 - 1)])
def test_empty_tensor_with_absurd_dims_is_refused(shape):
    # 0 elements need 0 bytes, but numpy cannot build such a shape: found by tests/fuzz.
    spec = TensorSpec("x", "FP32", (-1,) * len(shape))
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP32", shape=shape)
    req.raw_input_contents.append(b"")
    assert_invalid(lambda: decode_inputs(req, [spec]), "input 'x'", "more elements")
    del req.raw_input_contents[:]
    assert_invalid(lambda: decode_inputs(req, [spec]), "input 'x'", "more elements")


def test_raw_and_typed_in_one_request():
    req = raw_request(good_arrays(1))
    req.inputs[1].contents.bool_contents.extend([True] * 3)
    assert_invalid(lambda: decode_inputs(req, SPECS), "'mask'", "typed contents", "raw_input_contents")


def test_raw_count_not_matching_inputs():
    req = raw_request(good_arrays())
    del req.raw_input_contents[1]
    assert_invalid(lambda: decode_inputs(req, SPECS), "1 raw_input_contents", "2 inputs")


def test_raw_byte_size_mismatch_says_expected_and_got():
    req = raw_request(good_arrays())
    req.raw_input_contents[0] = req.raw_input_contents[0][:-4]
    assert_invalid(lambda: decode_inputs(req, SPECS), "input 'input'", "20 bytes", "24 bytes")


def test_raw_bool_bytes_other_than_zero_and_one():
    req = raw_request(good_arrays(1))
    req.raw_input_contents[1] = b"\x00\x01\x02"
    assert_invalid(lambda: decode_inputs(req, SPECS), "input 'mask'", "0 and 1")


def test_typed_element_count_mismatch():
    req = typed_request("x", "INT64", np.arange(5, dtype=np.int64))
    req.inputs[0].shape[:] = [6]
    assert_invalid(
        lambda: decode_inputs(req, [TensorSpec("x", "INT64", (-1,))]), "input 'x'", "5 elements", "needs 6"
    )


def test_typed_no_data_at_all():
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="INT32", shape=[2])
    assert_invalid(lambda: decode_inputs(req, [TensorSpec("x", "INT32", (2,))]), "input 'x'", "0 elements")


def test_typed_wrong_field():
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="INT64", shape=[2]).contents.int_contents.extend([1, 2])
    assert_invalid(
        lambda: decode_inputs(req, [TensorSpec("x", "INT64", (2,))]),
        "input 'x'",
        "contents.int64_contents",
        "contents.int_contents",
    )


@pytest.mark.parametrize(
    "datatype,value", [("INT8", 128), ("INT8", -129), ("INT16", 40000), ("UINT8", 256), ("UINT16", 70000)]
)
def test_typed_out_of_range(datatype, value):
    req = pb.ModelInferRequest(model_name="m")
    inp = req.inputs.add(name="x", datatype=datatype, shape=[2])
    getattr(inp.contents, TYPED_FIELD[datatype]).extend([0, value])
    assert_invalid(
        lambda: decode_inputs(req, [TensorSpec("x", datatype, (2,))]), "input 'x'", str(value), "out of range"
    )


def test_checks_run_in_the_documented_order():
    # Unknown name wins over a wrong datatype on another input.
    req = raw_request(good_arrays())
    req.inputs[0].datatype = "INT32"
    req.inputs[1].name = "nope"
    assert_invalid(lambda: decode_inputs(req, SPECS), "'nope'")
    # A wrong datatype wins over a bad raw size.
    req = raw_request(good_arrays())
    req.inputs[0].datatype = "INT64"
    req.raw_input_contents[0] = b""
    assert_invalid(lambda: decode_inputs(req, SPECS), "expected datatype FP32, got INT64")


# ----------------------------------------------------------------------------- requested outputs

OUT_SPECS = [
    TensorSpec("probs", "FP32", (-1, 4), labels=("cat", "dog")),
    TensorSpec("boxes", "FP32", (-1, 4)),
    TensorSpec("names", "BYTES", (-1,)),
]


def test_no_requested_outputs_means_all_in_model_order():
    assert requested_outputs(pb.ModelInferRequest(), OUT_SPECS) == [(s, None) for s in OUT_SPECS]


def test_requested_outputs_filter_and_keep_request_order():
    req = pb.ModelInferRequest()
    req.outputs.add(name="names")
    req.outputs.add(name="probs")
    assert requested_outputs(req, OUT_SPECS) == [(OUT_SPECS[2], None), (OUT_SPECS[0], None)]


def test_unknown_requested_output_lists_valid_names():
    req = pb.ModelInferRequest()
    req.outputs.add(name="logits")
    assert_invalid(lambda: requested_outputs(req, OUT_SPECS), "'logits'", "'probs'", "'boxes'", "'names'")


def test_duplicate_requested_output():
    req = pb.ModelInferRequest()
    req.outputs.add(name="probs")
    req.outputs.add(name="probs")
    assert_invalid(lambda: requested_outputs(req, OUT_SPECS), "'probs'", "more than once")


def test_classification_parameter_int64_and_uint64():
    req = pb.ModelInferRequest()
    req.outputs.add(name="probs").parameters["classification"].int64_param = 3
    req.outputs.add(name="boxes").parameters["classification"].uint64_param = 2
    assert requested_outputs(req, OUT_SPECS) == [(OUT_SPECS[0], 3), (OUT_SPECS[1], 2)]


@pytest.mark.parametrize("k", [0, -2])
def test_classification_k_below_one(k):
    req = pb.ModelInferRequest()
    req.outputs.add(name="probs").parameters["classification"].int64_param = k
    assert_invalid(lambda: requested_outputs(req, OUT_SPECS), "output 'probs'", "at least 1")


def test_classification_parameter_of_wrong_type_or_on_bytes_output():
    req = pb.ModelInferRequest()
    req.outputs.add(name="probs").parameters["classification"].string_param = "3"
    assert_invalid(lambda: requested_outputs(req, OUT_SPECS), "output 'probs'", "integer")
    req = pb.ModelInferRequest()
    req.outputs.add(name="names").parameters["classification"].int64_param = 1
    assert_invalid(lambda: requested_outputs(req, OUT_SPECS), "output 'names'", "BYTES")


# ----------------------------------------------------------------------------- classification


def test_classify_unbatched_with_labels_and_ties():
    scores = np.array([0.1, 0.5, 0.25, 0.5, -1.0], dtype=np.float32)
    got = classify(scores, 3, ["a", "b", "c"], batched=False)
    assert got.shape == (3,)
    # Equal scores keep the lower index first; index 3 has no label.
    assert got.tolist() == [b"0.500000:1:b", b"0.500000:3", b"0.250000:2:c"]


def test_classify_batched_without_labels():
    scores = np.array([[1, 5, 10, 4], [9, 8, 7, 6]], dtype=np.float64)
    got = classify(scores, 2, [], batched=True)
    assert got.shape == (2, 2)
    assert got.tolist() == [[b"10.000000:2", b"5.000000:1"], [b"9.000000:0", b"8.000000:1"]]


def test_classify_clips_k_and_flattens_per_item():
    scores = np.array([[[0.2, 0.8]], [[0.9, 0.1]]], dtype=np.float32)  # [batch, 1, classes]
    got = classify(scores, 10, ["no", "yes"], batched=True)
    assert got.shape == (2, 2)
    assert got[0].tolist() == [b"0.800000:1:yes", b"0.200000:0:no"]
    assert got[1, 0] == b"0.900000:0:no"


def test_classify_integer_scores_print_like_integers():
    # Triton formats with std::to_string, so integer outputs carry no decimals.
    got = classify(np.array([3, 250, 7], dtype=np.uint8), 2, [], batched=False)
    assert got.tolist() == [b"250:1", b"7:2"]
    got = classify(np.array([-3, -1], dtype=np.int64), 1, ["x", "y"], batched=False)
    assert got.tolist() == [b"-1:1:y"]


def test_classify_many_classes_matches_a_full_sort_with_ties_and_nan():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 6, size=(3, 200)).astype(np.float32)  # many ties at the cut-off
    scores[1, 17] = np.nan  # NaN ranks below every number
    got = classify(scores, 5, [], batched=True)
    for row, strings in zip(scores, got, strict=True):
        ranked = sorted(range(200), key=lambda i: (-(-np.inf if np.isnan(row[i]) else row[i]), i))[:5]
        assert [int(s.split(b":")[1]) for s in strings] == ranked


def test_classify_unbatched_output_in_response():
    spec = TensorSpec("probs", "FP64", (3,), labels=("a", "b", "c"))
    resp = pb.ModelInferResponse()
    encode_response(resp, [(spec, 2)], {"probs": np.array([0.2, 0.3, 0.5])}, batched=False)
    assert (resp.outputs[0].datatype, tuple(resp.outputs[0].shape)) == ("BYTES", (2,))
    assert deserialize_bytes_tensor(resp.raw_output_contents[0], 2).tolist() == [
        b"0.500000:2:c",
        b"0.300000:1:b",
    ]


def test_classify_fp16_and_rejects_bool():
    got = classify(np.array([0.5, 0.25], dtype=np.float16), 1, [], batched=False)
    assert got.tolist() == [b"0.500000:0"]
    assert_invalid(lambda: classify(np.array([True, False]), 1, [], batched=False), "numeric")


# ----------------------------------------------------------------------------- encode_response


def test_encode_response_order_datatypes_and_raw_only():
    probs = np.array([[0.1, 0.7, 0.2, 0.0], [0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    boxes = np.arange(8, dtype=np.float32).reshape(2, 4)
    names = np.array(["x", "\u00e9"], dtype=object)
    outputs = [(OUT_SPECS[2], None), (OUT_SPECS[0], 2), (OUT_SPECS[1], None)]
    resp = pb.ModelInferResponse()
    encode_response(resp, outputs, {"probs": probs, "boxes": boxes, "names": names}, batched=True)
    assert [o.name for o in resp.outputs] == ["names", "probs", "boxes"]
    assert [o.datatype for o in resp.outputs] == ["BYTES", "BYTES", "FP32"]
    assert [tuple(o.shape) for o in resp.outputs] == [(2,), (2, 2), (2, 4)]
    assert len(resp.raw_output_contents) == 3
    assert all(not o.contents.ListFields() for o in resp.outputs)
    assert deserialize_bytes_tensor(resp.raw_output_contents[0], 2).tolist() == [b"x", "\u00e9".encode()]
    cls = deserialize_bytes_tensor(resp.raw_output_contents[1], 4).reshape(2, 2)
    assert cls.tolist() == [[b"0.700000:1:dog", b"0.200000:2"], [b"0.400000:0:cat", b"0.300000:1:dog"]]
    assert np.frombuffer(resp.raw_output_contents[2], dtype="<f4").tolist() == boxes.ravel().tolist()


def test_encode_response_non_contiguous_and_mismatched_dtype():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base[:, ::2].T  # shape (3, 4), neither C- nor F-contiguous
    assert not view.flags.c_contiguous
    spec = TensorSpec("v", "FP32", (3, 4))
    resp = pb.ModelInferResponse()
    encode_response(resp, [(spec, None)], {"v": view}, batched=False)
    assert np.frombuffer(resp.raw_output_contents[0], dtype="<f4").reshape(3, 4).tolist() == view.tolist()
    # An engine handing back float64 for an FP32 output still yields FP32 bytes.
    resp = pb.ModelInferResponse()
    encode_response(resp, [(spec, None)], {"v": view.astype(np.float64)}, batched=False)
    assert len(resp.raw_output_contents[0]) == 12 * 4


def test_encode_response_missing_array_is_internal():
    with pytest.raises(Internal, match="'probs'"):
        encode_response(pb.ModelInferResponse(), [(OUT_SPECS[0], None)], {}, batched=True)


def test_full_request_to_response_path():
    specs_in = [TensorSpec("input", "FP32", (-1, 3))]
    req = raw_request({"input": np.ones((1, 3), dtype=np.float32)})
    req.outputs.add(name="probs").parameters["classification"].int64_param = 1
    feeds = decode_inputs(req, specs_in)
    scores = feeds["input"] * np.array([0.1, 0.9, 0.3], dtype=np.float32)
    spec = TensorSpec("probs", "FP32", (-1, 3), labels=("a", "b", "c"))
    resp = pb.ModelInferResponse()
    encode_response(resp, requested_outputs(req, [spec]), {"probs": scores}, batched=True)
    assert tuple(resp.outputs[0].shape) == (1, 1)
    assert deserialize_bytes_tensor(resp.raw_output_contents[0], 1).tolist() == [b"0.900000:1:b"]


# ----------------------------------------------------------------------------- message size
