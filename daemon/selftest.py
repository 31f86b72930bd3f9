"""``tegrad selftest``: build the embedded digits model on every backend and precision this
machine offers, run the held-out digits through each engine and compare with FP32 ONNX Runtime.

On a Jetson this is the first command to run: it exercises the whole build path (lowering,
build worker, engine cache, runner) and shows what INT8 costs in accuracy and buys in latency.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from daemon.config import load_model_config
from daemon.engines.availability import tensorrt_unavailable
from daemon.engines.cache import EngineCache
from daemon.engines.factory import EngineFactory
from daemon.engines.tensorrt.layers import by_precision
from daemon.engines.tensorrt.platform import describe, tensorrt_version
from daemon.engines.worker import BuildPool
from daemon.errors import TegradError

DIGITS = Path(__file__).resolve().parent / "models" / "digits"
PRECISIONS = ("fp32", "fp16", "int8", "mixed")


def _heldout() -> tuple[np.ndarray, np.ndarray]:
    held = np.load(DIGITS / "data" / "heldout.npz")
    return (held["x"].astype(np.float32) / 16.0)[:, None], held["y"]


def _first_conv() -> str:
    from calib.lower import layer_precisions

    return next(iter(layer_precisions(str(DIGITS / "1" / "model.onnx"))))


def _run(engine, x: np.ndarray) -> np.ndarray:
    return np.concatenate([engine.infer({"input": x[i : i + 64]}, 0)["logits"] for i in range(0, len(x), 64)])


def _latency_ms(engine, x: np.ndarray, runs: int = 200) -> float:
    one = x[:1]
    for _ in range(10):
        engine.infer({"input": one}, 0)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        engine.infer({"input": one}, 0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


async def _rows(backends: list[str], precisions: list[str], cache_dir: Path) -> list[list[str]]:
    factory = EngineFactory(EngineCache(cache_dir, 1 << 30), BuildPool())
    base = load_model_config(DIGITS)
    x, y = _heldout()
    reference = None
    rows = []
    for backend in backends:
        for precision in precisions:
            update: dict = {"backend": backend, "precision": precision, "instances": 1}
            if precision in ("int8", "mixed"):
                update["calibration_cache"] = "calib.json"
            if precision == "mixed":
                update["exclude"] = [_first_conv()]
            config = base.model_copy(update=update)
            t0 = time.perf_counter()
            try:
                prepared = await factory.prepare(config, DIGITS, 1, DIGITS / "1" / "model.onnx")
            except TegradError as exc:
                rows.append([backend, precision, "failed", "-", "-", "-", "-", str(exc)])
                continue
            build_s = time.perf_counter() - t0
            engine = prepared.engine
            try:
                logits = await asyncio.to_thread(_run, engine, x)
                latency = await asyncio.to_thread(_latency_ms, engine, x)
            finally:
                engine.close()
            top1 = logits.argmax(1)
            if reference is None:  # the first row is FP32 ONNX Runtime
                reference = top1
            totals = by_precision(prepared.layers)
            layers = "/".join(str(totals.get(p, 0)) for p in ("int8", "fp16", "fp32"))
            rows.append([backend, precision, f"{build_s:.2f}", f"{latency:.3f}",
                         f"{100 * float((top1 == reference).mean()):.2f}", f"{100 * float((top1 == y).mean()):.2f}",
                         layers, prepared.key[:16]])
    return rows


def clock_lines(root: Path | str = "/") -> list[str]:
    """On a Jetson: the power mode and jetson_clocks the latencies below were measured at, and a
    warning when the clocks were not at their maximum."""
    from daemon.telemetry.jetson import clock_state, clock_warning, not_jetson_reason

    if not_jetson_reason(root) is not None:
        return []
    state = clock_state(root)
    on = {True: "on", False: "off", None: "unknown"}[state.jetson_clocks]
    mode = f"{state.mode_id} ({state.mode_name})" if state.mode_id is not None else "unknown"
    lines = [f"clocks: nvpmodel mode {mode}, jetson_clocks {on}"]
    warning = clock_warning(state)
    if warning:
        lines.append(f"WARNING: {warning}")
    return lines


def run(args) -> int:
    backends = ["onnxruntime"]
    why = tensorrt_unavailable()
    # With TensorRT present its rows are shown even without a usable GPU: they fail with the reason
    # (no CUDA, TensorRT too old), which is what a Jetson user with a broken install needs to see.
    if why is None or tensorrt_version() is not None:
        backends.append("tensorrt")
        why = None
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        print(f"unknown precisions {unknown}; choose from {', '.join(PRECISIONS)}")
        return 2
    with tempfile.TemporaryDirectory(prefix="tegrad-selftest-") as tmp:
        cache_dir = Path(args.cache_dir) if args.cache_dir else Path(tmp)
        rows = asyncio.run(_rows(backends, precisions, cache_dir))
    x, _ = _heldout()
    headers = ["backend", "precision", "build s", "latency ms (b=1)", "agreement %", "accuracy %",
               "layers i8/f16/f32", "engine"]
    print(f"platform: {describe()}")
    for line in clock_lines():
        print(line)
    print(f"tegrad selftest: embedded digits model, {len(x)} held-out images; agreement = top-1 equal to FP32 ONNX Runtime")
    shown = [r[:-1] + [r[-1] if r[2] != "failed" else "see below"] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in shown)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in shown:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for r in rows:
        if r[2] == "failed":
            print(f"{r[0]} {r[1]} failed: {r[-1]}")
    if why:
        print(f"no TensorRT rows: {why}")
    failed = [r for r in rows if r[2] == "failed"]
    return 1 if failed and len(failed) == len(rows) else 0
