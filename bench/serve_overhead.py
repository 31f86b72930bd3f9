"""Serving overhead: raw ONNX Runtime ``session.run`` vs tritonclient -> tegrad, side by side.

For each concurrency level, N threads call ``session.run`` on one in-process
session for a fixed time; then N threads, each with its own tritonclient gRPC
client, call a tegrad server (a separate process on loopback) serving the same
model for the same time. Both sides use the same input tensors. Prints
throughput, the tegrad/raw ratio, p50/p99 latency and the p50 latency tegrad adds.

    python bench/serve_overhead.py                     # the embedded digits model
    python bench/serve_overhead.py --model ../shared/zoo/models/efficientnet-lite0.onnx

Note: on a 2-core machine the client threads share the cores with the server,
so the ratio is a lower bound of what a remote client would see.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.interop.conftest import DIGITS, start_server  # noqa: E402  (tritonclient-side helpers, no daemon.protogen)


def _inputs(session, batch: int, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for arg in session.get_inputs():
        shape = [batch if not isinstance(d, int) or d < 0 else d for d in arg.shape]
        if arg.type != "tensor(float)":
            raise SystemExit(f"this benchmark feeds FP32 only; {arg.name} is {arg.type}")
        feeds[arg.name] = rng.random(shape, dtype=np.float32)
    return feeds


def _drive(concurrency: int, seconds: float, call) -> tuple[float, np.ndarray]:
    """Run ``call()`` from N threads for ``seconds``; return (calls/s, latencies in s)."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop = threading.Event()
    barrier = threading.Barrier(concurrency + 1)

    def worker(i: int) -> None:
        barrier.wait()
        own = latencies[i]
        while not stop.is_set():
            t0 = time.perf_counter()
            call(i)
            own.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat = np.concatenate([np.asarray(x) for x in latencies])
    return len(lat) / elapsed, lat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DIGITS / "1" / "model.onnx", help="ONNX model (FP32 inputs, dynamic batch dim)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of each request (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=8.0, help="measurement time per cell (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--config", default="max_batch = 8\ninstances = 1\n", help="tegrad config.toml text for the model")
    args = parser.parse_args()

    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    feeds = _inputs(session, args.batch, rng)
    outputs = [o.name for o in session.get_outputs()]

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        (repo / "bench" / "1").mkdir(parents=True)
        shutil.copy(args.model, repo / "bench" / "1" / "model.onnx")
        (repo / "bench" / "config.toml").write_text(args.config)
        server = start_server(repository=repo, state_dir=Path(tmp) / "state")
        try:
            clients = [grpcclient.InferenceServerClient(server.url) for _ in range(max(args.concurrency))]
            requests = []
            for _ in clients:
                inputs = []
                for name, arr in feeds.items():
                    inp = grpcclient.InferInput(name, list(arr.shape), "FP32")
                    inp.set_data_from_numpy(arr)
                    inputs.append(inp)
                requests.append(inputs)

            def raw(i: int) -> None:
                session.run(outputs, feeds)

            def served(i: int) -> None:
                clients[i].infer("bench", requests[i])

            # Same answer on both sides before timing anything.
            expected = session.run(outputs, feeds)[0]
            got = clients[0].infer("bench", requests[0]).as_numpy(outputs[0])
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

            rows = []
            for c in args.concurrency:
                _drive(c, args.warmup, raw)
                raw_tput, raw_lat = _drive(c, args.seconds, raw)
                _drive(c, args.warmup, served)
                srv_tput, srv_lat = _drive(c, args.seconds, served)
                rows.append((c, raw_tput, srv_tput, raw_lat, srv_lat))
        finally:
            rc = server.stop()
            if rc != 0:
                print(server.log(), file=sys.stderr)

    print(f"\nmodel {args.model.name}, batch {args.batch}, {args.seconds:.0f} s per cell, tegrad config: {args.config.strip()!r}")
    header = f"{'conc':>4} {'raw inf/s':>10} {'tegrad inf/s':>12} {'ratio':>6} {'raw p50 ms':>10} {'raw p99 ms':>10} {'tegrad p50 ms':>13} {'tegrad p99 ms':>13} {'added p50 ms':>12}"
    print(header)
    print("-" * len(header))
    for c, rt, st, rl, sl in rows:
        rp50, rp99, sp50, sp99 = (np.percentile(x, q) * 1000 for x, q in ((rl, 50), (rl, 99), (sl, 50), (sl, 99)))
        print(f"{c:>4} {rt * args.batch:>10.1f} {st * args.batch:>12.1f} {st / rt:>6.2f} {rp50:>10.3f} {rp99:>10.3f} {sp50:>13.3f} {sp99:>13.3f} {sp50 - rp50:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
