"""Every malformed request gets the right gRPC status and a message that names the
problem, and the request that follows it is served normally.

Cases tritonclient can express go through it; the ones it refuses to send are
hand-built with tritonclient's own ``service_pb2`` messages.
"""

from __future__ import annotations

import queue
import shutil
import struct

import cv2
import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.interop.conftest import DIGITS, start_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def bad_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_repo")
    shutil.copytree(DIGITS, root / "digits", ignore=shutil.ignore_patterns("data", "README.md"))
    onnx_models.add_sub(root / "add_sub" / "1" / "model.onnx")
    (root / "add_sub" / "config.toml").write_text("max_batch = 4\n")
    onnx_models.identity(root / "id_bytes" / "1" / "model.onnx", "BYTES")
    (root / "id_bytes" / "config.toml").write_text("max_batch = 8\n")
    server = start_server(repository=root, state_dir=tmp_path_factory.mktemp("state"))
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def stub(bad_server):
    with grpc.insecure_channel(bad_server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def tc(bad_server):
    c = grpcclient.InferenceServerClient(bad_server.url)
    yield c
    c.close()


def _digit_batch(n: int = 2) -> np.ndarray:
    data = np.load(DIGITS / "data" / "heldout.npz")
    return (data["x"][:n].astype(np.float32) / 16.0)[:, None, :, :]


def assert_still_serving(stub) -> None:
    """The request after a bad one must be answered as if nothing had happened."""
    x = _digit_batch(2)
    response = stub.ModelInfer(_digits(x), timeout=30)
    logits = grpcclient.InferResult(response).as_numpy("logits")
    assert logits.shape == (2, 10)
    assert list(logits.argmax(1)) == [int(v) for v in np.load(DIGITS / "data" / "heldout.npz")["y"][:2]]


def _digits(x: np.ndarray | None = None, *, shape=None, datatype="FP32") -> pb.ModelInferRequest:
    x = _digit_batch(1) if x is None else x
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype=datatype, shape=list(shape or x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def _add_sub(a_shape=(2, 3), b_shape=(2, 3)) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub")
    for name, shape in (("a", a_shape), ("b", b_shape)):
        request.inputs.add(name=name, datatype="FP32", shape=list(shape))
        request.raw_input_contents.append(np.ones(shape, np.float32).tobytes())
    return request


def _bytes_request(raw: bytes, shape=(1, 4)) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="id_bytes")
    request.inputs.add(name="x", datatype="BYTES", shape=list(shape))
    request.raw_input_contents.append(raw)
    return request


def _frame(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


# -- hand-built requests --------------------------------------------------------------------------------


def _unknown_model():
    r = _digits()
    r.model_name = "no_such_model"
    return r


def _unknown_version():
    r = _digits()
    r.model_version = "7"
    return r


def _version_not_a_number():
    r = _digits()
    r.model_version = "latest"
    return r


def _unknown_input():
    r = _digits()
    r.inputs[0].name = "pixels"
    return r


def _images(*files: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="image", datatype="BYTES", shape=[len(files)])
    request.raw_input_contents.append(_frame(*files))
    return request


def _digit_png(i: int = 0) -> bytes:
    x = np.load(DIGITS / "data" / "heldout.npz")["x"][i]
    ok, png = cv2.imencode(".png", (x.astype(np.int32) * 255 // 16).astype(np.uint8))
    assert ok
    return png.tobytes()


def _image_and_tensor():
    r = _images(_digit_png())
    r.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    r.raw_input_contents.append(_digit_batch(1).tobytes())
    return r


def _neither_image_nor_tensor():
    return pb.ModelInferRequest(model_name="digits")


def _corrupt_image():
    return _images(_digit_png(0), b"\x89PNG\r\n\x1a\n not really a png", _digit_png(1))


def _truncated_jpeg():
    ok, jpg = cv2.imencode(".jpg", np.full((32, 32, 3), 200, np.uint8))
    return _images(_digit_png(0), jpg.tobytes()[:-40])


def _gif_image():
    return _images(b"GIF89a" + b"\x00" * 32)


def _missing_input():
    r = _add_sub()
    del r.inputs[1]
    del r.raw_input_contents[1]
    return r


def _duplicate_input():
    r = _digits()
    r.inputs.add().CopyFrom(r.inputs[0])
    r.raw_input_contents.append(r.raw_input_contents[0])
    return r


def _wrong_datatype():
    return _digits(np.zeros((1, 1, 8, 8), np.float64), datatype="FP64")


def _wrong_rank():
    return _digits(shape=[1, 64])


def _fixed_dim_mismatch():
    return _digits(np.zeros((1, 1, 8, 9), np.float32))


def _negative_dim():
    return _digits(shape=[-1, 1, 8, 8])


def _batch_too_large():
    return _digits(np.zeros((65, 1, 8, 8), np.float32))


def _batch_zero():
    return _digits(np.zeros((0, 1, 8, 8), np.float32))


def _add_sub_batch_too_large():
    return _add_sub((5, 3), (5, 3))


def _batch_disagrees():
    return _add_sub((2, 3), (3, 3))


def _raw_size_mismatch():
    r = _digits()
    r.raw_input_contents[0] = r.raw_input_contents[0][:-1]
    return r


def _raw_entries_fewer_than_inputs():
    r = _add_sub()
    del r.raw_input_contents[1]
    return r


def _typed_and_raw():
    r = _digits()
    r.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    return r


def _typed_wrong_count():
    r = pb.ModelInferRequest(model_name="digits")
    r.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8]).contents.fp32_contents.extend([0.5] * 63)
    return r


def _typed_wrong_field():
    r = pb.ModelInferRequest(model_name="digits")
    r.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8]).contents.int_contents.extend([1] * 64)
    return r


