"""ModelOpt interop: EfficientNet-Lite0 quantized by NVIDIA ModelOpt's ONNX PTQ, served as is by tegrad.

ModelOpt (``modelopt.onnx.quantization.quantize``, INT8, calibrated on the CPU with ONNX Runtime)
quantizes the zoo's EfficientNet-Lite0 on the 108 ``images/calib`` images (preset
``efficientnet-lite0``) with its calibration methods (``entropy``, its default, and ``max``) and
its default FP16 glue (``high_precision_dtype="fp16"``) or FP32 glue. Each file then goes, unchanged,
into a model repository (backend onnxruntime; one config says ``precision = "explicit"``, one says
nothing and relies on the auto-detection), ``tegrad serve`` runs in its own process, and
tritonclient sends the 500 ``images/imagenet_eval`` images over gRPC. Printed:

1. Served vs direct: the served logits against the same file run directly on ONNX Runtime
   (QDQ fusion off: the graph's own arithmetic, DQ → float op → Q, which is what TensorRT's
   int32 accumulation computes), as max |Δlogit| and top-1 agreement; the steps in between
   (tegrad's CPU lowering run unfused, the U8-grid conversion alone) to show where a difference
   comes from; the same CPU graph with ONNX Runtime's QDQ fusion on (which tegrad's engine turns
   off for pre-quantized models); and a plain ``ort.InferenceSession`` on the file, what a user
   gets by default.
2. Accuracy on the 500 labelled images: FP32, ModelOpt INT8 direct and through tegrad, tegrad INT8
   (``tegrad calibrate`` + ``tegrad quantize --target cpu``, max and entropy): top-1 and top-1
   agreement with FP32.
3. Calibration cache: whether ModelOpt writes one (it reads TensorRT's text format through
   ``calibration_cache_path`` and writes none), and the other direction: tegrad's cache,
   converted by ``tegrad cache convert`` to TensorRT's text format, is read by ModelOpt.

Install (bench only, not CI: ModelOpt needs torch, whose PyPI wheel pulls CUDA libraries,
about 5.7 GB in the venv; keep the venv's onnx / onnxruntime, which ModelOpt's [onnx] extra
would replace by onnxruntime-gpu)::

    pip install nvidia-modelopt==0.47.0 onnx-graphsurgeon onnxslim onnxconverter-common lief cppimport \\
        ml_dtypes polygraphy onnxscript "onnx==$(pip show onnx | sed -n 's/^Version: //p')" \\
        "onnxruntime==$(pip show onnxruntime | sed -n 's/^Version: //p')"

Run::

    python bench/modelopt_interop.py                      # ~30 min on 2 loaded cores
    python bench/modelopt_interop.py --limit-eval 64 --variants entropy:fp32 --keep /tmp/mo
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tables import say as _say  # noqa: E402
from bench.tables import table as _table  # noqa: E402

BATCH = 16
CALIB_BATCH = 9  # ModelOpt's calibration steps: 12 batches of 9 over the 108 images
PRESET = "efficientnet-lite0"
DEFAULT_VARIANTS = "entropy:fp16,max:fp16,entropy:fp32"


def modelopt_available() -> str | None:
    """None when ModelOpt's ONNX quantizer imports; else why not (one line)."""
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except Exception as e:  # ImportError, or a dependency failing at import
        return f"nvidia-modelopt is not importable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); " \
               "see bench/modelopt_interop.py for the pip line"
    return None


# ---------------------------------------------------------------------------------------------
# data and ONNX Runtime
# ---------------------------------------------------------------------------------------------
def load_images(folder: Path, limit: int | None = None) -> tuple[np.ndarray, list[str]]:
    from calib.datasets import ImageFolder
    from calib.preprocess import PRESETS

    src = ImageFolder(folder, PRESETS[PRESET])
    if limit:
        src.files = src.files[:limit]
    return np.stack([src.load(i) for i in range(len(src))]).astype(np.float32), [p.name for p in src.files]


