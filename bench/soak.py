"""Soak and overload: tegrad under a steady mix of good and hostile requests, then the cost of a
rejection when the queue is full.

Soak: 64 concurrent clients for ``--seconds`` (default 60) against EfficientNet-Lite0 with
``[preprocess]`` (center-crop) and classification, from a temporary repository. Most requests are
real ImageNet JPEGs; the rest are corrupt images, tensors of the wrong shape, unknown models and
messages above ``--max-message-bytes``. Every 5 s it prints served/s, the count of each status,
p50/p99 of the served requests and the server's RSS; at the end the RSS growth from 10 s to the
end, which must stay below 5 % (exit status 1 otherwise).

Overload (issue 10, row 13): the same model with ``max_queue_size = 8`` and 64 clients. The
server's CPU (utime + stime from /proc/<pid>/stat) is measured over an idle spell, a baseline of 4
clients (nothing rejected) and the overload run; CPU per rejection = (overload CPU - idle CPU -
served x baseline CPU per served) / rejections. Rejected clients retry after ``--backoff-ms``.

    python bench/soak.py                       # 60 s soak, then the overload figures
    python bench/soak.py --seconds 30 --overload-seconds 15
    python bench/soak.py --skip-overload

The client is one asyncio process (grpc.aio, pre-serialized requests, responses not decoded
beyond their status) so it leaves the server most of the CPU; its own CPU is printed beside the
server's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.interop.conftest import start_server  # noqa: E402  (tritonclient-side helpers, no daemon.protogen)

ZOO = ROOT.parent / "shared" / "zoo"
SERVICE = "/inference.GRPCInferenceService/ModelInfer"
INTERVAL_S = 5.0
RSS_FROM_S = 10.0
MAX_RSS_GROWTH = 0.05

CONFIG = """max_batch = 8
instances = 2

[dynamic_batching]
max_queue_delay_us = 2000
max_queue_size = {queue}

[preprocess]
input = "image"
size = [224, 224]
resize = "center-crop"
resize_short = 256
color = "RGB"
mean = 127.0
std = 128.0
layout = "NCHW"

[postprocess]
kind = "classification"
softmax = true
top_k = 5
labels = "labels.txt"

[[output]]
name = "logits"
datatype = "FP32"
dims = [1000]
labels = "labels.txt"
"""


def _frame(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def make_repository(root: Path) -> None:
    labels = [line.split(" ", 1)[1].split(",")[0] for line in
              (ZOO / "labels" / "imagenet_synset_words.txt").read_text().splitlines()]
    for name, queue in (("effnet", 256), ("effnet_q8", 8)):
        (root / name / "1").mkdir(parents=True)
        shutil.copy(ZOO / "models" / "efficientnet-lite0.onnx", root / name / "1" / "model.onnx")
        (root / name / "labels.txt").write_text("\n".join(labels) + "\n")
        (root / name / "config.toml").write_text(CONFIG.format(queue=queue))


@dataclass
class Mix:
    """Pre-serialized requests by kind; ``weights`` is how often each kind is sent."""

    requests: dict[str, list[bytes]]
    weights: dict[str, int]

    def schedule(self) -> list[str]:
        return [kind for kind, w in self.weights.items() for _ in range(w)]


def build_mix(model: str, max_message_bytes: int, images: int = 32) -> Mix:
    from tritonclient.grpc import service_pb2 as pb

    def images_request(blobs: list[bytes], name: str = model) -> bytes:
        r = pb.ModelInferRequest(model_name=name)
        r.inputs.add(name="image", datatype="BYTES", shape=[len(blobs)])
        r.raw_input_contents.append(_frame(*blobs))
        return r.SerializeToString()

    jpegs = [p.read_bytes() for p in sorted((ZOO / "images" / "imagenet_eval").glob("*.JPEG"))[:images]]
    rng = np.random.default_rng(0)
    wrong_shape = pb.ModelInferRequest(model_name=model)
    wrong_shape.inputs.add(name="input", datatype="FP32", shape=[1, 3, 100, 100])
    wrong_shape.raw_input_contents.append(np.zeros((1, 3, 100, 100), np.float32).tobytes())
    short_data = pb.ModelInferRequest(model_name=model)
    short_data.inputs.add(name="input", datatype="FP32", shape=[1, 3, 224, 224])
    short_data.raw_input_contents.append(np.zeros(3 * 224 * 224 - 1, np.float32).tobytes())
    requests = {
        "good": [images_request([j]) for j in jpegs],
        "bad_image": [
            images_request([jpegs[0][: len(jpegs[0]) // 2]]),  # truncated JPEG
            images_request([rng.bytes(2000)]),  # junk
            images_request([b"\x89PNG\r\n\x1a\n" + rng.bytes(200)]),  # a PNG signature and nothing valid
            images_request([b"GIF89a" + bytes(32)]),  # unsupported format
            images_request([jpegs[1], b""]),  # a good image beside an empty one
        ],
        "wrong_shape": [wrong_shape.SerializeToString(), short_data.SerializeToString()],
        "unknown_model": [images_request([jpegs[2]], name="no_such_model")],
        "oversize": [images_request([rng.bytes(max_message_bytes + 1024)])],
    }
    return Mix(requests, {"good": 80, "bad_image": 8, "wrong_shape": 5, "unknown_model": 4, "oversize": 3})


# -- measurement --------------------------------------------------------------------------------


def server_cpu_s(pid: int) -> float:
    """utime + stime of the server process (and of children it has waited for)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / ticks


