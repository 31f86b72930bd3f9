"""Pre-quantized (explicit Q/DQ) models served over gRPC: one quantized by tegrad and saved, one by ONNX
Runtime's quantize_static (QDQ), detected without a precision line; a broken one refused with the node named."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as grpcclient
from onnx import numpy_helper

from calib.cache import CalibrationCache
from calib.lower import lower
from calib.ort_exact import keep_exact
from tests.interop.conftest import DIGITS
from tests.onnx_models import ort_quantize_static


def _model_dir(root, name: str, model: onnx.ModelProto, precision_line: str):
    dst = root / name
    shutil.copytree(DIGITS, dst, ignore=shutil.ignore_patterns("data", "README.md", "calib.json"))
    onnx.save(model, str(dst / "1" / "model.onnx"))
    text = (dst / "config.toml").read_text().replace('precision = "fp32"\n', precision_line)
    (dst / "config.toml").write_text(text)
    return dst / "1" / "model.onnx"


def _ort_quantized(tmp_path) -> onnx.ModelProto:
    return ort_quantize_static(DIGITS / "1" / "model.onnx", DIGITS / "data" / "calib.npz", tmp_path / "ort.qdq.onnx")


def _direct(path, x) -> np.ndarray:
    options = keep_exact(ort.SessionOptions(), str(path))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _served(c, model: str, x) -> np.ndarray:
    out = []
    for i in range(0, len(x), 64):
        inp = grpcclient.InferInput("input", list(x[i : i + 64].shape), "FP32")
        inp.set_data_from_numpy(x[i : i + 64])
        out.append(c.infer(model, [inp]).as_numpy("logits"))
    return np.concatenate(out)


def test_explicit_models_serve_with_the_expected_answers(server_factory, tmp_path):
    amax = CalibrationCache.load(DIGITS / "calib.json").amax
    tegrad_qdq = lower(onnx.load(str(DIGITS / "1" / "model.onnx")), "int8", amax, target="tensorrt", glue="fp32")
    bad = onnx.ModelProto()
    bad.CopyFrom(tegrad_qdq)
    q = next(n for n in bad.graph.node if n.op_type == "QuantizeLinear")
    zp = next(t for t in bad.graph.initializer if t.name == q.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.array(5, np.int8), zp.name))

    root = tmp_path / "repo"
    paths = {
        "tegrad_qdq": _model_dir(root, "tegrad_qdq", tegrad_qdq, 'precision = "explicit"\n'),
        "ort_qdq": _model_dir(root, "ort_qdq", _ort_quantized(tmp_path), ""),  # no precision line: detected
    }
    _model_dir(root, "broken", bad, 'precision = "explicit"\n')
    held = np.load(DIGITS / "data" / "heldout.npz")
    x, y = (held["x"].astype(np.float32) / 16.0)[:, None], held["y"]
    fp32 = _direct(DIGITS / "1" / "model.onnx", x).argmax(1)

    # The broken model must not stop the daemon: the point is that it harms nothing else.
    server = server_factory(repository=root, args=("--exit-on-error=false",))
    with grpcclient.InferenceServerClient(server.url) as c:
        for name, path in paths.items():
            got = _served(c, name, x)
            direct = _direct(path, x)
            assert (got.argmax(1) == direct.argmax(1)).mean() >= 0.99, name
            assert abs((got.argmax(1) == y).mean() - (fp32 == y).mean()) <= 0.01, name
            layers = c.get_model_config(name).config.parameters["layers_int8"].string_value
            assert layers == "5", (name, layers)
        index = {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}
        assert index["broken"][0] == "UNAVAILABLE", index["broken"]
        assert f"QuantizeLinear '{q.name}'" in index["broken"][1] and "TensorRT needs 0" in index["broken"][1]
        assert c.is_model_ready("tegrad_qdq")  # the refused model harmed nothing
    assert "already carries Q/DQ" in server.log() and "'explicit'" in server.log()
