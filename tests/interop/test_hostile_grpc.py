"""Protocol abuse against a daemon in its own process (issue 10, rows 4, 5, 6, 12, 13, 14):
unparsable messages, bad model names, stream and memory limits, overload and
restricted protocols. Each refusal has its status and message checked, and the
known-good request right after it must be answered correctly.
"""

from __future__ import annotations

import queue
import random
import re
import shutil
import subprocess
import sys
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests import onnx_models
from tests.interop.conftest import DIGITS, ROOT, start_server
from tests.waiting import wait_until

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SERVICE = "/inference.GRPCInferenceService/"
MAX_STREAMS = 4
BIG = 64 << 20


@pytest.fixture(scope="module")
def hostile_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_repo")
    shutil.copytree(DIGITS, root / "digits", ignore=shutil.ignore_patterns("data", "README.md"))
    # One request at a time, one waiting: a second waiting request is refused.
    onnx_models.slow(root / "slow" / "1" / "model.onnx", loops=64, size=256)
    (root / "slow" / "config.toml").write_text(
        "max_batch = 0\n[dynamic_batching]\nmax_queue_size = 1\n[onnxruntime]\nintra_op_threads = 1\n")
    return root


@pytest.fixture(scope="module")
def server(hostile_repo, tmp_path_factory):
    s = start_server(repository=hostile_repo, state_dir=tmp_path_factory.mktemp("state"),
                     args=("--grpc-max-concurrent-streams", str(MAX_STREAMS), "--max-inflight-request-mb", "256"))
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.url, options=[("grpc.max_send_message_length", BIG),
                                                    ("grpc.max_receive_message_length", BIG)]) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GRPCInferenceServiceStub(channel)


def _raw_unary(channel, method: str):
    return channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)


def _digits_batch(n: int = 2):
    data = np.load(DIGITS / "data" / "heldout.npz")
    return (data["x"][:n].astype(np.float32) / 16.0)[:, None, :, :], [int(v) for v in data["y"][:n]]


def _digits_request(request_id: str = "") -> pb.ModelInferRequest:
    x, _ = _digits_batch(2)
    request = pb.ModelInferRequest(model_name="digits", id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


def _assert_digits(response: pb.ModelInferResponse) -> None:
    _, labels = _digits_batch(2)
    logits = grpcclient.InferResult(response).as_numpy("logits")
    assert list(logits.argmax(1)) == labels


def assert_still_serving(stub) -> None:
    _assert_digits(stub.ModelInfer(_digits_request(), timeout=30))


def _metric(server, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{([^}]*)\} (\S+)$", line)
        if m and m.group(1) == name and ",".join(sorted(m.group(2).split(","))) == want:
            return float(m.group(3))
    return 0.0


def _rss(server, field: str = "VmRSS") -> int:
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no {field} in /proc/{server.proc.pid}/status")


def _unparsable_payloads() -> list[bytes]:
    """Random bytes, bit flips and truncations of a valid request: every one fails to parse."""
    rng = random.Random(10)
    good = _digits_request("x").SerializeToString()
    candidates = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (1, 7, 64, 300, 4096)]
    candidates += [good[:n] for n in (1, 5, 17, len(good) - 3)]
    for _ in range(400):
        flipped = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(flipped))
            flipped[i] ^= 1 << rng.randrange(8)
        candidates.append(bytes(flipped))
    # Invalid UTF-8 in the model name: a string field that protobuf refuses.
    candidates.append(pb.ModelInferRequest(model_name="digitz").SerializeToString().replace(b"digitz", b"dig\xffts"))
    bad = []
    for c in candidates:
        try:
            pb.ModelInferRequest.FromString(c)
        except Exception:
            bad.append(c)
    assert len(bad) > 20
    return bad


# -- row 5: garbage on ModelInfer ------------------------------------------------------------------

def test_unparsable_model_infer_is_invalid_argument_counted_and_logged_once(server, channel, stub):
    payloads = _unparsable_payloads()
    # Counted under the model its first bytes name when that one is loaded, else under "".
    def invalid() -> float:
        return (_metric(server, "tegrad_requests_total", model="", version="", outcome="invalid")
                + _metric(server, "tegrad_requests_total", model="digits", version="1", outcome="invalid"))

    invalid_before = invalid()
    lines_before = len(server.lines)
    infer = _raw_unary(channel, "ModelInfer")
    for payload in payloads:
        with pytest.raises(grpc.RpcError) as err:
            infer(payload, timeout=30)
        assert err.value.code() == INVALID, err.value
        assert err.value.details().startswith("cannot parse ModelInferRequest: "), err.value.details()
        assert_still_serving(stub)
    assert invalid() - invalid_before == len(payloads)
    new_log = "".join(server.lines[lines_before:])
    assert new_log.count("refused a request from") <= 1, new_log[-3000:]
    assert "Traceback" not in new_log and " ERROR " not in new_log, new_log[-3000:]


