"""Triton migration as a user does it: `tegrad import-triton` on a Triton model folder, then serving
it; a folder with only config.pbtxt is served with a WARNING naming the command; a dynamic-batch ONNX
with no config gets Triton's auto-completed max_batch."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.interop.conftest import DIGITS

PBTXT = """
name: "digits"
platform: "onnxruntime_onnx"
max_batch_size: 16
version_policy: { latest: { num_versions: 2 } }
input [ { name: "input" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 1, 8, 8 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] label_filename: "labels.txt" } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
  default_queue_policy { max_queue_size: 32 default_timeout_microseconds: 5000000 }
}
optimization { graph: { level: 1 } }
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
parameters { key: "enable_mem_arena" value: { string_value: "1" } }
"""


def _tegrad(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def _triton_folder(root, pbtxt: str = PBTXT, versions=(1, 2)):
    model = root / "digits"
    for v in versions:
        (model / str(v)).mkdir(parents=True)
        shutil.copy(DIGITS / "1" / "model.onnx", model / str(v) / "model.onnx")
    shutil.copy(DIGITS / "labels.txt", model / "labels.txt")
    (model / "config.pbtxt").write_text(pbtxt)
    return model


def test_import_triton_converts_and_the_result_serves(server_factory, tmp_path):
    model = _triton_folder(tmp_path / "repo")
    done = _tegrad("import-triton", str(model))
    assert done.returncode == 0, done
    out = done.stdout
    assert f"wrote {model / 'config.toml'}" in out
    assert "converted: max_batch_size 16 -> max_batch" in out and "converted: version_policy latest" in out
    assert "not converted: instance_group kind/gpus (KIND_CPU)" in out
    assert "not converted: parameters 'enable_mem_arena'" in out
    assert "[onnxruntime] intra_op_threads" in out
    text = (model / "config.toml").read_text()
    for line in ("max_batch = 16", "instances = 2", "latest = 2", "preferred_batch_sizes = [4, 8]",
                 "max_queue_delay_us = 100", "max_queue_size = 32", "default_timeout_us = 5000000",
                 'graph_optimization = "extended"', "intra_op_threads = 1", 'format = "NCHW"', 'labels = "labels.txt"'):
        assert line in text, (line, text)

    again = _tegrad("import-triton", str(model))
    assert again.returncode == 1 and "already exists; pass --force" in again.stderr, again
    assert (model / "config.toml").read_text() == text
    assert _tegrad("import-triton", "--force", str(model)).returncode == 0

    server = server_factory(repository=tmp_path / "repo")
    assert "config.pbtxt" not in server.log()  # converted: no warning
    with grpcclient.InferenceServerClient(server.url) as c:
        cfg = c.get_model_config("digits").config
        assert cfg.max_batch_size == 16 and sum(g.count for g in cfg.instance_group) == 2
        assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
        assert c.is_model_ready("digits", "1") and c.is_model_ready("digits", "2")
        x = grpcclient.InferInput("input", [3, 1, 8, 8], "FP32")
        x.set_data_from_numpy(np.zeros((3, 1, 8, 8), np.float32))
        out = c.infer("digits", [x], outputs=[grpcclient.InferRequestedOutput("logits", class_count=1)])
        assert out.as_numpy("logits").shape == (3, 1)


@pytest.mark.parametrize("pbtxt, words", [
    ('name: "digits"\nplatform: "ensemble"\n', ["platform", "ensemble"]),
    ('name: "digits"\nbackend: "python"\n', ["backend", "'python'", "ONNX"]),
    ('name: "digits"\nplatform: "tensorrt_plan"\n', ["platform", "tensorrt_plan", "model.onnx"]),
    ('name: "digits"\nmax_batch_size: 8\nsequence_batching { }\n', ["sequence_batching", "stateless"]),
    ('name: "digits"\nmax_batch_size: 8\nensemble_scheduling { step [] }\n', ["ensemble_scheduling"]),
    ('name: "digits"\nmax_batch_size: 8\ndynamic_batching { priority_levels: 2 }\n', ["priority_levels"]),
    ('name: "digits"\nmax_batch_size: 2\ndynamic_batching { preferred_batch_size: [ 4 ] }\n',
     ["would not load", "exceed max_batch"]),
    ('name: "digits"\nmax_batchsize: 8\n', ["max_batchsize", "2:1"]),
])
def test_import_triton_refuses_what_has_no_equivalent_naming_the_key(tmp_path, pbtxt, words):
    model = _triton_folder(tmp_path, pbtxt, versions=(1,))
    done = _tegrad("import-triton", str(model))
    assert done.returncode == 1, done
    for word in words:
        assert word in done.stderr, (word, done.stderr)
    assert "Traceback" not in done.stderr
    assert not (model / "config.toml").exists()


def test_import_triton_on_a_folder_without_pbtxt_names_it(tmp_path):
    done = _tegrad("import-triton", str(tmp_path))
    assert done.returncode == 1 and "config.pbtxt does not exist" in done.stderr, done


def test_pbtxt_only_folder_warns_and_a_dynamic_batch_onnx_gets_max_batch(server_factory, tmp_path):
    model = _triton_folder(tmp_path / "repo", versions=(1,))
    server = server_factory(repository=tmp_path / "repo")
    log = server.log()
    assert "WARNING" in log and f"tegrad import-triton {model}" in log, log
    assert "batching up to 4 (Triton's auto-complete" in log, log
    with grpcclient.InferenceServerClient(server.url) as c:
        assert c.get_model_config("digits").config.max_batch_size == 4


def test_import_triton_maps_the_tensorrt_accelerator_and_lists_hints(tmp_path):
    model = _triton_folder(tmp_path, 'name: "digits"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
                           'optimization { priority: PRIORITY_MAX cuda { graphs: true }\n'
                           '  execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt"\n'
                           '    parameters { key: "precision_mode" value: "FP16" }\n'
                           '    parameters { key: "max_workspace_size_bytes" value: "536870912" } } ] } }\n',
                           versions=(1,))
    done = _tegrad("import-triton", str(model))
    assert done.returncode == 0, done
    text = (model / "config.toml").read_text()
    for line in ('backend = "tensorrt"', 'precision = "fp16"', "workspace_mb = 512"):
        assert line in text, (line, text)
    assert "not converted: optimization cuda" in done.stdout and "not converted: optimization priority" in done.stdout
