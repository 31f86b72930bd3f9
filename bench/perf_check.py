"""``tegrad perf`` against ``bench/serve_overhead.py``'s tritonclient threads, side by side on one server.

One tegrad serves the model; for each concurrency level, alternating rounds run
serve_overhead's driver (N threads, each with its own tritonclient, for a fixed
time) and then ``tegrad perf --concurrency N`` (its own process, stable
windows). Prints both throughputs, their ratio (perf / serve_overhead) and both
latency percentiles: the load generator should measure what the benchmark
measures.

    python bench/perf_check.py --model ../shared/zoo/models/efficientnet-lite0.onnx
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_overhead import _drive, _inputs, bench_repository, triton_requests  # noqa: E402
from tests.interop.conftest import DIGITS, start_server  # noqa: E402


def _perf(url: str, concurrency: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "daemon", "perf", "bench", "--url", url, "--concurrency", str(concurrency),
           "--batch-size", str(args.batch), "--measurement-interval", str(args.window_ms), "--warmup",
           str(args.warmup), "--json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode not in (0, 1):  # 1: a level did not stabilise; its figures still come back
        raise SystemExit(f"tegrad perf failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return json.loads(out.read_text())["results"][0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DIGITS / "1" / "model.onnx")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=8.0, help="serve_overhead's time per cell")
    parser.add_argument("--window-ms", type=int, default=3000, help="tegrad perf's measurement window")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", default="max_batch = 8\ninstances = 1\n")
    args = parser.parse_args()

    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    feeds = _inputs(session, args.batch, np.random.default_rng(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = bench_repository(Path(tmp), args.model, args.config)
        server = start_server(repository=repo, state_dir=Path(tmp) / "state")
        try:
            clients = [grpcclient.InferenceServerClient(server.url) for _ in range(max(args.concurrency))]
            requests = triton_requests(feeds, len(clients))

            def served(i: int) -> None:
                clients[i].infer("bench", requests[i])

            for c in args.concurrency:
                cells = []
                for k in range(args.rounds):
                    _drive(c, args.warmup, served)
                    tput, lat = _drive(c, args.seconds, served)
                    perf = _perf(server.url, c, args, Path(tmp) / f"perf-{c}-{k}.json")
                    cells.append((tput * args.batch, lat, perf))
                lat = np.concatenate([cell[1] for cell in cells]) * 1e3
                rows.append((c, float(np.median([cell[0] for cell in cells])),
                             float(np.median([cell[2]["throughput_ips"] for cell in cells])),
                             float(np.median([cell[2]["throughput_ips"] / cell[0] for cell in cells])),
                             float(np.percentile(lat, 50)), float(np.percentile(lat, 99)),
                             float(np.median([cell[2]["latency_p50_us"] for cell in cells])) / 1e3,
                             float(np.median([cell[2]["latency_p99_us"] for cell in cells])) / 1e3,
                             float(np.median([cell[2]["client_cpu_pct"] for cell in cells])),
                             all(cell[2]["stable"] for cell in cells)))
        finally:
            rc = server.stop()
            if rc != 0:
                print(server.log(), file=sys.stderr)

    print(f"\nmodel {args.model.name}, batch {args.batch}, {args.rounds} alternating rounds per level (medians), "
          f"tegrad config {args.config.strip()!r}")
    header = (f"{'conc':>4} {'overhead inf/s':>14} {'perf inf/s':>10} {'ratio':>6} {'overhead p50':>12} "
              f"{'overhead p99':>12} {'perf p50':>9} {'perf p99':>9} {'perf CPU':>8} stable")
    print(header)
    print("-" * len(header))
    for c, ot, pt, ratio, op50, op99, pp50, pp99, cpu, stable in rows:
        print(f"{c:>4} {ot:>14.1f} {pt:>10.1f} {ratio:>6.2f} {op50:>9.3f} ms {op99:>9.3f} ms {pp50:>6.3f} ms "
              f"{pp99:>6.3f} ms {cpu:>7.0f}% {'yes' if stable else 'NO'}")
    print("ratio: tegrad perf's throughput / serve_overhead's tritonclient threads on the same server, per round.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
