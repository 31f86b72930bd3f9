"""Sensitivity analysis: the subgraph path equals the whole-graph path, early stop, resumable rows,
ranking a pre-quantized (explicit Q/DQ) model's own pairs, and the suggestion as config.toml."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import calib_graphs as G
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib import config_snippet, sensitivity
from calib import lower as L
from calib.cache import CalibrationCache
from calib.evaluate import compare_outputs, run_batches
from calib.graph import Graph
from calib.sensitivity_state import StateFile
from daemon.config import load_model_config
from daemon.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "daemon" / "models" / "digits"


@pytest.fixture(scope="module")
def digits():
    with np.load(DIGITS / "data" / "heldout.npz") as z:
        x = (z["x"][:192].astype(np.float32) / 16).reshape(-1, 1, 8, 8)
    amax = CalibrationCache.load(DIGITS / "calib.json").amax
    return onnx.load(DIGITS / "1" / "model.onnx"), amax, [x[i : i + 64] for i in range(0, 192, 64)]


def _by_layer(report):
    return {r.layer: r for r in report.rows}


@pytest.mark.parametrize("target", ["tensorrt", "cpu"], ids=["trt-target", "cpu-target"])
def test_subgraph_path_gives_the_whole_graph_numbers(digits, target):
    model, amax, batches = digits
    fast = sensitivity.analyze(model, amax, batches, target=target, chunk_samples=None)
    slow = sensitivity.analyze(model, amax, batches, target=target, chunk_samples=None, fast=False)
    assert len(fast.rows) == 5
    f, s = _by_layer(fast), _by_layer(slow)
    assert set(f) == set(s)
    for name in f:
        assert f[name].rel_error == pytest.approx(s[name].rel_error, rel=1e-6, abs=1e-9), name
        assert f[name].cosine == pytest.approx(s[name].cosine, rel=1e-9), name
        assert f[name].top1_agreement == s[name].top1_agreement, name
    assert [r.layer for r in fast.rows] == [r.layer for r in slow.rows]


def test_subgraph_path_on_a_skip_connection():
    model = G.residual()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((48, 3, 6, 6)).astype(np.float32)
    from calib import qdq

    amax = G.observe_amax(model, x, qdq.activation_tensors_to_quantize(model))
    batches = [x[:16], x[16:32], x[32:]]
    fast = _by_layer(sensitivity.analyze(model, amax, batches, chunk_samples=None))
    slow = _by_layer(sensitivity.analyze(model, amax, batches, chunk_samples=None, fast=False))
    assert set(fast) == {"conv0", "conv1", "conv2", "conv3"}
    for name in fast:
        assert fast[name].rel_error == pytest.approx(slow[name].rel_error, rel=1e-6, abs=1e-9), name
        assert fast[name].rel_error > 0, name  # every layer's Q/DQ changes the output


def test_ranking_stops_once_the_top_is_stable(digits, tmp_path):
    model, amax, batches = digits
    small = [b[i : i + 16] for b in batches for i in range(0, 64, 16)]  # 12 chunks of 16
    state, notes = tmp_path / "s.jsonl", []
    early = sensitivity.analyze(model, amax, small, chunk_samples=16, stable_top=1, state=state, log=notes.append)
    assert early.stopped_early and early.samples < 192
    assert early.samples % 16 == 0 and early.samples >= 32
    assert any("ranking stable: top 1 in the same order" in n for n in notes)
    # Measuring the whole slice afterwards continues from the chunks already measured.
    whole = sensitivity.analyze(model, amax, small, chunk_samples=16, stable_top=0, state=state, log=notes.append)
    assert not whole.stopped_early and whole.samples == 192
    assert any(f"reusing {early.samples // 16 * 5} measured rows" in n for n in notes), notes
    lines = state.read_text().splitlines()[1:]
    assert len(lines) == len(set(lines)) == 12 * 6
    # Chunked means are the whole slice's means.
    one = _by_layer(sensitivity.analyze(model, amax, small, chunk_samples=None))
    for r in whole.rows:
        assert r.rel_error == pytest.approx(one[r.layer].rel_error, rel=1e-9)
        assert r.top1_agreement == pytest.approx(one[r.layer].top1_agreement)


def test_state_file_is_reused_and_restarted_for_other_options(digits, tmp_path):
    model, amax, batches = digits
    state = tmp_path / "s.jsonl"
    notes = []
    first = sensitivity.analyze(model, amax, batches, chunk_samples=64, stable_top=0, state=state, log=notes.append)
    lines = state.read_text().splitlines()
    assert len(lines) == 1 + 3 * (1 + 5)  # header, then per chunk the full-INT8 row and 5 layers
    again = sensitivity.analyze(model, amax, batches, chunk_samples=64, stable_top=0, state=state, log=notes.append)
    assert state.read_text().splitlines() == lines  # nothing measured twice
    assert any("reusing 15 measured rows" in n for n in notes)
    assert [r.__dict__ for r in again.rows] == [r.__dict__ for r in first.rows]
    notes.clear()
    sensitivity.analyze(model, amax, batches, chunk_samples=64, stable_top=0, state=state, method="complement",
                        log=notes.append)
    assert any("other options (method)" in n for n in notes), notes
    assert json.loads(state.read_text().splitlines()[0])["key"]["method"] == "complement"


def test_cut_last_line_is_ignored(tmp_path):
    path = tmp_path / "s.jsonl"
    s = StateFile(path, {"a": 1})
    s.add("layer", 0, "x", stats={"samples": 1})
    with open(path, "a") as f:
        f.write('{"kind": "layer", "chunk": 0, "lay')  # a kill mid-write
    again = StateFile(path, {"a": 1})
    assert again.get("layer", 0, "x") is not None and again.count("layer") == 1
    again.add("layer", 0, "y", stats={"samples": 1})
    assert StateFile(path, {"a": 1}).count("layer") == 2


# ---- explicit (pre-quantized) models ------------------------------------------------------------
@pytest.fixture(scope="module")
def ptq(digits):
    """The digits model quantized by tegrad (int8 weights + DQ, FP32 glue), saved and read back."""
    model, amax, _ = digits
    return onnx.load_from_string(L.lower(model, "int8", amax, target="tensorrt", glue="fp32").SerializeToString())


def _activation_dq(model, layer: str) -> onnx.NodeProto:
    g = Graph(model)
    node = next(n for n in model.graph.node if n.name == layer)
    return g.producer[node.input[0]]


def test_explicit_model_ranks_the_pair_that_hurts_first(ptq, digits):
    _, _, batches = digits
    bad = onnx.ModelProto()
    bad.CopyFrom(ptq)
    layer = "/features/features.7/body/body.3/Conv"  # the least sensitive layer with tegrad's own scales
    dq = _activation_dq(bad, layer)
    g = Graph(bad)
    scale = g.constant(dq.input[1])
    init = g.initializers[dq.input[1]]
    init.CopyFrom(numpy_helper.from_array((scale / 30).astype(np.float32), init.name))  # clips hard
    report = sensitivity.analyze(bad, None, batches, chunk_samples=None)
    assert report.explicit
    assert {r.layer for r in report.rows} == set(L.layer_precisions(ptq))
    assert report.rows[0].layer == layer, report.to_table()
    ok = sensitivity.analyze(ptq, None, batches, chunk_samples=None)
    assert _by_layer(ok)[layer].rel_error < report.rows[0].rel_error / 3  # the clipping, not the layer


def test_explicit_complement_measures_what_exclude_removes(ptq, digits):
    _, _, batches = digits
    report = _by_layer(sensitivity.analyze(ptq, None, batches, method="complement", chunk_samples=None))
    reference = run_batches(sensitivity._strip_qdq(onnx.load_from_string(ptq.SerializeToString())), batches)
    full = compare_outputs(reference, run_batches(L.lower(ptq, "explicit", glue="fp32"), batches))
    for layer in report:
        lowered = L.lower(ptq, "explicit", exclude=[layer], glue="fp32")  # what `exclude` on the model does
        r = compare_outputs(reference, run_batches(lowered, batches))
        assert report[layer].rel_error == pytest.approx(r.rel_error, rel=1e-5), layer
        assert report[layer].score == pytest.approx(full.rel_error - r.rel_error, rel=1e-4, abs=1e-7)


def test_cli_ranks_an_explicit_model_without_a_cache(ptq, digits, tmp_path, capsys):
    from calib.cli import main

    _, _, batches = digits
    path = tmp_path / "digits.qdq.onnx"
    onnx.save(ptq, path)
    data = tmp_path / "x.npy"
    np.save(data, np.concatenate(batches))
    out_json = tmp_path / "r.json"
    rc = main(["sensitivity", str(path), "--data", str(data), "--max-samples", "64", "--json", str(out_json),
               "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "carries Q/DQ" in captured.err and "/fc/Gemm" in captured.out
    doc = json.loads(out_json.read_text())
    assert doc["report"]["explicit"] and len(doc["report"]["rows"]) == 5 and doc["plan"] is None
    assert (tmp_path / "r.jsonl").exists()


def test_cli_refuses_a_float_model_without_a_cache(digits, tmp_path, capsys):
    from calib.cli import main

    model, _, batches = digits
    data = tmp_path / "x.npy"
    np.save(data, batches[0])
    assert main(["sensitivity", str(DIGITS / "1" / "model.onnx"), "--data", str(data), "--no-progress"]) == 2
    assert "give its calibration cache with --cache" in capsys.readouterr().err


# ---- resuming an interrupted command ------------------------------------------------------------
def _chain(path: Path, layers: int = 12) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((24, 24, 3, 3)) * 0.12).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [cur, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        cur = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [cur], ["p"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["p"], ["y"], name="flat"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 24, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 24])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def _layer_rows(path: Path) -> list[tuple]:
    rows = []
    for line in path.read_text().splitlines()[1:]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row["kind"] == "layer":
            rows.append((row["chunk"], row["layer"]))
    return rows


def test_killed_run_resumes_with_only_the_missing_rows(tmp_path):
    from calib.cli import main

    model = _chain(tmp_path / "chain.onnx")
    data = tmp_path / "x.npy"
    np.save(data, np.abs(np.random.default_rng(1).standard_normal((64, 24, 32, 32))).astype(np.float32))
    cache = tmp_path / "chain.calib.json"
    assert main(["calibrate", str(model), "--data", str(data), "-o", str(cache), "--no-progress"]) == 0
    common = ["sensitivity", str(model), "--cache", str(cache), "--data", str(data), "--chunk-samples", "16",
              "--stable-top", "0", "--min-top1", "0", "--no-progress"]
    state = tmp_path / "run.jsonl"
    cmd = [sys.executable, "-m", "calib.cli", *common, "--json", str(tmp_path / "run.json")]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not (state.exists() and len(_layer_rows(state)) >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no rows appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    measured = _layer_rows(state)
    assert proc.returncode == -signal.SIGKILL and 3 <= len(measured) < 48, (proc.returncode, len(measured))

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"reusing {len(measured)} measured rows" in again.stderr
    rows = _layer_rows(state)
    assert len(rows) == 48 and len(set(rows)) == 48  # the first run's rows were not measured again
    assert rows[: len(measured)] == measured

    fresh = tmp_path / "fresh.json"
    assert main([*common, "--json", str(fresh)]) == 0
    resumed = json.loads((tmp_path / "run.json").read_text())["report"]["rows"]
    whole = json.loads(fresh.read_text())["report"]["rows"]
    assert [r["layer"] for r in resumed] == [r["layer"] for r in whole]
    for a, b in zip(resumed, whole, strict=True):
        assert a["rel_error"] == pytest.approx(b["rel_error"], rel=1e-9)
        assert a["cosine"] == pytest.approx(b["cosine"], rel=1e-12)


# ---- the suggestion as config.toml --------------------------------------------------------------
def test_write_config_merges_and_keeps_comments(tmp_path):
    model_dir = tmp_path / "yolox"
    model_dir.mkdir()
    (model_dir / "calib.json").write_text("{}")
    text = '# YOLOX-Nano on the CPU\nbackend = "onnxruntime"  # no GPU here\n\n[onnxruntime]\n# two cores\nintra_op_threads = 2\n'
    (model_dir / "config.toml").write_text(text)
    written = config_snippet.write_config(model_dir, ["Conv_62", "/head/*"], calibration_cache=model_dir / "calib.json")
    out = written.read_text()
    assert written == model_dir / "config.toml"
    assert "# YOLOX-Nano on the CPU" in out and "# no GPU here" in out and "# two cores" in out
    config = load_model_config(model_dir)
    assert config.precision == "mixed" and config.exclude == ["Conv_62", "/head/*"]
    assert config.exclude_precision == "fp16" and config.calibration_cache == "calib.json"
    assert config.onnxruntime.intra_op_threads == 2 and config.backend == "onnxruntime"

    # Again with fewer layers: replaced, not appended; the cache named in the file stays.
    config_snippet.write_config(model_dir / "config.toml", [], calibration_cache=tmp_path / "other.json")
    config = load_model_config(model_dir)
    assert config.precision == "int8" and config.exclude == [] and config.calibration_cache == "calib.json"


def test_write_config_refuses_a_result_that_would_not_load(tmp_path):
    path = tmp_path / "m" / "config.toml"
    path.parent.mkdir()
    text = "max_batch = 2\n\n[dynamic_batching]\npreferred_batch_sizes = [4]\n"
    path.write_text(text)
    with pytest.raises(ConfigError, match="preferred batch sizes"):
        config_snippet.write_config(path, ["a"], calibration_cache=tmp_path / "c.json")
    assert path.read_text() == text


def test_snippet_is_the_toml_to_paste():
    doc = tomllib.loads(config_snippet.snippet(["a", "b"], calibration_cache="m.calib.json"))
    assert doc == {"precision": "mixed", "exclude": ["a", "b"], "exclude_precision": "fp16",
                   "calibration_cache": "m.calib.json"}
    assert tomllib.loads(config_snippet.snippet([], explicit=True)) == {"precision": "explicit"}