def server_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def client_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class Tally:
    codes: Counter = field(default_factory=Counter)
    latency_ms: dict[str, list[float]] = field(default_factory=dict)

    def add(self, code: str, ms: float) -> None:
        self.codes[code] += 1
        self.latency_ms.setdefault(code, []).append(ms)

    def percentiles(self, code: str) -> tuple[float, float]:
        values = self.latency_ms.get(code)
        if not values:
            return float("nan"), float("nan")
        p50, p99 = np.percentile(values, [50, 99])
        return float(p50), float(p99)


async def drive(url: str, mix: Mix, concurrency: int, seconds: float, *, kinds: list[str] | None = None,
                backoff_s: float = 0.0, on_interval=None) -> Tally:
    """``concurrency`` closed-loop clients for ``seconds``; returns the whole run's tally and calls
    ``on_interval(elapsed, interval_tally)`` every INTERVAL_S."""
    import grpc

    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    total, interval = Tally(), Tally()
    schedule = kinds or mix.schedule()
    start = time.monotonic()
    end = start + seconds
    async with grpc.aio.insecure_channel(url, options=options) as channel:
        call = channel.unary_unary(SERVICE)

        async def client(i: int) -> None:
            n = i
            while time.monotonic() < end:
                kind = schedule[(n * 7919) % len(schedule)]
                pool = mix.requests[kind]
                blob = pool[n % len(pool)]
                n += concurrency
                t0 = time.perf_counter()
                try:
                    await call(blob, timeout=60)
                    code = "OK"
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
                ms = (time.perf_counter() - t0) * 1e3
                total.add(code, ms)
                interval.add(code, ms)
                if code == "RESOURCE_EXHAUSTED" and backoff_s and kind != "oversize":
                    await asyncio.sleep(backoff_s)

        async def ticker() -> None:
            nonlocal interval
            tick = start + INTERVAL_S
            while tick <= end + 0.01:
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
                done, interval = interval, Tally()
                if on_interval is not None:
                    on_interval(tick - start, done)
                tick += INTERVAL_S

        await asyncio.gather(ticker(), *(client(i) for i in range(concurrency)))
    return total


# -- the two runs -------------------------------------------------------------------------------


