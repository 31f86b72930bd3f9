"""Overload: what a refused request costs the server, side by side in one run.

A slow model with ``max_queue_size = 8`` is kept full by 9 blocker threads (one
request running for tens of seconds, eight queued, each re-sent as it
finishes). Then C client threads send requests of the same size for a fixed
time, in turn:

- queue full: to the full model: RESOURCE_EXHAUSTED from the request's first
  bytes (admission before the parse). The request has a wrong shape, so in the
  instant a blocker finishes one that slips in is refused after its parse
  (INVALID_ARGUMENT, shown in the codes) instead of running;
- parsed, then refused: to the digits model with a wrong shape: INVALID_ARGUMENT
  after the full parse and decode (what every refusal cost before admission
  moved ahead of the parse).

Server CPU comes from /proc/<pid>/stat, less the rate measured while only the
blockers run. Prints CPU ms per refusal, refusals/s and client latency
p50/p99 for each, and the ratio.

    python bench/overload.py                       # c=64, 64 KiB and 4 MiB requests, 5 s each
    python bench/overload.py --concurrency 16 --seconds 10 --sizes-kib 16,1024

On a 2-core machine the client threads share the cores with the server; the
CPU figures are the server's alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tables import say, table  # noqa: E402
from tests import onnx_models  # noqa: E402
from tests.interop.conftest import DIGITS, start_server  # noqa: E402  (tritonclient side, no daemon.protogen)

QUEUE = 8
SERVICE = "/inference.GRPCInferenceService/"
BLOCKER_ROWS = 16384  # ~140 GFLOP: tens of seconds on one core, so the queue stays full


def _wait_queue_full(server, timeout: float = 120.0) -> None:
    import urllib.request

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        if f'tegrad_queue_depth{{model="slow",version="1"}} {float(QUEUE)}' in text:
            return
        time.sleep(0.1)
    raise SystemExit("the slow model's queue did not fill")


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _payload(model: str, input_name: str, shape: list[int], nbytes: int, pb) -> bytes:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=shape)
    request.raw_input_contents.append(bytes(nbytes))
    return request.SerializeToString()


def _drive(call, payload: bytes, concurrency: int, seconds: float):
    """``call(payload)`` from N threads for ``seconds``: (codes, first detail per code, latencies, wall)."""
    import grpc

    codes: dict[str, int] = {}
    details: dict[str, str] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker() -> None:
        mine = []
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                call(payload, timeout=60)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                details.setdefault(code, exc.details())
            mine.append((code, time.perf_counter() - t0))
        with lock:
            for code, dt in mine:
                codes[code] = codes.get(code, 0) + 1
                latencies.append(dt)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes, details, latencies, time.monotonic() - t0


def _handler_work(sizes_kib: list[int], repeat: int = 200) -> list[list[str]]:
    """The server-side work of a refusal from the first bytes (peek at the name) vs a
    full parse, in-process; run in a process of its own (tegrad's protos clash with
    tritonclient's in one)."""
    from daemon.protogen import grpc_service_pb2 as tpb
    from daemon.server import wire

    rows = []
    for kib in sizes_kib:
        data = _payload("slow", "x", [max(1, (kib << 10) // 1024), 256], kib << 10, tpb)
        t0 = time.process_time()
        for _ in range(repeat):
            bytes(wire.peek(data).model_name).decode()
        peek = (time.process_time() - t0) / repeat
        t0 = time.process_time()
        for _ in range(repeat):
            parsed = wire.parse(tpb.ModelInferRequest, data)
            arrays = [np.frombuffer(b, np.float32) for b in parsed.raw_input_contents]
            del parsed, arrays
        full = (time.process_time() - t0) / repeat
        rows.append([f"{kib} KiB", f"{peek * 1e3:.4f}", f"{full * 1e3:.4f}", f"{full / peek:.0f}x"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement window (default: %(default)s)")
    parser.add_argument("--sizes-kib", default="64,4096", help="request sizes (default: %(default)s)")
    parser.add_argument("--grpc-max-concurrent-streams", type=int, default=256, help="passed to tegrad serve (default: %(default)s)")
    parser.add_argument("--handler-work", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_kib.split(",")]
    if args.handler_work:
        say(table(["size", "peek at model name ms", "full parse ms", "ratio"], _handler_work(sizes)))
        return 0

    import subprocess

    import grpc
    from tritonclient.grpc import service_pb2 as pb

    say("server-side work of one refusal, in-process, without gRPC (CPU time):")
    subprocess.run([sys.executable, __file__, "--handler-work", "--sizes-kib", args.sizes_kib], check=True)

    work = Path(tempfile.mkdtemp(prefix="tegrad-overload-"))
    repo = work / "repo"
    shutil.copytree(DIGITS, repo / "digits", ignore=shutil.ignore_patterns("data", "README.md"))
    onnx_models.slow(repo / "slow" / "1" / "model.onnx", loops=64, size=256)
    (repo / "slow" / "config.toml").write_text(
        f"max_batch = 0\n[dynamic_batching]\nmax_queue_size = {QUEUE}\n[onnxruntime]\nintra_op_threads = 1\n")
    server = start_server(repository=repo, state_dir=work / "state", args=("--drain-timeout", "1", "--grpc-max-concurrent-streams", str(args.grpc_max_concurrent_streams)))
    stop = threading.Event()
    try:
        channel = grpc.insecure_channel(server.url, options=[("grpc.max_send_message_length", 64 << 20),
                                                             ("grpc.max_receive_message_length", 64 << 20)])
        infer = channel.unary_unary(SERVICE + "ModelInfer", request_serializer=None, response_deserializer=None)
        live = channel.unary_unary(SERVICE + "ServerLive", request_serializer=None, response_deserializer=None)
        blocker = _payload("slow", "x", [BLOCKER_ROWS, 256], BLOCKER_ROWS * 256 * 4, pb)

        def block() -> None:
            while not stop.is_set():
                try:
                    infer(blocker, timeout=120)
                except grpc.RpcError:
                    time.sleep(0.01)

        for _ in range(QUEUE + 1):  # one running, QUEUE waiting
            threading.Thread(target=block, daemon=True).start()
        _wait_queue_full(server)

        def idle_rate() -> float:
            c0, t0 = _cpu_seconds(server.proc.pid), time.monotonic()
            time.sleep(args.seconds)
            return (_cpu_seconds(server.proc.pid) - c0) / (time.monotonic() - t0)

        rates = [idle_rate()]
        cases = [("-", "ServerLive (an empty call)", live, b"")]
        for kib in sizes:
            n = max(1, (kib << 10) // 1024)
            cases.append((f"{kib} KiB", "queue full: refused unparsed", infer, _payload("slow", "x", [n, 257], kib << 10, pb)))
            cases.append((f"{kib} KiB", "wrong shape: parsed, refused", infer,
                          _payload("digits", "input", [n, 1, 8, 9], kib << 10, pb)))
        rows, per = [], {}
        for size, label, call, payload in cases:
            c0 = _cpu_seconds(server.proc.pid)
            codes, details, lat, wall = _drive(call, payload, args.concurrency, args.seconds)
            cpu = _cpu_seconds(server.proc.pid) - c0
            answered = sum(codes.values())
            net_ms = max(0.0, cpu - rates[0] * wall) * 1e3 / max(1, answered)
            per[(size, label)] = net_ms
            lat_ms = np.array(lat) * 1e3
            rows.append([size, label, answered, f"{answered / wall:.0f}", f"{net_ms:.3f}",
                         f"{np.percentile(lat_ms, 50):.2f}", f"{np.percentile(lat_ms, 99):.2f}",
                         " ".join(f"{k}={v}" for k, v in sorted(codes.items()))])
            for code, detail in details.items():
                say(f"  {size} {label}: {code}: {detail[:120]}")
        rates.append(idle_rate())
        say()
        say(f"tegrad overload: c={args.concurrency}, {args.seconds:.0f} s per case, the slow model's queue ({QUEUE}) "
            f"kept full; server CPU of the blockers alone {rates[0]:.2f} then {rates[1]:.2f} cores (subtracted)")
        say(table(["size", "case", "answered", "per s", "server CPU ms/call", "client p50 ms", "p99 ms", "codes"], rows))
        floor = per[("-", "ServerLive (an empty call)")]
        for kib in sizes:
            early = per[(f"{kib} KiB", "queue full: refused unparsed")]
            late = per[(f"{kib} KiB", "wrong shape: parsed, refused")]
            say(f"{kib} KiB: refused unparsed {early:.3f} ms server CPU ({early - floor:+.3f} over an empty call), "
                f"parsed then refused {late:.3f} ms ({late - floor:+.3f})")
    finally:
        stop.set()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