def _unknown_output():
    r = _digits()
    r.outputs.add(name="probs")
    return r


def _duplicate_output():
    r = _digits()
    r.outputs.add(name="logits")
    r.outputs.add(name="logits")
    return r


def _classification_string():
    r = _digits()
    r.outputs.add(name="logits").parameters["classification"].string_param = "3"
    return r


def _classification_zero():
    r = _digits()
    r.outputs.add(name="logits").parameters["classification"].int64_param = 0
    return r


def _timeout_negative():
    r = _digits()
    r.parameters["timeout"].int64_param = -5
    return r


def _timeout_not_integer():
    r = _digits()
    r.parameters["timeout"].string_param = "1s"
    return r


def _bytes_length_overruns():
    return _bytes_request(_frame(b"a", b"b", b"c") + struct.pack("<I", 100) + b"xy")


def _bytes_truncated_length():
    return _bytes_request(_frame(b"a", b"b", b"c") + b"\x01\x00")


def _bytes_trailing():
    return _bytes_request(_frame(b"a", b"b", b"c", b"d") + b"\x01")


def _bytes_extra_element():
    return _bytes_request(_frame(b"a", b"b", b"c", b"d", b"e"))


def _bytes_too_few_elements():
    return _bytes_request(_frame(b"", b"", b"", b""), shape=(2, 4))


BAD_REQUESTS = [
    # (builder, expected code, words the message must contain)
    (_unknown_model, NOT_FOUND, ["no_such_model"]),
    (_unknown_version, NOT_FOUND, ["digits", "version 7"]),
    (_version_not_a_number, NOT_FOUND, ["'latest'"]),
    (_unknown_input, INVALID, ["'pixels'", "'input'"]),
    (_image_and_tensor, INVALID, ["either 'image'", "'input'", "not both"]),
    (_neither_image_nor_tensor, INVALID, ["either 'image'", "neither was sent"]),
    (_corrupt_image, INVALID, ["batch index 1 of 3", "cannot decode"]),
    (_truncated_jpeg, INVALID, ["batch index 1 of 2", "truncated"]),
    (_gif_image, INVALID, ["batch index 0 of 1", "GIF"]),
    (_missing_input, INVALID, ["lacks input 'b'"]),
    (_duplicate_input, INVALID, ["'input'", "more than once"]),
    (_wrong_datatype, INVALID, ["'input'", "FP32", "FP64"]),
    (_wrong_rank, INVALID, ["'input'", "[1, 64]", "[-1, 1, 8, 8]"]),
    (_fixed_dim_mismatch, INVALID, ["'input'", "[1, 1, 8, 9]"]),
    (_negative_dim, INVALID, ["'input'", "negative"]),
    (_batch_too_large, INVALID, ["batch size 65", "max_batch"]),
    (_batch_zero, INVALID, ["batch size 0"]),
    (_add_sub_batch_too_large, INVALID, ["batch size 5", "1..4"]),
    (_batch_disagrees, INVALID, ["disagree", "'a': 2", "'b': 3"]),
    (_raw_size_mismatch, INVALID, ["'input'", "255 bytes", "256 bytes"]),
    (_raw_entries_fewer_than_inputs, INVALID, ["1 raw_input_contents", "2 inputs"]),
    (_typed_and_raw, INVALID, ["'input'", "raw_input_contents", "typed contents"]),
    (_typed_wrong_count, INVALID, ["'input'", "63 elements", "64"]),
    (_typed_wrong_field, INVALID, ["fp32_contents", "int_contents"]),
    (_unknown_output, INVALID, ["'probs'", "'logits'"]),
    (_duplicate_output, INVALID, ["'logits'", "more than once"]),
    (_classification_string, INVALID, ["classification", "integer"]),
    (_classification_zero, INVALID, ["classification", "at least 1"]),
    (_timeout_negative, INVALID, ["timeout", "negative"]),
    (_timeout_not_integer, INVALID, ["timeout", "microseconds"]),
    (_bytes_length_overruns, INVALID, ["'x'", "claims 100 bytes"]),
    (_bytes_truncated_length, INVALID, ["'x'", "truncated", "element 3"]),
    (_bytes_trailing, INVALID, ["'x'", "trailing"]),
    (_bytes_extra_element, INVALID, ["'x'", "trailing"]),
    (_bytes_too_few_elements, INVALID, ["'x'", "too few", "8 elements"]),
]


