"""A model in ModelOpt's default ONNX PTQ form (FP16 weights → Q → DQ, FP16 scales and glue, opset 19),
made here without ModelOpt, served over gRPC with the answers of the file run directly."""

from __future__ import annotations

import numpy as np
import onnx
import tritonclient.grpc as grpcclient

from calib import glue
from calib.cache import CalibrationCache
from calib.lower import lower
from tests.calib.test_explicit import _qat
from tests.interop.conftest import DIGITS
from tests.interop.test_explicit_models import _direct, _model_dir, _served


def test_modelopt_fp16_form_serves_on_the_cpu_with_the_files_answers(server_factory, tmp_path):
    amax = CalibrationCache.load(DIGITS / "calib.json").amax
    ptq = lower(onnx.load(str(DIGITS / "1" / "model.onnx")), "int8", amax, target="tensorrt", glue="fp32")
    modelopt = onnx.load_from_string(glue.to_fp16_glue(_qat(ptq)).SerializeToString())
    root = tmp_path / "repo"
    path = _model_dir(root, "modelopt_fp16", modelopt, "")  # no precision line: detected
    held = np.load(DIGITS / "data" / "heldout.npz")
    x = (held["x"].astype(np.float32) / 16.0)[:, None]

    server = server_factory(repository=root)
    with grpcclient.InferenceServerClient(server.url) as c:
        got = _served(c, "modelopt_fp16", x)
        direct = _direct(path, x)
        assert (got.argmax(1) == direct.argmax(1)).mean() >= 0.99  # FP16 rounding apart
        # The daemon runs the CPU lowering unfused: the graph's own arithmetic with FP32 glue.
        fp32_glue = tmp_path / "fp32_glue.onnx"
        onnx.save(lower(modelopt, "explicit", target="tensorrt", glue="fp32"), str(fp32_glue))
        np.testing.assert_allclose(got, _direct(fp32_glue, x), rtol=1e-5, atol=1e-5)
        assert c.get_model_config("modelopt_fp16").config.parameters["layers_int8"].string_value == "5"
    assert "already carries Q/DQ" in server.log()