def test_every_other_rpc_refuses_unparsable_bytes_with_invalid_argument(channel, stub):
    for method in ("ModelMetadata", "ModelConfig", "ModelReady", "ModelStatistics", "RepositoryModelLoad"):
        with pytest.raises(grpc.RpcError) as err:
            _raw_unary(channel, method)(b"\x0a\xff\xff\xff\xff\x0f", timeout=30)
        assert err.value.code() == INVALID, (method, err.value)
        assert "cannot parse " in err.value.details() and "Request" in err.value.details()
    assert_still_serving(stub)


# -- row 4: garbage on ModelStreamInfer ---------------------------------------------------------------

def test_unparsable_stream_message_is_answered_and_the_stream_goes_on(channel):
    outgoing: queue.Queue = queue.Queue()

    def requests():
        while (item := outgoing.get()) is not None:
            yield item

    call = channel.stream_stream(SERVICE + "ModelStreamInfer", request_serializer=None,
                                 response_deserializer=pb.ModelStreamInferResponse.FromString)(requests(), timeout=60)
    try:
        for payload in _unparsable_payloads()[:5]:
            outgoing.put(payload)
            answer = next(call)
            assert answer.error_message.startswith("cannot parse ModelInferRequest: "), answer
            outgoing.put(_digits_request("after-garbage").SerializeToString())
            answer = next(call)
            assert answer.error_message == "", answer.error_message
            assert answer.infer_response.id == "after-garbage"
            _assert_digits(answer.infer_response)
    finally:
        outgoing.put(None)
    assert list(call) == []
    assert call.code() == grpc.StatusCode.OK


# -- row 6: model names -----------------------------------------------------------------------------

BAD_NAMES = ["d" * 256, "ü" * 200, "../digits", "..", "digits/../digits", "a\\b", "bad\x00name", "bell\x07", "line\nfeed"]


def _name_calls(stub, name: str):
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(np.zeros((1, 1, 8, 8), np.float32).tobytes())
    return {
        "ModelInfer": lambda: stub.ModelInfer(request, timeout=30),
        "ModelMetadata": lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=30),
        "ModelConfig": lambda: stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=30),
        "ModelStatistics": lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name=name), timeout=30),
        "ModelReady": lambda: stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=30),
        "RepositoryModelLoad": lambda: stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=30),
        "RepositoryModelUnload": lambda: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=30),
    }


@pytest.mark.parametrize("name", BAD_NAMES, ids=lambda n: repr(n[:12]))
def test_bad_model_names_are_refused_before_any_file_access(server, stub, channel, name):
    for rpc, call in _name_calls(stub, name).items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() in (INVALID, grpc.StatusCode.NOT_FOUND), (rpc, err.value)
        assert "model name" in err.value.details(), (rpc, err.value.details())
        assert str(server.repository) not in err.value.details(), (rpc, err.value.details())
    stream = channel.stream_stream(SERVICE + "ModelStreamInfer", request_serializer=None,
                                   response_deserializer=pb.ModelStreamInferResponse.FromString)
    request = pb.ModelInferRequest(model_name=name, id="bad-name")
    answers = list(stream(iter([request.SerializeToString(), _digits_request("good").SerializeToString()]), timeout=60))
    by_id = {a.infer_response.id: a for a in answers}
    assert "model name" in by_id["bad-name"].error_message
    _assert_digits(by_id["good"].infer_response)
    assert_still_serving(stub)


# -- row 12: streams per connection, bytes in flight, memory after a burst ------------------------------

def test_streams_per_connection_are_limited(server, channel, stub):
    inference = channel.stream_stream(SERVICE + "ModelStreamInfer", request_serializer=None,
                                      response_deserializer=pb.ModelStreamInferResponse.FromString)
    feeds, calls = [], []
    try:
        for i in range(MAX_STREAMS):
            outgoing: queue.Queue = queue.Queue()
            outgoing.put(_digits_request(f"s{i}").SerializeToString())
            feeds.append(outgoing)
            calls.append(inference(iter(outgoing.get, None), timeout=120))
            assert next(calls[-1]).infer_response.id == f"s{i}"  # open at the server
        # Every stream this connection may have is taken: a new call waits in the client.
        with pytest.raises(grpc.RpcError) as err:
            stub.ServerLive(pb.ServerLiveRequest(), timeout=1.0)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Other connections are not affected.
        with grpc.insecure_channel(server.url) as other:
            assert_still_serving(pb_grpc.GRPCInferenceServiceStub(other))
        feeds.pop().put(None)
        assert list(calls.pop()) == []
        assert_still_serving(stub)
    finally:
        for f in feeds:
            f.put(None)
        for c in calls:
            list(c)