def ort_session(model: Path | bytes, fused: bool):
    """A CPU session on ``model``; ``fused=False`` turns ONNX Runtime's QDQ fusion off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not fused:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


def run_ort(model: Path | bytes, x: np.ndarray, fused: bool) -> np.ndarray:
    """Logits of ``model`` on ``x`` (see :func:`ort_session` for ``fused``)."""
    sess = ort_session(model, fused)
    return np.concatenate([sess.run(None, {"input": x[i : i + BATCH]})[0] for i in range(0, len(x), BATCH)])


def cpu_latency(models: dict[str, Path | bytes], x: np.ndarray, rounds: int = 6) -> dict[str, dict[str, float]]:
    """ms per image at batch len(x), fused and unfused, the models interleaved round by round; min over rounds."""
    sessions = {(name, fused): ort_session(model, fused) for name, model in models.items() for fused in (True, False)}
    times: dict[tuple[str, bool], list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, sess in sessions.items():
            t0 = time.perf_counter()
            sess.run(None, {"input": x})
            times[key].append(time.perf_counter() - t0)
    out: dict[str, dict[str, float]] = {}
    for (name, fused), t in times.items():
        out.setdefault(name, {})["fused" if fused else "unfused"] = min(t) * 1000 / len(x)
    return out


def diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {"max_abs": float(np.abs(a - b).max()), "top1_agreement": float(np.mean(a.argmax(1) == b.argmax(1)))}


# ---------------------------------------------------------------------------------------------
# ModelOpt
# ---------------------------------------------------------------------------------------------
def modelopt_quantize(src: Path, dst: Path, calib: np.ndarray, method: str, high_precision: str,
                      cache: Path | None = None) -> dict[str, Any]:
    """ModelOpt's ONNX PTQ on the CPU; returns seconds taken and the files it left beside ``dst``."""
    from modelopt.onnx.quantization import quantize

    dst.parent.mkdir(parents=True, exist_ok=True)
    # ModelOpt's loader runs onnx.shape_inference.infer_shapes_path on its input, which rewrites
    # that file in place: give it a private copy, never the zoo's (read-only) model.
    private = dst.parent / f".{dst.stem}.source.onnx"
    shutil.copyfile(src, private)
    before = set(dst.parent.iterdir())
    t0 = time.perf_counter()
    quantize(str(private), quantize_mode="int8", calibration_data=calib, calibration_method=method,
             calibration_shapes=f"input:{CALIB_BATCH}x3x224x224", calibration_eps=["cpu"],
             high_precision_dtype=high_precision, output_path=str(dst), log_level="WARNING",
             calibration_cache_path=str(cache) if cache else None)
    seconds = time.perf_counter() - t0
    new_files = sorted(p.name for p in set(dst.parent.iterdir()) - before)
    private.unlink(missing_ok=True)
    return {"seconds": seconds, "new_files": new_files}


def modelopt_cache_evidence() -> dict[str, Any]:
    """What ModelOpt's API says about calibration caches: read through a parameter, no writer."""
    import modelopt
    from modelopt.onnx.quantization import calib_utils, quantize

    doc = inspect.getdoc(quantize) or ""
    lines = doc.splitlines()
    i = next((k for k, line in enumerate(lines) if line.strip().startswith("calibration_cache_path")), None)
    described = lines[i + 1].strip() if i is not None and i + 1 < len(lines) else ""
    return {
        "version": getattr(modelopt, "__version__", "?"),
        "cache_parameters": [p for p in inspect.signature(quantize).parameters if "cache" in p],
        "calibration_cache_path_doc": described,
        "calib_utils_cache_functions": [n for n in dir(calib_utils) if "cache" in n.lower()],
    }


def graph_conventions(path: Path) -> str:
    import onnx
    from onnx import TensorProto

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    weight_qs = [n for n in qs if n.input[0] in inits]
    name = TensorProto.DataType.Name
    w_types = sorted({name(inits[n.input[0]].data_type) for n in weight_qs})
    s_types = sorted({name(inits[n.input[1]].data_type) for n in qs if n.input[1] in inits})
    z_types = sorted({name(inits[n.input[2]].data_type) for n in qs if len(n.input) > 2 and n.input[2] in inits})
    casts = sum(n.op_type == "Cast" for n in m.graph.node)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    return (f"opset {opset}; {len(qs)} Q / {sum(n.op_type == 'DequantizeLinear' for n in m.graph.node)} DQ; "
            f"weights {'/'.join(w_types)} → Q → DQ ({len(weight_qs)}); scales {'/'.join(s_types)}; "
            f"zero points {'/'.join(z_types)}; {casts} Casts")


# ---------------------------------------------------------------------------------------------
# tegrad
# ---------------------------------------------------------------------------------------------
def tegrad(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"tegrad {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")


_CONFIG = """backend = "onnxruntime"
{precision}max_batch = {batch}

[[input]]
name = "input"
datatype = "FP32"
dims = [3, 224, 224]

[[output]]
name = "logits"
datatype = "FP32"
dims = [1000]
"""


