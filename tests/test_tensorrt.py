"""TensorRT backend: optimization-profile planning everywhere; builds and inference on a GPU with TensorRT."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from daemon.config import TensorRTOptions, TensorRTProfile
from daemon.engines.tensorrt import builder as B
from daemon.errors import ConfigError, InvalidArgument
from daemon.tensor_spec import TensorSpec

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "daemon" / "models" / "digits"
MODEL = DIGITS / "1" / "model.onnx"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def opts(**kwargs) -> TensorRTOptions:
    return TensorRTOptions(**kwargs)


def prof(name, lo, opt, hi) -> TensorRTProfile:
    return TensorRTProfile(input=name, min=lo, opt=opt, max=hi)


# --- optimization profile (pure Python) ---


def test_batch_dimension_comes_from_max_batch():
    shapes = B.profile_shapes({"x": (-1, 3, 8, 8)}, 16, opts(min_batch=2, opt_batch=4))
    assert shapes == {"x": ((2, 3, 8, 8), (4, 3, 8, 8), (16, 3, 8, 8))}


def test_opt_batch_defaults_to_max_batch():
    shapes = B.profile_shapes({"a": (-1, 4), "b": (-1,)}, 32, opts())
    assert shapes == {"a": ((1, 4), (32, 4), (32, 4)), "b": ((1,), (32,), (32,))}


def test_static_model_without_batching_keeps_its_shape():
    assert B.profile_shapes({"x": (1, 3, 4, 4)}, 0, opts()) == {"x": ((1, 3, 4, 4),) * 3}


def test_explicit_profile_overrides_the_batch_rule():
    options = opts(min_batch=2, profile=[prof("img", [1, 3, 32, 32], [4, 3, 64, 64], [8, 3, 128, 128])])
    shapes = B.profile_shapes({"img": (-1, 3, -1, -1), "scale": (-1, 2)}, 8, options)
    assert shapes["img"] == ((1, 3, 32, 32), (4, 3, 64, 64), (8, 3, 128, 128))
    assert shapes["scale"] == ((2, 2), (8, 2), (8, 2))


def test_variable_non_batch_dimension_needs_a_profile():
    with pytest.raises(ConfigError, match=r"input 'img' dimension 2 is variable.*\[\[tensorrt\.profile\]\]"):
        B.profile_shapes({"img": (-1, 3, -1, 64)}, 4, opts())
    with pytest.raises(ConfigError, match=r"input 'x' dimension 0"):
        B.profile_shapes({"x": (-1, 4)}, 0, opts())


def test_profile_rank_must_match_the_model():
    with pytest.raises(ConfigError, match=r"profile\]\] for input 'x' has rank 3"):
        B.profile_shapes({"x": (-1, 4)}, 4, opts(profile=[prof("x", [1, 4, 1], [2, 4, 1], [4, 4, 1])]))


def test_profile_must_agree_with_fixed_dimensions():
    with pytest.raises(ConfigError, match=r"'x': dimension 1 is fixed at 4"):
        B.profile_shapes({"x": (-1, 4)}, 4, opts(profile=[prof("x", [1, 4], [2, 5], [4, 5])]))


def test_profile_for_an_unknown_input_is_rejected():
    with pytest.raises(ConfigError, match=r"'nope'.*inputs are 'x'"):
        B.profile_shapes({"x": (-1, 4)}, 4, opts(profile=[prof("nope", [1], [1], [1])]))


def test_profile_below_max_batch_is_rejected():
    with pytest.raises(ConfigError, match=r"batch 4 is below max_batch 8"):
        B.profile_shapes({"x": (-1, 4)}, 8, opts(profile=[prof("x", [1, 4], [2, 4], [4, 4])]))


def test_batching_needs_a_variable_first_dimension():
    with pytest.raises(ConfigError, match=r"max_batch is 4 but input 'x' has shape \[1, 4\]"):
        B.profile_shapes({"x": (1, 4)}, 4, opts())


def test_min_batch_above_max_batch_is_rejected():
    with pytest.raises(ConfigError, match=r"min_batch <= opt_batch <= max_batch"):
        B.profile_shapes({"x": (-1, 4)}, 4, opts(min_batch=8))


def test_option_fingerprint_is_canonical():
    a = opts(profile=[prof("a", [1], [1], [1]), prof("b", [1], [2], [3])])
    b = opts(gpu_fallback=False, profile=[prof("b", [1], [2], [3]), prof("a", [1], [1], [1])])
    assert B._canonical_options(a) == B._canonical_options(b)  # GPU fallback means nothing off the DLA
    assert B._canonical_options(opts(dla_core=0)) != B._canonical_options(opts(dla_core=0, gpu_fallback=False))
    assert B._canonical_options(opts()) != B._canonical_options(opts(workspace_mb=256))
    assert "dla_batch" not in B._canonical_options(opts(dla_batch=8))  # GPU engines keep their ids
    assert B._canonical_options(opts(dla_core=0)) != B._canonical_options(opts(dla_core=0, dla_batch=8))


# --- without TensorRT ---


def test_modules_import_without_tensorrt_or_pycuda():
    code = (
        "import sys, daemon.engines.tensorrt.builder, daemon.engines.tensorrt.runner\n"
        "assert not {'tensorrt', 'pycuda'} & set(sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_missing_tensorrt_is_a_config_error():
    from daemon.engines.tensorrt.runner import TrtEngine

    with pytest.raises(ConfigError, match=r"backend 'tensorrt' needs the tensorrt Python package"):
        B.fingerprint(opts())
    with pytest.raises(ConfigError, match=r"tensorrt Python package"):
        TrtEngine.load(Path("x.plan"), inputs=[], outputs=[], instances=1, max_batch=0, precision="fp32", engine_id="x")


# --- on a GPU with TensorRT ---

INPUTS = [TensorSpec("input", "FP32", (-1, 1, 8, 8))]
OUTPUTS = [TensorSpec("logits", "FP32", (-1, 10))]


def _digits(name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DIGITS / "data" / f"{name}.npz")
    return (data["x"].astype(np.float32) / 16.0)[:, None], data["y"]


def _ort(model_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def _build(onnx_path: Path, plan: Path, cache: Path | None, messages: list | None = None) -> dict:
    report = messages.append if messages is not None else None
    return B.build_engine(onnx_path, plan, options=opts(), max_batch=64, timing_cache_path=cache, progress=report)


def _load(plan: Path, instances: int = 2, **kwargs):
    from daemon.engines.tensorrt.runner import TrtEngine

    args = {"inputs": INPUTS, "outputs": OUTPUTS, "max_batch": 64, "precision": "fp32", "engine_id": "t"} | kwargs
    return TrtEngine.load(plan, instances=instances, **args)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt")
    messages: list[str] = []
    report = _build(MODEL, d / "digits.plan", d / "timing.cache", messages)
    return d, report, messages


@pytest.fixture(scope="module")
def engine(built):
    eng = _load(built[0] / "digits.plan")
    yield eng
    eng.close()


@pytest.mark.tensorrt
def test_build_writes_plan_timing_cache_and_progress(built):
    d, report, messages = built
    assert report["plan_bytes"] == (d / "digits.plan").stat().st_size > 0
    assert report["layers"] > 0 and report["tensorrt"]
    assert (d / "timing.cache").stat().st_size > 0
    stages = [m for m in messages if m in ("parsing", "building", "serializing")]
    assert stages == ["parsing", "building", "serializing"]
    assert not list(d.glob(".*.tmp"))


@pytest.mark.tensorrt
def test_fingerprint_names_the_gpu():
    fp = B.fingerprint(opts())
    assert fp["backend"] == "tensorrt" and fp["device"] and fp["dla_core"] == "-1"
    assert fp["compute_capability"].replace(".", "").isdigit()


@pytest.mark.tensorrt
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("slot", [0, 1])
def test_matches_onnxruntime(engine, batch, slot):
    x, _ = _digits("heldout")
    out = engine.infer({"input": x[:batch]}, slot)
    assert set(out) == {"logits"} and out["logits"].shape == (batch, 10) and out["logits"].dtype == np.float32
    np.testing.assert_allclose(out["logits"], _ort(MODEL, x[:batch]), rtol=1e-3, atol=1e-3)


@pytest.mark.tensorrt
def test_two_slots_in_parallel_give_the_same_results(engine):
    x, _ = _digits("heldout")
    chunks = [x[0:7], x[7:40], x[40:41], x[41:105]]
    expected = [_ort(MODEL, c) for c in chunks]
    failures: list[BaseException] = []

    def worker(slot: int) -> None:
        try:
            for _ in range(10):
                for c, want in zip(chunks, expected):
                    np.testing.assert_allclose(engine.infer({"input": c}, slot)["logits"], want, rtol=1e-3, atol=1e-3)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


@pytest.mark.tensorrt
def test_bad_requests_are_invalid_arguments(engine):
    x, _ = _digits("heldout")
    with pytest.raises(InvalidArgument, match="outside the engine's range"):
        engine.infer({"input": np.zeros((65, 1, 8, 8), np.float32)}, 0)
    with pytest.raises(InvalidArgument, match="float64"):
        engine.infer({"input": x[:2].astype(np.float64)}, 0)
    assert engine.infer({"input": x[:2]}, 0)["logits"].shape == (2, 10)  # the slot still works


@pytest.mark.tensorrt
def test_load_checks_the_specs(built):
    with pytest.raises(ConfigError, match="INT32"):
        _load(built[0] / "digits.plan", 1, inputs=[TensorSpec("input", "INT32", (-1, 1, 8, 8))])
    with pytest.raises(ConfigError, match="no tensor 'probs'"):
        _load(built[0] / "digits.plan", 1, outputs=[TensorSpec("probs", "FP32", (-1, 10))])
    with pytest.raises(ConfigError, match="max_batch is 128"):
        _load(built[0] / "digits.plan", 1, max_batch=128)


@pytest.mark.tensorrt
def test_second_build_reuses_the_timing_cache(built, tmp_path, caplog):
    cache = built[0] / "timing.cache"
    before = cache.stat().st_size
    with caplog.at_level(logging.WARNING, logger="tegrad.engines.tensorrt"):
        _build(MODEL, tmp_path / "again.plan", cache)
    assert not [r for r in caplog.records if "timing cache" in r.getMessage()]
    assert cache.stat().st_size >= before


@pytest.mark.tensorrt
def test_corrupt_timing_cache_is_ignored(tmp_path, caplog):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"not a timing cache")
    with caplog.at_level(logging.WARNING, logger="tegrad.engines.tensorrt"):
        _build(MODEL, tmp_path / "x.plan", cache)
    assert any("timing cache" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "x.plan").stat().st_size > 0 and cache.read_bytes() != b"not a timing cache"


@pytest.mark.tensorrt
def test_unparseable_model_names_the_parser_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ConfigError, match="cannot parse the model"):
        _build(bad, tmp_path / "bad.plan", None)


@pytest.mark.tensorrt
def test_int8_qdq_model_agrees_with_onnxruntime(tmp_path):
    from calib import lower as L
    from calib.algorithms import compute_all
    from calib.observe import observe

    model = onnx.load(MODEL)
    amax = compute_all(observe(model, _digits("calib")[0], progress=False), "max")
    lowered = tmp_path / "int8.onnx"
    onnx.save(L.lower(model, "int8", amax), str(lowered))
    _build(lowered, tmp_path / "int8.plan", tmp_path / "timing.cache")
    eng = _load(tmp_path / "int8.plan", 1, precision="int8")
    try:
        x, y = _digits("heldout")
        got = np.concatenate([eng.infer({"input": x[i : i + 64]}, 0)["logits"] for i in range(0, len(x), 64)])
    finally:
        eng.close()
    want = _ort(lowered, x)
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.99
    assert np.mean(got.argmax(1) == y) > 0.9


# --- JetPack / TensorRT / CUDA versions (pure Python) ---


def test_l4t_release_and_jetpack_from_nv_tegra_release(tmp_path):
    from daemon.engines.tensorrt import platform as P

    f = tmp_path / "nv_tegra_release"
    f.write_text("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 2024\n")
    assert P.l4t_release(f) == "36.4.0"
    assert P.jetpack_of("36.4.0") == "6.1" and P.jetpack_of("36.3.0") == "6.0" and P.jetpack_of("36.9.1") == "6.x"
    f.write_text("# R35 (release), REVISION: 5\n")
    assert P.l4t_release(f) == "35.5.0"
    assert P.l4t_release(tmp_path / "absent") is None


def test_tensorrt_older_than_10_is_refused_with_the_jetpack_sentence():
    from daemon.engines.tensorrt.platform import check_tensorrt_version

    with pytest.raises(ConfigError, match=r"tegrad needs TensorRT ≥ 10 \(JetPack ≥ 6\.1\); this is TensorRT 8\.6\.2"):
        check_tensorrt_version("8.6.2")
    check_tensorrt_version("10.3.0")
    check_tensorrt_version("11.4.0.106")


def test_cuda_version_from_the_toolkit(tmp_path):
    from daemon.engines.tensorrt.platform import cuda_version

    (tmp_path / "version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}')
    assert cuda_version(tmp_path) == "12.6.68"
    (tmp_path / "version.json").unlink()
    (tmp_path / "version.txt").write_text("CUDA Version 10.2.300\n")
    assert cuda_version(tmp_path) == "10.2.300"
    assert cuda_version(tmp_path / "none") is None


# --- a CUDA error makes the engine UNAVAILABLE (fake CUDA: the state machine runs without a GPU) ---


class _FakeError(Exception):
    pass


class _FakeStream:
    def __init__(self) -> None:
        self.synced = 0
        self.poisoned = False
        self.handle = 1

    def synchronize(self) -> None:
        self.synced += 1
        if self.poisoned:  # what a sticky error does to every later call
            raise _FakeError("cuStreamSynchronize failed: an illegal memory access was encountered")


class _FakeCuda:
    class Event:
        def record(self, stream=None) -> None:
            pass

    class Context:
        depth = 0

        @classmethod
        def pop(cls) -> None:
            cls.depth -= 1


class _FakeCtx:
    def push(self) -> None:
        _FakeCuda.Context.depth += 1


def _fake_engine(monkeypatch, run):
    from daemon.engines.tensorrt import runner as R

    monkeypatch.setattr(R, "_primary_context", lambda cuda: _FakeCtx())
    engine = R.TrtEngine(_FakeCuda, [TensorSpec("x", "FP32", (-1, 2))], [TensorSpec("y", "FP32", (-1, 2))],
                         precision="fp32", engine_id="e" * 16)
    stream = _FakeStream()
    engine._slots = [R._Slot(_FakeCuda, object(), stream)]
    monkeypatch.setattr(engine, "_run", run)
    return engine, stream


@pytest.fixture
def faults(monkeypatch):
    from daemon.engines.tensorrt import faults as F

    heard: list[str] = []
    F.on_sticky_fault(heard.append)
    yield heard
    F.on_sticky_fault(None)


def test_a_sticky_cuda_error_makes_the_engine_unavailable_with_the_first_error(monkeypatch, faults):
    from daemon.errors import Unavailable

    calls = []

    def run(s, feeds):
        calls.append(1)
        s.stream.poisoned = True
        raise _FakeError("cuLaunchKernel failed: an illegal memory access was encountered")

    engine, stream = _fake_engine(monkeypatch, run)
    x = {"x": np.zeros((1, 2), np.float32)}
    with pytest.raises(Unavailable, match="UNAVAILABLE after a CUDA error: cuLaunchKernel failed: an illegal memory"):
        engine.infer(x)
    assert stream.synced == 0  # synchronizing would only raise again and hide the first error
    assert engine.failure.startswith("cuLaunchKernel failed")
    assert len(faults) == 1 and "illegal memory access" in faults[0]
    with pytest.raises(Unavailable, match="cuLaunchKernel failed"):  # the first error, not the later ones
        engine.infer(x)
    assert calls == [1] and len(faults) == 1  # the poisoned context is never touched again
    assert _FakeCuda.Context.depth == 0  # every push popped


def test_an_error_that_breaks_the_context_only_when_synchronizing_is_sticky_too(monkeypatch, faults):
    from daemon.errors import Unavailable

    def run(s, feeds):
        s.stream.poisoned = True
        raise RuntimeError("TensorRT could not run engine e: enqueue failed")

    engine, _ = _fake_engine(monkeypatch, run)
    with pytest.raises(Unavailable, match="enqueue failed; then cuStreamSynchronize failed: an illegal memory"):
        engine.infer({"x": np.zeros((1, 2), np.float32)})
    assert len(faults) == 1


def test_an_ordinary_error_leaves_the_engine_serving(monkeypatch, faults):
    results = iter([RuntimeError("cuMemAlloc failed: out of memory"), {"y": np.ones((1, 2), np.float32)}])

    def run(s, feeds):
        r = next(results)
        if isinstance(r, Exception):
            raise r
        return r

    engine, stream = _fake_engine(monkeypatch, run)
    x = {"x": np.zeros((1, 2), np.float32)}
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.infer(x)
    assert stream.synced == 1 and engine.failure == "" and faults == []
    assert engine.infer(x)["y"].sum() == 2


def test_sticky_errors_are_recognised_from_pycuda_and_tensorrt_messages():
    from daemon.engines.tensorrt.faults import is_sticky

    assert is_sticky("cuStreamSynchronize failed: unspecified launch failure")
    assert is_sticky("IExecutionContext::enqueueV3: Error Code 1: Cuda Runtime (an illegal memory access was encountered)")
    assert not is_sticky("cuMemAlloc failed: out of memory")
    assert not is_sticky("input 'x' shape [3] is outside the engine's range")


# --- DLA: one static shape; engine-level precision from the inspector's JSON ---


def test_dla_forces_a_static_profile_from_dla_batch_or_opt_batch():
    dla = opts(dla_core=0, min_batch=1, opt_batch=8)
    assert B.profile_shapes({"x": (-1, 3, 4, 4)}, 64, dla) == {"x": ((8, 3, 4, 4),) * 3}
    assert B.profile_shapes({"x": (-1, 3)}, 64, opts(dla_core=0, opt_batch=8, dla_batch=16))["x"] == ((16, 3),) * 3
    assert B.profile_shapes({"x": (-1, 3)}, 32, opts(dla_core=1))["x"] == ((32, 3),) * 3  # max_batch
    with pytest.raises(ConfigError, match="dla_batch 128 is above max_batch 64"):
        B.profile_shapes({"x": (-1, 3)}, 64, opts(dla_core=0, dla_batch=128))
    with pytest.raises(ConfigError, match="DLA core takes one static shape"):
        B.profile_shapes({"x": (-1, 3)}, 4, opts(dla_core=0, profile=[prof("x", [1, 3], [2, 3], [4, 3])]))
    # The GPU keeps its dynamic range.
    assert B.profile_shapes({"x": (-1, 3)}, 64, opts(opt_batch=8))["x"] == ((1, 3), (8, 3), (64, 3))


def test_a_static_batch_engine_runs_larger_batches_in_chunks_and_pads_smaller_ones(monkeypatch, faults):
    seen = []

    def run(s, feeds):
        x = feeds["x"]
        seen.append(len(x))
        return {"y": x * 2}

    engine, _ = _fake_engine(monkeypatch, run)
    engine._static_batch = 4
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    out = engine.infer({"x": x})["y"]
    assert seen == [4, 4, 4]  # 4 + 4 + 2 padded to 4
    np.testing.assert_array_equal(out, x * 2)
    assert engine.infer({"x": x[:1]})["y"].shape == (1, 2)


def test_engine_inspector_layers_give_precision_and_device():
    from daemon.engines.tensorrt import layers as L

    found = L.parse((ROOT / "tests" / "data" / "engine_inspector_detailed.json").read_text())
    assert [(x.precision, x.device) for x in found] == [
        ("fp32", "gpu"), ("int8", "gpu"), ("fp16", "gpu"), ("fp16", "dla"), ("fp32", "gpu")]  # NoOp left out
    counts = L.counts(found)
    assert counts == {"fp16@dla": 1, "fp16@gpu": 1, "fp32@gpu": 2, "int8@gpu": 1}
    assert L.by_precision(counts) == {"fp16": 2, "fp32": 2, "int8": 1}
    assert L.by_precision({"int8": 3, "fp32": 1}) == {"int8": 3, "fp32": 1}  # an ONNX count passes through
    table = L.table([vars(x) for x in found])
    assert table.splitlines()[0].split() == ["LAYER", "TYPE", "PRECISION", "DEVICE"]
    assert "{ForeignNode[/blocks.0/Conv.../blocks.1/Add]}  DLA" in table


def test_engine_inspector_without_detail_or_json_is_told_apart():
    from daemon.engines.tensorrt import layers as L

    assert [x.precision for x in L.parse('{"Layers": ["conv1", "fc"], "Bindings": []}')] == ["unknown", "unknown"]
    with pytest.raises(ValueError, match="no JSON"):
        L.parse("Name: conv1")


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_tegrad_inspect_prints_the_per_layer_table_of_a_tensorrt_engine(tmp_path):
    from dataclasses import asdict

    from daemon.engines.tensorrt import layers as L

    found = L.parse((ROOT / "tests" / "data" / "engine_inspector_detailed.json").read_text())
    entry = tmp_path / "entries" / ("ab" * 32)
    entry.mkdir(parents=True)
    # What the factory stores for a TensorRT build (meta.json of the engine cache).
    (entry / "meta.json").write_text(json.dumps({
        "key": "ab" * 32, "model": "digits", "version": 2, "backend": "tensorrt", "precision": "int8",
        "layers": L.counts(found), "build_info": {"engine_layers": [asdict(x) for x in found],
                                                  "dla_placement": {"dla": 9, "gpu": 3, "fp32": 1}}}))
    done = _cli("inspect", "digits", "--engine-cache-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("model digits version 2: engine abababababababab, tensorrt int8; layers fp16@dla 1")
    assert "DLA before the build: 9 layers on DLA, 3 on the GPU (1 in FP32)" in done.stdout
    assert any(line.split()[-2:] == ["int8", "gpu"] and line.startswith("/conv1/Conv + /relu1/Relu") for line in lines)
    missing = _cli("inspect", "nope", "--engine-cache-dir", str(tmp_path))
    assert missing.returncode == 1 and "no engine for model 'nope'" in missing.stdout


def test_tegrad_inspect_of_an_onnxruntime_engine_shows_the_onnx_count(tmp_path):
    done = _cli("selftest", "--precisions", "int8", "--cache-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    shown = _cli("inspect", "digits", "--engine-cache-dir", str(tmp_path))
    assert shown.returncode == 0, shown.stderr
    assert "onnxruntime int8; layers fp16 0, fp32 0, int8 5" in shown.stdout, shown.stdout
    assert "ONNX Runtime engines are counted in the lowered ONNX" in shown.stdout


# --- prebuilt engines (model.plan / model.engine): found in the version directory ---


def _config(**kw):
    from daemon.config import ModelConfig

    return ModelConfig(**kw)


def test_a_version_directory_with_a_plan_is_a_tensorrt_version(tmp_path):
    from daemon.repository import layout

    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "model.plan").write_bytes(b"plan")
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "model.engine").write_bytes(b"engine")
    trt_config, ort_config = _config(backend="tensorrt"), _config()
    assert layout.versions_on_disk(tmp_path, layout.model_filenames(trt_config)) == [1, 2, 3]
    assert layout.versions_on_disk(tmp_path, layout.model_filenames(ort_config)) == [1]
    assert layout.model_file(tmp_path / "1", trt_config).name == "model.onnx"  # the ONNX wins: tegrad builds it
    assert layout.model_file(tmp_path / "2", trt_config).name == "model.plan"
    assert layout.model_file(tmp_path / "3", trt_config).name == "model.engine"
    assert layout.model_file(tmp_path / "2", ort_config).name == "model.onnx"  # does not exist: NotFound later
    named = _config(backend="tensorrt", default_model_filename="model.plan")  # Triton's spelling
    assert layout.model_filenames(named) == ("model.plan", "model.engine")


def test_a_prebuilt_engine_is_never_lowered_and_needs_the_tensorrt_backend(tmp_path):
    import asyncio

    from daemon.engines.cache import EngineCache
    from daemon.engines.factory import EngineFactory
    from daemon.engines.worker import BuildPool

    plan = tmp_path / "1" / "model.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"ftrt-not-really")
    factory = EngineFactory(EngineCache(tmp_path / "cache", 1 << 20), BuildPool())
    with pytest.raises(ConfigError, match='prebuilt TensorRT engine is served by backend = "tensorrt"'):
        asyncio.run(factory.prepare(_config(name="m"), tmp_path, 1, plan))
    if HAS_TENSORRT:
        pytest.skip("with TensorRT installed the plan reaches the runner: see the tensorrt-marked tests")
    with pytest.raises(ConfigError, match="needs the tensorrt Python package"):
        asyncio.run(factory.prepare(_config(name="m", backend="tensorrt", precision="fp16"), tmp_path, 1, plan))
    assert not any((tmp_path / "cache").rglob("*.onnx"))  # nothing was lowered or built
    assert plan.read_bytes() == b"ftrt-not-really"
