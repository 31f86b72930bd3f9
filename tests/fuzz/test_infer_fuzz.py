"""Property: whatever a client sends, tegrad answers with a status that describes the client's
mistake (never UNKNOWN or INTERNAL, never silence), leaks no server path, and the known-good
request right after is answered correctly.

Run apart from the unit tests (tritonclient's protobuf package clashes with tegrad's):
``python -m pytest tests/fuzz``; ``TEGRAD_FUZZ_EXAMPLES=2000`` for a longer run.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.fuzz.conftest import budget
from tests.fuzz.requests import (
    corrupted_bytes,
    good_request,
    mutated_requests,
    names,
    valid_requests,
    versions,
)

SERVICE = "/inference.GRPCInferenceService/"
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# Far beyond what any of these tiny requests needs on a loaded 2-core machine; reaching it means
# the daemon never answered.
CLIENT_TIMEOUT_S = 30.0
# A stream that swallowed a message would wait forever: give up well before the test timeout.
STREAM_TIMEOUT_S = 15.0
# Stream cases that hang cost their whole timeout each; shrinking would repeat that many times.
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]


def _stub(channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)


def check_status(err: grpc.RpcError, elapsed: float, timeout: float, server, what: str) -> None:
    code, details = err.code(), err.details() or ""
    assert code not in FORBIDDEN, f"{what}: {code.name}: {details}"
    assert not (code == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed >= timeout - 0.5), (
        f"{what}: no answer within {timeout:.0f} s"
    )
    assert details.strip(), f"{what}: {code.name} without a message"
    root = str(server.repository)
    assert root not in details, f"{what}: the message shows the server's path: {details}"


def assert_known_good(channel, server) -> None:
    exited = server.proc.poll()
    assert exited is None, f"tegrad exited with {exited}:\n" + server.log()[-4000:]
    request, classes = good_request()
    response = _stub(channel).ModelInfer(request, timeout=CLIENT_TIMEOUT_S)
    assert response.model_name == "digits" and response.id == "known-good"
    logits = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 10)
    assert list(logits.argmax(1)) == classes


def infer_and_check(channel, server, request: bytes | pb.ModelInferRequest, what: str) -> None:
    call = channel.unary_unary(SERVICE + "ModelInfer")  # no serializers: the bytes go out as they are
    blob = request if isinstance(request, bytes) else request.SerializeToString()
    start = time.monotonic()
    try:
        call(blob, timeout=CLIENT_TIMEOUT_S)
    except grpc.RpcError as err:
        check_status(err, time.monotonic() - start, CLIENT_TIMEOUT_S, server, what)
    assert_known_good(channel, server)


# -- ModelInfer ------------------------------------------------------------------------------------


def _empty_but_absurd() -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="add_sub")
    for name in ("a", "b"):
        r.inputs.add(name=name, datatype="FP32", shape=[0, 2**62])
        r.raw_input_contents.append(b"")
    return r


@settings(max_examples=budget(150))
@given(request=mutated_requests())
@example(request=_empty_but_absurd())  # was INTERNAL "array is too big" (fixed in server/tensors.py)
def test_model_infer_mutated_requests(channel, fuzz_server, request):
    infer_and_check(channel, fuzz_server, request, f"ModelInfer({request})")


@settings(max_examples=budget(30))
@given(request=valid_requests())
def test_model_infer_valid_requests_are_served(channel, fuzz_server, request):
    """The seeds of every mutation are themselves good requests (else the fuzz proves little)."""
    response = _stub(channel).ModelInfer(request, timeout=CLIENT_TIMEOUT_S)
    assert response.model_name == request.model_name and response.id == request.id
    assert len(response.outputs) == len(response.raw_output_contents) >= 1


@settings(max_examples=budget(100))
@given(blob=corrupted_bytes())
@example(blob=b"\xff")  # not a protobuf message at all
@example(blob=b"\x0a\x05dig")  # model_name claims 5 bytes, 3 follow
def test_model_infer_raw_bytes(channel, fuzz_server, blob):
    infer_and_check(channel, fuzz_server, blob, f"ModelInfer(raw bytes {blob!r:.300})")


@settings(max_examples=budget(40))
@given(rpc=st.sampled_from(["ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"]),
       name=names, version=versions)
def test_model_name_rpcs(channel, fuzz_server, rpc, name, version):
    request = {"ModelReady": pb.ModelReadyRequest, "ModelMetadata": pb.ModelMetadataRequest,
               "ModelConfig": pb.ModelConfigRequest, "ModelStatistics": pb.ModelStatisticsRequest}[rpc]
    call = channel.unary_unary(SERVICE + rpc)
    start = time.monotonic()
    try:
        call(request(name=name, version=version).SerializeToString(), timeout=CLIENT_TIMEOUT_S)
    except grpc.RpcError as err:
        check_status(err, time.monotonic() - start, CLIENT_TIMEOUT_S, fuzz_server, f"{rpc}({name!r}, {version!r})")
    assert_known_good(channel, fuzz_server)


# -- ModelStreamInfer ------------------------------------------------------------------------------


def _stream(channel, server, blobs: list[bytes], what: str) -> list[pb.ModelStreamInferResponse]:
    call = channel.stream_stream(SERVICE + "ModelStreamInfer")
    start = time.monotonic()
    responses = []
    try:
        for raw in call(iter(blobs), timeout=STREAM_TIMEOUT_S):
            responses.append(pb.ModelStreamInferResponse.FromString(raw))
    except grpc.RpcError as err:
        check_status(err, time.monotonic() - start, STREAM_TIMEOUT_S, server, what)
    return responses


@settings(max_examples=budget(40), phases=NO_SHRINK)
@given(requests=st.lists(st.tuples(st.booleans(), mutated_requests()), min_size=1, max_size=4))
def test_model_stream_infer_mutated_requests(channel, fuzz_server, requests):
    """Bad requests in a stream get their error_message; the good ones beside them get answers."""
    good, classes = good_request()
    sent = []
    for i, (keep_good, bad) in enumerate(requests):
        r = pb.ModelInferRequest()
        r.CopyFrom(good if keep_good else bad)
        r.id = f"good-{i}" if keep_good else f"bad-{i}"
        sent.append(r)
    what = "ModelStreamInfer(" + ", ".join(str(r) for r in sent) + ")"
    responses = _stream(channel, fuzz_server, [r.SerializeToString() for r in sent], what)
    assert len(responses) == len(sent), f"{what}: {len(responses)} responses to {len(sent)} requests"
    for response in responses:
        rid = response.infer_response.id
        assert rid in {r.id for r in sent}, f"{what}: a response with unknown id {rid!r}"
        if rid.startswith("good"):
            assert not response.error_message, f"{what}: {rid}: {response.error_message}"
            logits = np.frombuffer(response.infer_response.raw_output_contents[0], np.float32).reshape(2, 10)
            assert list(logits.argmax(1)) == classes
        elif response.error_message:
            root = str(fuzz_server.repository)
            assert root not in response.error_message, response.error_message
    assert_known_good(channel, fuzz_server)


@settings(max_examples=budget(20), phases=NO_SHRINK)
@given(blobs=st.lists(st.one_of(corrupted_bytes(), valid_requests().map(lambda r: r.SerializeToString())),
                      min_size=1, max_size=3))
@example(blobs=[b"\xff"])
def test_model_stream_infer_raw_bytes(channel, fuzz_server, blobs):
    """An unparsable message gets an answer (error_message, or the stream ends with a status)."""
    what = f"ModelStreamInfer(raw {blobs!r:.400})"
    _stream(channel, fuzz_server, blobs, what)
    assert_known_good(channel, fuzz_server)
