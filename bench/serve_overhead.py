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


def bench_repository(tmp: Path, model: Path, config: str) -> Path:
    """A repository in ``tmp`` holding ``model`` as the model "bench" with ``config``."""
    repo = tmp / "repo"
    (repo / "bench" / "1").mkdir(parents=True)
    shutil.copy(model, repo / "bench" / "1" / "model.onnx")
    (repo / "bench" / "config.toml").write_text(config)
    return repo


def triton_requests(feeds: dict[str, np.ndarray], count: int) -> list:
    """``count`` separate tritonclient input lists carrying ``feeds`` (one per client thread)."""
    import tritonclient.grpc as grpcclient

    requests = []
    for _ in range(count):
        inputs = []
        for name, arr in feeds.items():
            inp = grpcclient.InferInput(name, list(arr.shape), "FP32")
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        requests.append(inputs)
    return requests


def _inputs(session, batch: int, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for arg in session.get_inputs():
        shape = [batch if not isinstance(d, int) or d < 0 else d for d in arg.shape]
        if arg.type != "tensor(float)":
            raise SystemExit(f"this benchmark feeds FP32 only; {arg.name} is {arg.type}")
        feeds[arg.name] = rng.random(shape, dtype=np.float32)
    return feeds


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drive(concurrency: int, seconds: float, call, server_pid: int | None = None) -> tuple[float, np.ndarray]:
    """Run ``call()`` from N threads for ``seconds``; return (calls/s, latencies in s).

    Also records CPU ms per call of this process (the raw session, or the clients) and of
    the server in ``_drive.cpu``: on a 2-core machine the cores are the bottleneck, so CPU
    per inference, not latency, decides the throughput ratio.
    """
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
    cpu0 = time.process_time()
    srv0 = _cpu_seconds(server_pid) if server_pid else 0.0
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat = np.concatenate([np.asarray(x) for x in latencies])
    own = (time.process_time() - cpu0) * 1000 / len(lat)
    srv = ((_cpu_seconds(server_pid) - srv0) * 1000 / len(lat)) if server_pid else 0.0
    _drive.cpu = (own, srv)
    return len(lat) / elapsed, lat


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DIGITS / "1" / "model.onnx", help="ONNX model (FP32 inputs, dynamic batch dim)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of each request (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=8.0, help="measurement time per cell (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3, help="alternating raw/tegrad rounds per cell; medians (default: %(default)s)")
    parser.add_argument("--config", default="max_batch = 8\ninstances = 1\n", help="tegrad config.toml text for the model")
    args = parser.parse_args()

    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    rng = np.random.default_rng(0)
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    feeds = _inputs(session, args.batch, rng)
    outputs = [o.name for o in session.get_outputs()]

    with tempfile.TemporaryDirectory() as tmp:
        repo = bench_repository(Path(tmp), args.model, args.config)
        server = start_server(repository=repo, state_dir=Path(tmp) / "state")
        try:
            clients = [grpcclient.InferenceServerClient(server.url) for _ in range(max(args.concurrency))]
            requests = triton_requests(feeds, len(clients))

            def raw(i: int) -> None:
                session.run(outputs, feeds)

            def served(i: int) -> None:
                clients[i].infer("bench", requests[i])

            # Same answer on both sides before timing anything.
            expected = session.run(outputs, feeds)[0]
            got = clients[0].infer("bench", requests[0]).as_numpy(outputs[0])
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

            # The transport floor: a no-op RPC (ServerLive) from the same client, so the table can
            # tell what the Python gRPC stack costs from what tegrad adds on top of it.
            _drive(1, args.warmup, lambda i: clients[0].is_server_live())
            _, floor_lat = _drive(1, args.seconds, lambda i: clients[0].is_server_live())
            rows = []
            for c in args.concurrency:
                # Alternate raw and served cells; a shared 2-core VM drifts, and medians over
                # alternating rounds keep the drift out of the ratio.
                cells = []
                for _ in range(args.rounds):
                    _drive(c, args.warmup, raw)
                    raw_tput, raw_lat = _drive(c, args.seconds, raw)
                    raw_cpu = _drive.cpu[0]
                    _drive(c, args.warmup, served)
                    srv_tput, srv_lat = _drive(c, args.seconds, served, server.proc.pid)
                    cells.append((raw_tput, srv_tput, raw_lat, srv_lat, raw_cpu, *_drive.cpu))
                med = [float(np.median([cell[k] for cell in cells])) for k in (0, 1, 4, 5, 6)]
                rows.append((c, med[0], med[1], np.concatenate([cell[2] for cell in cells]),
                             np.concatenate([cell[3] for cell in cells]), med[2], med[3], med[4],
                             float(np.median([cell[1] / cell[0] for cell in cells]))))
        finally:
            rc = server.stop()
            if rc != 0:
                print(server.log(), file=sys.stderr)

    print(f"\nmodel {args.model.name}, batch {args.batch}, {args.rounds} alternating rounds of {args.seconds:.0f} s per cell "
          f"(throughput, ratio and CPU: medians; latency: all rounds), tegrad config: {args.config.strip()!r}")
    header = (f"{'conc':>4} {'raw inf/s':>10} {'tegrad inf/s':>12} {'ratio':>6} {'raw p50 ms':>10} {'raw p99 ms':>10} "
              f"{'tegrad p50 ms':>13} {'tegrad p99 ms':>13} {'added p50 ms':>12} {'CPU ms/inf raw':>14} "
              f"{'server':>7} {'client':>7}")
    print(header)
    print("-" * len(header))
    for c, rt, st, rl, sl, raw_cpu, client_cpu, server_cpu, ratio in rows:
        rp50, rp99, sp50, sp99 = (np.percentile(x, q) * 1000 for x, q in ((rl, 50), (rl, 99), (sl, 50), (sl, 99)))
        print(f"{c:>4} {rt * args.batch:>10.1f} {st * args.batch:>12.1f} {ratio:>6.2f} {rp50:>10.3f} {rp99:>10.3f} "
              f"{sp50:>13.3f} {sp99:>13.3f} {sp50 - rp50:>12.3f} {raw_cpu:>14.3f} {server_cpu:>7.3f} {client_cpu:>7.3f}")
    print("CPU ms/inf: CPU time per inference of the raw session.run loop, of the tegrad server process, and of\n"
          "the tritonclient threads; with both cores busy, throughput ratio <= raw / (server + client).")
    floor = float(np.percentile(floor_lat, 50)) * 1000
    c1 = next((r for r in rows if r[0] == 1), None)
    print(f"gRPC round trip of a no-op RPC (ServerLive, same client, concurrency 1): p50 {floor:.3f} ms")
    if c1 is not None:
        added = (np.percentile(c1[4], 50) - np.percentile(c1[3], 50)) * 1000
        print(f"concurrency 1: tegrad adds {added:.3f} ms p50, of which {added - floor:.3f} ms above the no-op RPC")
    return 0


if __name__ == "__main__":
    sys.exit(main())