def soak(server, args) -> bool:
    pid = server.proc.pid
    mix = build_mix("effnet", args.max_message_bytes)
    rss: list[tuple[float, float]] = [(0.0, server_rss_mb(pid))]
    cpu0, ccpu0 = server_cpu_s(pid), client_cpu_s()
    print(f"\nsoak: c={args.concurrency} for {args.seconds:.0f} s on EfficientNet-Lite0 (center-crop, classification); "
          f"mix {mix.weights}")
    print(f"{'t s':>5} {'served/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>8} {'srv CPU':>8} {'cli CPU':>8}  codes")
    last = {"t": 0.0, "cpu": cpu0, "ccpu": ccpu0}

    def report(t: float, tally: Tally) -> None:
        mb = server_rss_mb(pid)
        rss.append((t, mb))
        cpu, ccpu = server_cpu_s(pid), client_cpu_s()
        dt = t - last["t"]
        p50, p99 = tally.percentiles("OK")
        codes = " ".join(f"{k}={v}" for k, v in sorted(tally.codes.items()))
        print(f"{t:5.0f} {tally.codes['OK'] / dt:9.1f} {p50:8.0f} {p99:8.0f} {mb:8.0f} "
              f"{(cpu - last['cpu']) / dt:7.0%} {(ccpu - last['ccpu']) / dt:7.0%}  {codes}", flush=True)
        last.update(t=t, cpu=cpu, ccpu=ccpu)

    total = asyncio.run(drive(server.url, mix, args.concurrency, args.seconds, on_interval=report))
    p50, p99 = total.percentiles("OK")
    print(f"total: {total.codes['OK'] / args.seconds:.1f} served/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
          + ", ".join(f"{k} {v}" for k, v in sorted(total.codes.items())))
    bad = sorted(set(total.codes) - {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"})
    if bad:
        print(f"unexpected status codes: {bad}")
    base = next((mb for t, mb in rss if t >= RSS_FROM_S), rss[-1][1])
    growth = (rss[-1][1] - base) / base
    ok = growth < MAX_RSS_GROWTH and not bad
    print(f"server RSS {base:.0f} MB at {RSS_FROM_S:.0f} s -> {rss[-1][1]:.0f} MB at the end: {growth:+.1%} "
          f"(must be < {MAX_RSS_GROWTH:.0%}): {'ok' if growth < MAX_RSS_GROWTH else 'FAIL'}")
    return ok


def overload(server, args) -> None:
    pid = server.proc.pid
    mix = build_mix("effnet_q8", args.max_message_bytes)
    good = ["good"]

    def measure(concurrency: int, seconds: float) -> tuple[Tally, float, float, float]:
        cpu, ccpu, t0 = server_cpu_s(pid), client_cpu_s(), time.monotonic()
        tally = asyncio.run(drive(server.url, mix, concurrency, seconds, kinds=good, backoff_s=args.backoff_ms / 1e3))
        wall = time.monotonic() - t0
        return tally, server_cpu_s(pid) - cpu, client_cpu_s() - ccpu, wall

    cpu, t0 = server_cpu_s(pid), time.monotonic()
    time.sleep(args.idle_seconds)
    idle_rate = (server_cpu_s(pid) - cpu) / (time.monotonic() - t0)
    base, base_cpu, base_ccpu, base_wall = measure(4, args.overload_seconds)
    served_ms = (base_cpu - idle_rate * base_wall) / max(base.codes["OK"], 1) * 1e3
    over, over_cpu, over_ccpu, over_wall = measure(args.concurrency, args.overload_seconds)
    rejected = over.codes["RESOURCE_EXHAUSTED"]
    reject_ms = (over_cpu - idle_rate * over_wall - over.codes["OK"] * served_ms / 1e3) / max(rejected, 1) * 1e3
    r50, r99 = over.percentiles("RESOURCE_EXHAUSTED")
    s50, s99 = over.percentiles("OK")
    print(f"\noverload: max_queue_size = 8, c={args.concurrency}, {args.overload_seconds:.0f} s, "
          f"rejected clients retry after {args.backoff_ms:g} ms")
    print(f"idle server CPU {idle_rate * 1e3:.1f} ms/s")
    print(f"baseline c=4: {base.codes['OK']} served ({base.codes['OK'] / base_wall:.1f}/s), "
          f"{dict(base.codes)}, server CPU {served_ms:.1f} ms per served request, "
          f"client CPU {base_ccpu / base_wall:.0%}")
    total = sum(over.codes.values())
    print(f"overload c={args.concurrency}: {total} requests, {over.codes['OK']} served, {rejected} rejected "
          f"({rejected / max(total, 1):.0%}), {dict(over.codes)}; server CPU {over_cpu / over_wall:.0%}, "
          f"client CPU {over_ccpu / over_wall:.0%}")
    print(f"server CPU per rejection: {reject_ms:.2f} ms")
    print(f"client latency of a rejection: p50 {r50:.1f} ms, p99 {r99:.1f} ms (served: p50 {s50:.0f} ms, p99 {s99:.0f} ms)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="soak duration (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent clients (default: %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024,
                   help="the server's limit; the oversize requests exceed it (default: %(default)s)")
    p.add_argument("--overload-seconds", type=float, default=15.0, help="baseline and overload runs (default: %(default)s)")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="idle spell for the CPU baseline (default: %(default)s)")
    p.add_argument("--backoff-ms", type=float, default=10.0,
                   help="a rejected client waits this long before its next request (default: %(default)s)")
    p.add_argument("--skip-overload", action="store_true")
    p.add_argument("--skip-soak", action="store_true")
    args = p.parse_args()
    if not (ZOO / "models" / "efficientnet-lite0.onnx").exists():
        print(f"needs the benchmark zoo at {ZOO}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tegrad-soak-") as tmp:
        repo = Path(tmp) / "repo"
        make_repository(repo)
        server = start_server(repository=repo, state_dir=Path(tmp) / "state", timeout=600,
                              args=("--max-message-bytes", str(args.max_message_bytes)))
        try:
            print(f"tegrad pid {server.proc.pid} on {server.url}; RSS after load {server_rss_mb(server.proc.pid):.0f} MB")
            ok = True if args.skip_soak else soak(server, args)
            if not args.skip_overload:
                overload(server, args)
        finally:
            rc = server.stop()
        if rc != 0:
            print(f"tegrad exited with {rc}:\n{server.log()[-3000:]}")
            return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