def make_repository(root: Path, models: dict[str, Path], detect: set[str]) -> Path:
    """One model directory per file; those in ``detect`` carry no precision line (auto-detection)."""
    shutil.rmtree(root, ignore_errors=True)
    for name, path in models.items():
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / name / "1" / "model.onnx")
        precision = "" if name in detect else 'precision = "explicit"\n'
        (root / name / "config.toml").write_text(_CONFIG.format(precision=precision, batch=BATCH))
    return root


def serve_and_infer(repository: Path, names: list[str], x: np.ndarray, state: Path) -> tuple[dict[str, np.ndarray], str]:
    """Start tegrad serve on ``repository``; the logits of every model over gRPC; and the server's log."""
    import tritonclient.grpc as grpcclient

    from tests.interop.conftest import start_server  # the tests' launcher: tritonclient side only

    server = start_server(repository=repository, state_dir=state, timeout=900)
    try:
        out: dict[str, np.ndarray] = {}
        with grpcclient.InferenceServerClient(server.url) as client:
            for name in names:
                parts = []
                for i in range(0, len(x), BATCH):
                    inp = grpcclient.InferInput("input", list(x[i : i + BATCH].shape), "FP32")
                    inp.set_data_from_numpy(x[i : i + BATCH])
                    parts.append(client.infer(name, [inp]).as_numpy("logits"))
                out[name] = np.concatenate(parts)
    finally:
        rc = server.stop()
    if rc != 0:
        raise RuntimeError(f"tegrad serve exited with {rc}:\n{server.log()[-3000:]}")
    return out, server.log()


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------
def run(zoo: Path, work: Path, variants: list[tuple[str, str]], limit_eval: int | None = None,
        plain_limit: int = 100, tegrad_methods: tuple[str, ...] = ("max", "entropy"), cache_roundtrip: bool = True
        ) -> dict[str, Any]:
    import onnx

    from calib.lower import lower

    results: dict[str, Any] = {"variants": {}}
    model = zoo / "models" / "efficientnet-lite0.onnx"
    calib_dir = zoo / "images" / "calib"
    eval_dir = zoo / "images" / "imagenet_eval"
    with open(eval_dir / "labels.csv", newline="") as f:
        label_of = {r["filename"]: int(r["class_index"]) for r in csv.DictReader(f)}
    calib, _ = load_images(calib_dir)
    x, names = load_images(eval_dir, limit_eval)
    labels = np.array([label_of[n] for n in names])
    _say(f"calibration: {len(calib)} images of {calib_dir}; evaluation: {len(x)} images of {eval_dir}")

    evidence = modelopt_cache_evidence()
    results["modelopt"] = evidence
    files: dict[str, Path] = {}
    for method, hp in variants:
        key = f"modelopt_{method}_{hp}"
        dst = work / f"{key}.onnx"
        if dst.exists():
            info = {"seconds": None, "new_files": [], "reused": True}
        else:
            _say(f"ModelOpt {evidence['version']}: quantize(int8, calibration_method={method!r}, "
                 f"high_precision_dtype={hp!r}) ...")
            info = modelopt_quantize(model, dst, calib, method, hp)
        info["conventions"] = graph_conventions(dst)
        results["variants"][key] = info
        files[key] = dst
        took = f"{info['seconds']:.0f} s" if info["seconds"] else "reused from --keep"
        _say(f"  {key}: {took}; {info['conventions']}")

    # tegrad's own INT8, through the CLI as a user runs it
    tegrad_files: dict[str, Path] = {}
    obs = work / "tegrad_observations.npz"
    for method in tegrad_methods:
        cache = work / f"tegrad_{method}.calib.json"
        dst = work / f"tegrad_{method}_cpu.onnx"
        if not dst.exists():
            t0 = time.perf_counter()
            source = ["--observations", str(obs)] if obs.exists() else ["--save-observations", str(obs)]
            tegrad("calibrate", str(model), "--data", str(calib_dir), "--preset", PRESET, "--batch-size",
                   str(CALIB_BATCH), "--algorithm", method, "-o", str(cache), *source)
            tegrad("quantize", str(model), "--cache", str(cache), "--precision", "int8", "--target", "cpu", "-o", str(dst))
            _say(f"tegrad calibrate + quantize ({method}, cpu target): {time.perf_counter() - t0:.0f} s")
        tegrad_files[method] = dst

    _say("running FP32 and the ModelOpt files directly on ONNX Runtime ...")
    fp32 = run_ort(model, x, fused=True)
    direct = {k: run_ort(p, x, fused=False) for k, p in files.items()}
    plain = {k: run_ort(p, x[:plain_limit], fused=True) for k, p in files.items()}
    lowered = {k: lower(str(p), "explicit", target="cpu").SerializeToString() for k, p in files.items()}
    lowered_unfused = {k: run_ort(b, x, fused=False) for k, b in lowered.items()}
    lowered_fused = {k: run_ort(b, x[:plain_limit], fused=True) for k, b in lowered.items()}
    # The U8 grid alone: tegrad's TensorRT-form lowering with FP32 glue (signed Q/DQ), unfused.
    signed_unfused = {k: run_ort(lower(str(p), "explicit", target="tensorrt", glue="fp32").SerializeToString(), x,
                                 fused=False) for k, p in files.items() if k.endswith("fp16")}
    tegrad_out = {m: run_ort(p, x, fused=True) for m, p in tegrad_files.items()}

    _say("serving the ModelOpt files through tegrad (onnxruntime backend, CPU) ...")
    detect = {next(k for k in files if k.endswith("fp32"))} if any(k.endswith("fp32") for k in files) else set()
    repo = make_repository(work / "repository", files, detect)
    shutil.rmtree(work / "state", ignore_errors=True)
    served, log = serve_and_infer(repo, list(files), x, work / "state")
    detected = "already carries Q/DQ" in log
    results["auto_detected"] = {"models": sorted(detect), "log_line_seen": detected}

    _say()
    _say("1. ModelOpt file served by tegrad vs the same file run directly on ONNX Runtime "
         f"({len(x)} images; plain session on the first {min(plain_limit, len(x))})")
    rows = []
    for key in files:
        steps = [
            ("served (gRPC) vs direct (ORT, QDQ fusion off)", served[key], direct[key]),
            ("served vs tegrad's CPU graph run unfused", served[key], lowered_unfused[key]),
            ("tegrad's CPU graph unfused vs direct", lowered_unfused[key], direct[key]),
        ]
        if key in signed_unfused:
            steps.append(("  U8 grid alone: vs signed graph, FP32 glue, unfused", lowered_unfused[key], signed_unfused[key]))
            steps.append(("  FP32 glue vs the file's FP16 glue (both unfused)", signed_unfused[key], direct[key]))
        steps.append(("tegrad's CPU graph with ORT's QDQ fusion on vs direct", lowered_fused[key],
                      direct[key][: len(lowered_fused[key])]))
        steps.append(("plain ORT session on the file (fusion on) vs direct", plain[key], direct[key][: len(plain[key])]))
        for what, a, b in steps:
            d = diff(a, b)
            results["variants"][key].setdefault("compare", {})[what.strip()] = d
            rows.append([key, what, f"{d['max_abs']:.3g}", f"{d['top1_agreement']:.4f}"])
    _say(_table(["ModelOpt file", "comparison", "max |Δlogit|", "top-1 agree"], rows, align="llrr"))
    _say(f"auto-detection: {', '.join(sorted(detect)) or '(none)'} served without a precision line; "
         f"'already carries Q/DQ' logged: {detected}")

    lat = cpu_latency({"FP32": model, **lowered, **{f"tegrad INT8 {m}": p for m, p in tegrad_files.items()}}, x[:BATCH])
    results["latency_ms_per_image"] = lat
    _say()
    _say(f"CPU latency, ms/image at batch {BATCH} (min of 6 interleaved rounds; load average {os.getloadavg()[0]:.2f}); "
         "tegrad serves the ModelOpt graphs unfused, its own INT8 graphs fused:")
    _say(_table(["graph", "QDQ fusion on", "off", "vs FP32 (as served)"],
                [[n, f"{v['fused']:.1f}", f"{v['unfused']:.1f}",
                  f"{lat['FP32']['fused'] / v['unfused' if n.startswith('modelopt') else 'fused']:.2f}x"]
                 for n, v in lat.items()]))

    _say()
    _say(f"2. Accuracy on {len(x)} labelled eval images")
    acc_rows = []

    def acc(name: str, out: np.ndarray) -> None:
        top1 = float(np.mean(out.argmax(1) == labels))
        agree = float(np.mean(out.argmax(1) == fp32.argmax(1)))
        results.setdefault("accuracy", {})[name] = {"top1": top1, "agreement_fp32": agree}
        acc_rows.append([name, f"{top1:.4f}", f"{(top1 - results['accuracy']['FP32']['top1']) * 100:+.1f}", f"{agree:.4f}"])

    acc("FP32", fp32)
    for key in files:
        acc(f"{key} direct (ORT, unfused)", direct[key])
        acc(f"{key} through tegrad (gRPC)", served[key])
    for method, out in tegrad_out.items():
        acc(f"tegrad INT8 {method} (calibrate + quantize --target cpu)", out)
    _say(_table(["model", "top-1", "Δ pt", "agree FP32"], acc_rows))

    _say()
    _say("3. Calibration cache")
    _say(f"ModelOpt {evidence['version']} quantize(): cache parameters {evidence['cache_parameters']}; "
         f"calibration_cache_path: \"{evidence['calibration_cache_path_doc']}\"; calib_utils cache functions: "
         f"{evidence['calib_utils_cache_functions']} (a reader of TensorRT's text format, no writer)")
    written = sorted({f for v in results["variants"].values() for f in v.get("new_files", []) if not f.endswith(".onnx")})
    _say(f"files ModelOpt's runs left besides the .onnx: {written or 'none'}")
    if cache_roundtrip and tegrad_methods:
        method = tegrad_methods[-1]
        trt = work / f"tegrad_{method}.cache"
        tegrad("cache", "convert", str(work / f"tegrad_{method}.calib.json"), str(trt))
        first = trt.read_text().splitlines()[0]
        dst = work / f"modelopt_from_tegrad_{method}_fp32.onnx"
        info = modelopt_quantize(model, dst, calib, "max", "fp32", cache=trt)
        from calib.cache import CalibrationCache
        from calib.graph import Graph

        amax = CalibrationCache.load(work / f"tegrad_{method}.calib.json").amax
        m = onnx.load(str(dst))
        g = Graph(m)
        acts = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and not g.is_constant(n.input[0])]
        taken = sum(n.input[0] in amax and np.isclose(float(g.constant(n.input[1])), amax[n.input[0]] / 127, rtol=1e-6)
                    for n in acts)
        cache_tensors = len(trt.read_text().splitlines()) - 1
        out = run_ort(dst, x, fused=False)
        top1 = float(np.mean(out.argmax(1) == labels))
        agree_t = float(np.mean(out.argmax(1) == tegrad_out[method].argmax(1)))
        results["cache_roundtrip"] = {"header": first, "tensors": cache_tensors, "seconds": info["seconds"],
                                      "top1": top1, "agreement_with_tegrad": agree_t,
                                      "activation_qs": len(acts), "scales_from_cache": int(taken)}
        _say(f"tegrad -> ModelOpt: `tegrad cache convert` wrote {trt.name} ({first}, {cache_tensors} tensors); "
             f"ModelOpt quantize(calibration_cache_path=...) took them for {taken} of its {len(acts)} activation Qs "
             f"(scale = amax/127): top-1 {top1:.4f}, "
             f"top-1 agreement with tegrad's own {method} INT8 {agree_t:.4f}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default=str(ROOT.parent / "shared" / "zoo"), help="benchmark zoo folder")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="ModelOpt runs, method:high_precision_dtype, comma-separated (default %(default)s)")
    p.add_argument("--limit-eval", type=int, default=None, help="evaluate on the first N images only")
    p.add_argument("--plain-limit", type=int, default=100, help="images for the plain-ORT-session comparison")
    p.add_argument("--no-cache-roundtrip", action="store_true", help="skip tegrad cache -> ModelOpt")
    p.add_argument("--keep", default=None, help="keep (and reuse) the quantized files in this folder")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    why = modelopt_available()
    if why:
        print(f"skipped: {why}")
        return 0
    variants = [tuple(v.split(":")) for v in args.variants.split(",") if v]
    for v in variants:
        if len(v) != 2 or v[0] not in ("entropy", "max") or v[1] not in ("fp16", "fp32"):
            p.error(f"bad variant {':'.join(v)!r}: method entropy|max, high precision fp16|fp32")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tegrad-modelopt-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say(f"tegrad modelopt_interop bench; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    try:
        results = run(Path(args.zoo).resolve(), work, variants, args.limit_eval, args.plain_limit,
                      cache_roundtrip=not args.no_cache_roundtrip)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["total_seconds"] = time.perf_counter() - t0
    _say(f"\ntotal run time {results['total_seconds'] / 60:.1f} min")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
