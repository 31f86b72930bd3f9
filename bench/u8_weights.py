"""CPU-target INT8 weights: uint8 (zero point 128, U8U8 kernels) vs int8 (U8S8 kernels) vs FP32, side by side.

Both INT8 graphs hold the same numbers (S8 ``q`` is U8 ``q + 128``); only the kernel ONNX Runtime
picks differs. On x86 without VNNI the U8S8 kernels add u8×s8 product pairs in int16 and
saturate, so next to the speed the script shows top-1 agreement and logit cosine with FP32.

    python bench/u8_weights.py                    # EfficientNet-Lite0, 100 eval images
    python bench/u8_weights.py --runs 30 --limit-eval 200
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tables import say, table  # noqa: E402
from calib import algorithms  # noqa: E402
from calib.datasets import ImageFolder  # noqa: E402
from calib.evaluate import compare_outputs  # noqa: E402
from calib.lower import lower  # noqa: E402
from calib.observe import observe  # noqa: E402
from calib.preprocess import PRESETS  # noqa: E402


def u8_weights_to_s8(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with its uint8 weights (zero point 128) stored as int8 (zero point 0)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q, z = inits[node.input[0]], inits[node.input[2]]
        if q.data_type != TensorProto.UINT8:
            continue
        for t in (q, z):
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t).astype(np.int16) - 128).astype(np.int8), t.name))
    return out


def fused_session(model: onnx.ModelProto | Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", default=str(ROOT.parent / "shared" / "zoo"))
    p.add_argument("--runs", type=int, default=24, help="timed runs per model and batch (in 3 rounds)")
    p.add_argument("--limit-eval", type=int, default=100)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    zoo = Path(args.zoo)
    model_path = zoo / "models" / "efficientnet-lite0.onnx"
    spec = PRESETS["efficientnet-lite0"]
    calib_dir = zoo / "images" / "calib"

    say(f"calibrating EfficientNet-Lite0 (max) on {calib_dir}")
    obs = observe(model_path, calib_dir, None, spec=spec, batch_size=9, histogram=False, progress=False)
    amax = algorithms.compute_all(obs, "max")
    u8 = lower(str(model_path), "int8", amax, target="cpu")
    s8 = u8_weights_to_s8(u8)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(s8, str(Path(tmp) / "s8.onnx"))  # the checker on the way in: still a valid graph
    models = [("FP32", fused_session(model_path, args.threads)),
              ("INT8 U8 act x U8 weights (zp 128)", fused_session(u8, args.threads)),
              ("INT8 U8 act x S8 weights", fused_session(s8, args.threads))]

    eval_dir = zoo / "images" / "imagenet_eval"
    src = ImageFolder(eval_dir, spec)
    src.files = sorted(src.files)[: args.limit_eval]
    x = np.stack([src.load(i) for i in range(len(src))]).astype(np.float32)
    batches = [x[i : i + 16] for i in range(0, len(x), 16)]
    ref = [models[0][1].run(None, {"input": b})[0] for b in batches]
    quality = {}
    for name, sess in models[1:]:
        got = [sess.run(None, {"input": b})[0] for b in batches]
        quality[name] = compare_outputs(ref, got)

    rounds = 3
    times: dict[tuple[str, int], list[float]] = {}
    for bs in (1, 8):
        feed = {"input": x[:bs]}
        for _ in range(rounds):
            for name, sess in models:
                for _ in range(3):
                    sess.run(None, feed)
                for _ in range(-(-args.runs // rounds)):
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    times.setdefault((name, bs), []).append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) * 1000 for k, v in times.items()}
    rows = []
    for name, _ in models:
        q = quality.get(name)
        rows.append([name, f"{med[(name, 1)]:.2f}", f"{med[('FP32', 1)] / med[(name, 1)]:.2f}x",
                     f"{med[(name, 8)]:.2f}", f"{med[('FP32', 8)] / med[(name, 8)]:.2f}x",
                     "1.0000" if q is None else f"{q.top1_agreement:.4f}", "1.0000" if q is None else f"{q.cosine:.4f}"])
    say()
    say(table(["model", "b1 ms", "vs FP32", "b8 ms", "vs FP32", "top-1 agree", "cosine"], rows))
    say(f"{len(x)} eval images; medians of {rounds} x {-(-args.runs // rounds)} runs, {args.threads} threads, "
        f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
