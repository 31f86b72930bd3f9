"""tegrad driven by tritonclient[grpc], as any Triton user would."""

from __future__ import annotations

import queue
import urllib.request
from functools import partial

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests import onnx_models
from tests.interop.conftest import DIGITS, start_server

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]
NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
         "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
         "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}


def heldout():
    data = np.load(DIGITS / "data" / "heldout.npz")
    return (data["x"].astype(np.float32) / 16.0)[:, None, :, :], data["y"]


@pytest.fixture(scope="module")
def types_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("types")
    for dt in DATATYPES:
        name = f"id_{dt.lower()}"
        onnx_models.identity(root / name / "1" / "model.onnx", dt)
        (root / name / "config.toml").write_text("max_batch = 8\n")
    onnx_models.add_sub(root / "add_sub" / "1" / "model.onnx")
    (root / "add_sub" / "config.toml").write_text("max_batch = 0\n")
    server = start_server(repository=root, state_dir=tmp_path_factory.mktemp("state"))
    yield server
    assert server.stop() == 0, server.log()


def _values(dt: str, shape) -> np.ndarray:
    rng = np.random.default_rng(1)
    if dt == "BYTES":
        return np.array([f"é{i}".encode() if i % 3 else b"" for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if dt == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if dt.startswith("FP"):
        return rng.standard_normal(shape).astype(NUMPY[dt])
    info = np.iinfo(NUMPY[dt])
    return rng.integers(info.min, info.max, shape, dtype=NUMPY[dt], endpoint=True)


# -- server and model metadata -----------------------------------------------------------------


def test_server_live_ready_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "tegrad"
    assert set(meta.extensions) == {"classification", "model_repository", "model_configuration", "statistics", "parameters"}


def test_model_metadata_and_config(client):
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("digits", "7")
    meta = client.get_model_metadata("digits")
    assert meta.versions == ["1"] and meta.platform == "onnxruntime_onnx"
    # Images or the preprocessed tensor: both optional in ModelConfig, exactly one per request.
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("image", "BYTES", [-1]),
                                                                          ("input", "FP32", [-1, 1, 8, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("logits", "FP32", [-1, 10])]
    cfg = client.get_model_config("digits").config
    assert cfg.name == "digits" and cfg.max_batch_size == 64 and cfg.backend == "onnxruntime"
    assert list(cfg.input[1].dims) == [1, 8, 8] and cfg.input[1].data_type == 11  # TYPE_FP32
    assert list(cfg.input[0].dims) == [] and cfg.input[0].data_type == 13  # TYPE_STRING, one image per batch row
    assert cfg.input[0].optional and cfg.input[1].optional
    assert cfg.output[0].label_filename == "labels.txt"
    assert cfg.instance_group[0].count == 2 and cfg.version_policy.latest.num_versions == 1
    assert cfg.parameters["precision"].string_value == "fp32"
    assert len(cfg.parameters["engine_id"].string_value) == 16


# -- inference ---------------------------------------------------------------------------------------


def test_digits_heldout_accuracy_matches_onnxruntime(client):
    x, y = heldout()
    session = ort.InferenceSession(str(DIGITS / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    got = []
    for start in range(0, len(x), 64):
        batch = x[start : start + 64]
        inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        got.append(client.infer("digits", [inp]).as_numpy("logits"))
    logits = np.concatenate(got)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits.argmax(1) == y).mean() >= 0.97


def test_classification_top_k_with_labels(client):
    x, y = heldout()
    inp = grpcclient.InferInput("input", [2, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x[:2])
    out = grpcclient.InferRequestedOutput("logits", class_count=3)
    result = client.infer("digits", [inp], outputs=[out])
    classes = result.as_numpy("logits")
    assert classes.shape == (2, 3)
    for row, label in zip(classes, y[:2]):
        score, index, name = row[0].decode().split(":")
        assert int(index) == label and name == str(label)
        assert float(score) >= float(row[1].decode().split(":")[0])


@pytest.mark.parametrize("dt", DATATYPES)
def test_every_datatype_raw_round_trip(types_server, dt):
    with grpcclient.InferenceServerClient(types_server.url) as c:
        data = _values(dt, (3, 4))
        inp = grpcclient.InferInput("x", list(data.shape), dt)
        inp.set_data_from_numpy(data)
        result = c.infer(f"id_{dt.lower()}", [inp])
        out = result.as_numpy("y")
        assert result.get_output("y").datatype == dt
        np.testing.assert_array_equal(out, data)


_TYPED_FIELD = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
                "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


@pytest.mark.parametrize("dt", [d for d in DATATYPES if d != "FP16"])
def test_every_datatype_typed_contents(types_server, dt):
    data = _values(dt, (2, 4))
    request = service_pb2.ModelInferRequest(model_name=f"id_{dt.lower()}")
    tensor = request.inputs.add(name="x", datatype=dt, shape=[2, 4])
    getattr(tensor.contents, _TYPED_FIELD[dt]).extend(data.flatten().tolist())
    with grpc.insecure_channel(types_server.url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert len(response.raw_output_contents) == 1 and not response.outputs[0].HasField("contents")
    result = grpcclient.InferResult(response)
    np.testing.assert_array_equal(result.as_numpy("y"), data)


def test_fp16_typed_contents_rejected(types_server):
    request = service_pb2.ModelInferRequest(model_name="id_fp16")
    request.inputs.add(name="x", datatype="FP16", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
    with grpc.insecure_channel(types_server.url) as channel:
        with pytest.raises(grpc.RpcError) as err:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "FP16" in err.value.details()


def test_multiple_inputs_requested_output_filter_and_dynamic_dims(types_server):
    with grpcclient.InferenceServerClient(types_server.url) as c:
        a = np.arange(10, dtype=np.float32).reshape(2, 5)
        b = np.ones((2, 5), np.float32)
        inputs = [grpcclient.InferInput("a", [2, 5], "FP32"), grpcclient.InferInput("b", [2, 5], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        result = c.infer("add_sub", inputs, outputs=[grpcclient.InferRequestedOutput("diff")], request_id="req-7")
        assert result.get_response().id == "req-7"
        assert [o.name for o in result.get_response().outputs] == ["diff"]
        assert result.as_numpy("sum") is None
        np.testing.assert_array_equal(result.as_numpy("diff"), a - b)


def test_streaming_infer(client):
    x, y = heldout()
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        for i in range(8):
            inp = grpcclient.InferInput("input", [1, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(x[i : i + 1])
            client.async_stream_infer("digits", [inp], request_id=str(i))
        bad = grpcclient.InferInput("input", [1, 1, 8, 9], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 1, 8, 9), np.float32))
        client.async_stream_infer("digits", [bad], request_id="bad")
        got, errors = {}, []
        for _ in range(9):
            result, error = responses.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                got[result.get_response().id] = int(result.as_numpy("logits").argmax())
    finally:
        client.stop_stream()
    assert len(errors) == 1 and "shape" in str(errors[0])
    assert got == {str(i): int(p) for i, p in enumerate(_predict(x[:8]))}


def _predict(x):
    session = ort.InferenceSession(str(DIGITS / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0].argmax(1)


def test_statistics_count_requests(client):
    before = client.get_inference_statistics("digits").model_stats[0]
    x, _ = heldout()
    inp = grpcclient.InferInput("input", [4, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x[:4])
    for _ in range(3):
        client.infer("digits", [inp])
    after = client.get_inference_statistics("digits").model_stats[0]
    assert after.name == "digits" and after.version == "1"
    assert after.inference_stats.success.count - before.inference_stats.success.count == 3
    assert after.inference_count - before.inference_count == 12
    assert after.execution_count - before.execution_count == 3
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert any(b.batch_size == 4 for b in after.batch_stats)
    assert after.last_inference > 0
    every = client.get_inference_statistics()
    assert [s.name for s in every.model_stats] == ["digits"]


def test_async_infer_concurrency(client):
    x, _ = heldout()
    results: queue.Queue = queue.Queue()
    for i in range(32):
        inp = grpcclient.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x[i : i + 1])
        client.async_infer("digits", [inp], partial(lambda i, result, error: results.put((i, result, error)), i))
    got = {}
    for _ in range(32):
        i, r, e = results.get(timeout=30)
        assert e is None, e
        got[i] = int(r.as_numpy("logits").argmax())
    assert [got[i] for i in range(32)] == list(_predict(x[:32]))


# -- health, reflection, metrics, unsupported ------------------------------------------------------


def test_grpc_health_and_reflection(digits_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(digits_server.url) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_metrics_exposition_parses(client, digits_server):
    from prometheus_client.parser import text_string_to_metric_families

    x, _ = heldout()
    inp = grpcclient.InferInput("input", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x[:1])
    client.infer("digits", [inp])
    text = urllib.request.urlopen(digits_server.metrics_url, timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("tegrad_requests", "tegrad_request_duration_seconds", "tegrad_batch_size", "tegrad_queue_depth",
                 "tegrad_inflight_requests", "tegrad_model_state", "tegrad_model_info"):
        assert name in families, name
    stages = {s.labels["stage"] for s in families["tegrad_request_duration_seconds"].samples if s.name.endswith("_count")}
    assert stages == {"queue", "compute_input", "infer", "compute_output", "total"}
    info = [s for s in families["tegrad_model_info"].samples if s.labels["model"] == "digits"]
    assert info and info[0].labels["backend"] == "onnxruntime" and info[0].labels["precision"] == "fp32"
    ok = [s.value for s in families["tegrad_requests"].samples
          if s.labels.get("outcome") == "success" and s.labels["model"] == "digits" and s.name.endswith("_total")]
    assert ok and ok[0] >= 1
    ready = [s.value for s in families["tegrad_model_state"].samples if s.labels["state"] == "READY"]
    assert ready == [1.0]


def test_shared_memory_and_trace_unimplemented(client):
    for call in (client.get_system_shared_memory_status, client.get_cuda_shared_memory_status,
                 client.get_trace_settings, client.get_log_settings):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert "UNIMPLEMENTED" in str(err.value.status()) or "does not support" in str(err.value)
    assert client.is_server_ready()


def test_np_dtype_helper_agrees():
    # Guards the datatype table in this file against tritonclient's own.
    for dt, np_type in NUMPY.items():
        if dt != "BYTES":
            assert np_to_triton_dtype(np.dtype(np_type)) == dt


def test_digits_from_png_images_match_the_tensor_path(client):
    import cv2

    x, y = heldout()
    raw = np.load(DIGITS / "data" / "heldout.npz")["x"][:32]
    pngs = [cv2.imencode(".png", (d.astype(np.int32) * 255 // 16).astype(np.uint8))[1].tobytes() for d in raw]
    images = grpcclient.InferInput("image", [len(pngs)], "BYTES")
    images.set_data_from_numpy(np.array(pngs, dtype=object))
    from_images = client.infer("digits", [images]).as_numpy("logits")
    tensor = grpcclient.InferInput("input", [32, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(x[:32])
    from_tensor = client.infer("digits", [tensor]).as_numpy("logits")
    # (d * 255 // 16) / 255 is within 1/255 of d / 16: the same class almost always, close logits.
    assert (from_images.argmax(1) == from_tensor.argmax(1)).mean() >= 0.95
    assert (from_images.argmax(1) == y[:32]).mean() >= 0.9
    stats = client.get_inference_statistics("digits").model_stats[0]
    assert stats.inference_stats.compute_input.count > 0