def test_burst_of_large_requests_leaves_memory_at_baseline(server, stub):
    # 60 MiB of digits: parsed, decoded, then refused for its batch size.
    x = np.zeros((245760, 1, 8, 8), np.float32)
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    payload = request.SerializeToString()
    del x, request

    def one(errors: list):
        # A connection each: the point is 16 requests at once, not the per-connection stream limit.
        options = [("grpc.max_send_message_length", BIG), ("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(server.url, options=options) as own:
            try:
                _raw_unary(own, "ModelInfer")(payload, timeout=120)
            except grpc.RpcError as exc:
                errors.append(exc)

    warm: list = []
    one(warm)  # what the first large request leaves for good (code paths, pools) is baseline
    assert warm and warm[0].code() == INVALID and "batch size" in warm[0].details()
    assert_still_serving(stub)
    baseline = _rss(server)
    errors: list = []
    threads = [threading.Thread(target=one, args=(errors,)) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(errors) == 16 and all(e.code() == INVALID for e in errors), sorted({(str(e.code()), e.details()) for e in errors})
    peak = _rss(server, "VmHWM")
    assert_still_serving(stub)
    bound = baseline + (64 << 20)
    try:
        wait_until(lambda: _rss(server) <= bound, 30, "server RSS back to baseline")
    finally:
        print(f"burst of 16 x 60 MiB: baseline {baseline >> 20} MiB, peak {peak >> 20} MiB, "
              f"after {_rss(server) >> 20} MiB")
    # Bytes in flight are bounded (256 MiB here), so the peak stays well under 16 copies of each request.
    assert peak - baseline < 16 * (60 << 20) * 2


# -- row 13: admission before decoding ------------------------------------------------------------------

def _slow_request(n: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow", id=f"n{n}")
    request.inputs.add(name="x", datatype="FP32", shape=[n, 256])
    request.raw_input_contents.append(np.ones((n, 256), np.float32).tobytes())
    return request


def test_full_queue_refuses_from_the_first_bytes(server, stub):
    labels = {"model": "slow", "version": "1"}
    early_before = _metric(server, "tegrad_admission_rejections_total", reason="queue_full", **labels)
    rejected_before = _metric(server, "tegrad_requests_total", outcome="rejected", **labels)
    blockers = [stub.ModelInfer.future(_slow_request(1024), timeout=300) for _ in range(2)]
    # One runs, one waits: the queue (max_queue_size = 1) is full.
    wait_until(lambda: _metric(server, "tegrad_queue_depth", **labels) == 1, 60, "the second slow request to queue")
    refused = 0
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_slow_request(4), timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert "queue is full" in err.value.details()
        refused += 1
    assert _metric(server, "tegrad_admission_rejections_total", reason="queue_full", **labels) - early_before == refused
    assert _metric(server, "tegrad_requests_total", outcome="rejected", **labels) - rejected_before == refused
    for b in blockers:
        assert list(b.result().outputs[0].shape) == [1024, 256]
    response = stub.ModelInfer(_slow_request(2), timeout=60)
    assert list(response.outputs[0].shape) == [2, 256]
    assert_still_serving(stub)


# -- row 14: restricted protocols --------------------------------------------------------------------------

HEADER = "triton-grpc-protocol-admin-key"


@pytest.fixture(scope="module")
def restricted_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("restricted_repo")
    shutil.copytree(DIGITS, root / "digits", ignore=shutil.ignore_patterns("data", "README.md"))
    s = start_server(repository=root, state_dir=tmp_path_factory.mktemp("state"),
                     args=("--model-control", "explicit", "--load-model", "digits",
                           "--grpc-restricted-protocol", "model-repository,statistics:admin-key=s3cret"))
    yield s
    assert s.stop() == 0, s.log()


def test_restricted_protocols_need_the_header(restricted_server):
    tc = grpcclient.InferenceServerClient(restricted_server.url)
    try:
        x, labels = _digits_batch(2)
        tc_input = grpcclient.InferInput("input", list(x.shape), "FP32")
        tc_input.set_data_from_numpy(x)
        calls = {
            "unload": lambda h: tc.unload_model("digits", headers=h),
            "load": lambda h: tc.load_model("digits", headers=h),
            "index": lambda h: tc.get_model_repository_index(headers=h),
            "statistics": lambda h: tc.get_inference_statistics("digits", headers=h),
        }
        for what, call in calls.items():
            for headers in (None, {HEADER: "wrong"}, {"admin-key": "s3cret"}):
                with pytest.raises(InferenceServerException) as err:
                    call(headers)
                assert err.value.status() == "StatusCode.UNAVAILABLE", (what, headers, err.value)
                assert err.value.message() == f"This protocol is restricted, expecting header '{HEADER}'", err.value
                # Inference is not restricted and the model is untouched.
                assert list(tc.infer("digits", [tc_input]).as_numpy("logits").argmax(1)) == labels
        ok = {HEADER: "s3cret"}
        tc.unload_model("digits", headers=ok)
        assert not tc.is_model_ready("digits")
        tc.load_model("digits", headers=ok)
        assert tc.is_model_ready("digits")
        assert any(m["name"] == "digits" for m in tc.get_model_repository_index(headers=ok, as_json=True)["models"])
        assert tc.get_inference_statistics("digits", headers=ok, as_json=True)["model_stats"]
        assert list(tc.infer("digits", [tc_input]).as_numpy("logits").argmax(1)) == labels
    finally:
        tc.close()


def test_unknown_restricted_protocol_is_refused_at_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "serve", "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
         "--state-dir", str(tmp_path), "--grpc-restricted-protocol", "repository:k=v"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "unknown protocol(s) repository" in result.stderr and "model-repository" in result.stderr