@pytest.mark.parametrize(
    "build, code, words", BAD_REQUESTS,
    ids=[build.__name__.lstrip("_") for build, _, _ in BAD_REQUESTS],
)
def test_bad_request_is_refused_and_the_next_one_served(stub, build, code, words):
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(build(), timeout=30)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details()
    assert_still_serving(stub)


def test_good_bytes_request_after_framing_errors(stub):
    response = stub.ModelInfer(_bytes_request(_frame(b"", "é".encode(), b"x" * 300, b"\x00")), timeout=30)
    out = grpcclient.InferResult(response).as_numpy("y")
    assert out.tolist() == [[b"", "é".encode(), b"x" * 300, b"\x00"]]


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (4, 300)])
def test_variable_dims_accept_any_size(tc, shape):
    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    b = np.full(shape, 2, np.float32)
    inputs = [grpcclient.InferInput("a", list(shape), "FP32"), grpcclient.InferInput("b", list(shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = tc.infer("add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("sum"), a + b)
    np.testing.assert_array_equal(result.as_numpy("diff"), a - b)


# -- through tritonclient -------------------------------------------------------------------------------


def _tc_input(x: np.ndarray, datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


def _expect_tc(call, status: str, *words: str) -> None:
    with pytest.raises(InferenceServerException) as err:
        call()
    assert err.value.status() == f"StatusCode.{status}", err.value
    for word in words:
        assert word in err.value.message()


def test_tritonclient_sees_codes_and_messages(tc, stub):
    x = _digit_batch(1)
    cases = [
        (lambda: tc.infer("nope", [_tc_input(x)]), "NOT_FOUND", "'nope'"),
        (lambda: tc.infer("digits", [_tc_input(x)], model_version="3"), "NOT_FOUND", "version 3"),
        (lambda: tc.infer("digits", [_tc_input(x.astype(np.float64), "FP64")]), "INVALID_ARGUMENT", "expected datatype FP32"),
        (lambda: tc.infer("digits", [_tc_input(np.zeros((65, 1, 8, 8), np.float32))]), "INVALID_ARGUMENT", "max_batch"),
        (lambda: tc.infer("digits", [_tc_input(x)], outputs=[grpcclient.InferRequestedOutput("probs")]),
         "INVALID_ARGUMENT", "'probs'"),
        (lambda: tc.infer("digits", [_tc_input(x)], timeout=-1), "INVALID_ARGUMENT", "timeout"),
        (lambda: tc.get_model_metadata("nope"), "NOT_FOUND", "'nope'"),
        (lambda: tc.get_model_config("digits", "9"), "NOT_FOUND", "version 9"),
        (lambda: tc.get_inference_statistics("nope"), "NOT_FOUND", "'nope'"),
    ]
    for call, status, word in cases:
        _expect_tc(call, status, word)
        assert tc.infer("digits", [_tc_input(x)]).as_numpy("logits").shape == (1, 10)
    assert not tc.is_model_ready("nope")
    assert tc.is_server_ready()


def test_bad_request_in_a_stream_does_not_end_it(tc):
    x = _digit_batch(1)
    responses: queue.Queue = queue.Queue()
    tc.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        tc.async_stream_infer("digits", [_tc_input(x)], outputs=[grpcclient.InferRequestedOutput("probs")], request_id="bad")
        _, error = responses.get(timeout=30)
        assert error is not None and "'probs'" in str(error)
        tc.async_stream_infer("digits", [_tc_input(x)], request_id="good")
        result, error = responses.get(timeout=30)
        assert error is None and result.get_response().id == "good"
    finally:
        tc.stop_stream()


@pytest.mark.parametrize("rpc", [
    "get_system_shared_memory_status", "get_cuda_shared_memory_status", "unregister_system_shared_memory",
    "unregister_cuda_shared_memory", "get_trace_settings", "get_log_settings",
])
def test_unsupported_rpcs_answer_unimplemented(tc, stub, rpc):
    _expect_tc(getattr(tc, rpc), "UNIMPLEMENTED", "does not support")
    assert_still_serving(stub)


def test_unsupported_registration_answers_unimplemented(tc, stub):
    _expect_tc(lambda: tc.register_system_shared_memory("region", "/tegrad_shm", 64), "UNIMPLEMENTED", "shared memory")
    _expect_tc(lambda: tc.update_log_settings({"log_verbose_level": 1}), "UNIMPLEMENTED", "log settings")
    _expect_tc(lambda: tc.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}), "UNIMPLEMENTED", "trace")
    assert_still_serving(stub)


def test_message_above_the_limit_is_resource_exhausted(server_factory):
    server = server_factory(args=("--max-message-bytes", "4096"))
    with grpc.insecure_channel(server.url) as channel:
        small_stub = pb_grpc.GRPCInferenceServiceStub(channel)
        big = _digits(np.zeros((32, 1, 8, 8), np.float32))  # 8 KiB of tensor data
        with pytest.raises(grpc.RpcError) as err:
            small_stub.ModelInfer(big, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4096" in err.value.details()
        assert_still_serving(small_stub)
