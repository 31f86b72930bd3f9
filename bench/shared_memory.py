"""1920x1080 raw frames as gRPC bytes vs through system shared memory, side by side.

One ``tegrad serve --allow-shared-memory`` (a separate process on loopback) serves two models
that take raw BGR frames, UINT8 [N, 1080, 1920, 3]:

- ``transfer``: a graph that reads one pixel, so the server's work is the transfer itself
  (gRPC receive and protobuf decode, or the shared-memory read) plus the fixed per-request cost;
- ``effnet``: EfficientNet-Lite0 from the zoo behind the center-crop preprocessing
  (short side 256, crop 224, RGB, (x - 127) / 128) and top-5 classification.

For each model and concurrency (N client threads, each with its own tritonclient and, for the
shared-memory side, its own input and output regions), the bytes side and the shared-memory
side run one after the other on the same frames, in alternating order over the rounds.
Each request first puts a new frame where the server will read it (set_data_from_numpy, or a
copy into the client's region: what a camera app does either way). Printed: throughput, client
p50/p99 latency, and server CPU per request (utime + stime of the daemon from /proc/<pid>/stat).

    python bench/shared_memory.py
    python bench/shared_memory.py --seconds 10 --rounds 3 --concurrency 1,4

On a 2-core machine the client threads share the cores with the server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.tables import say, table  # noqa: E402
from tests.interop.conftest import start_server  # noqa: E402  (tritonclient-side helpers, no daemon.protogen)

ZOO = ROOT.parent / "shared" / "zoo"
H, W = 1080, 1920
FRAME_BYTES = H * W * 3
OUT_BYTES = 4096

EFFNET_CONFIG = """backend = "onnxruntime"
max_batch = 4
instances = 2

[onnxruntime]
intra_op_threads = 1

[preprocess]
input = "frames"
format = "raw"
size = [224, 224]
resize = "center-crop"
resize_short = 256
color = "RGB"
mean = 127.0
std = 128.0
layout = "NCHW"

[postprocess]
kind = "classification"
top_k = 5
softmax = true
"""

TRANSFER_CONFIG = """backend = "onnxruntime"
max_batch = 4
instances = 2

[onnxruntime]
intra_op_threads = 1
"""


def _transfer_model(path: Path) -> None:
    """frames UINT8 [N,1080,1920,3] -> pixel UINT8 [N,1,1,3]: the top-left pixel of each frame."""
    import onnx
    from onnx import TensorProto, helper

    const = [helper.make_tensor(n, TensorProto.INT64, [4], v) for n, v in
             (("starts", [0, 0, 0, 0]), ("ends", [2**62, 1, 1, 3]))]
    graph = helper.make_graph(
        [helper.make_node("Slice", ["frames", "starts", "ends"], ["pixel"])], "transfer",
        [helper.make_tensor_value_info("frames", TensorProto.UINT8, ["N", H, W, 3])],
        [helper.make_tensor_value_info("pixel", TensorProto.UINT8, ["N", 1, 1, 3])], initializer=const)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def _repo(root: Path, effnet: Path | None) -> Path:
    (root / "transfer" / "1").mkdir(parents=True)
    _transfer_model(root / "transfer" / "1" / "model.onnx")
    (root / "transfer" / "config.toml").write_text(TRANSFER_CONFIG)
    if effnet is not None:
        (root / "effnet" / "1").mkdir(parents=True)
        shutil.copy(effnet, root / "effnet" / "1" / "model.onnx")
        (root / "effnet" / "config.toml").write_text(EFFNET_CONFIG)
    return root


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Worker:
    """One client thread's connection and, for the shared-memory side, its two regions."""

    def __init__(self, url: str, index: int, model: str, outputs: list[str]) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.utils.shared_memory as shm

        self.grpc, self.shm = grpcclient, shm
        self.client = grpcclient.InferenceServerClient(url)
        self.model, self.outputs = model, outputs
        tag = uuid.uuid4().hex[:8]
        self.in_name, self.out_name = f"bench_in_{index}_{tag}", f"bench_out_{index}_{tag}"
        self.in_region = shm.create_shared_memory_region(self.in_name, "/" + self.in_name, FRAME_BYTES)
        self.out_region = shm.create_shared_memory_region(self.out_name, "/" + self.out_name, OUT_BYTES)
        self.client.register_system_shared_memory(self.in_name, "/" + self.in_name, FRAME_BYTES)
        self.client.register_system_shared_memory(self.out_name, "/" + self.out_name, OUT_BYTES)
        # The app's own view of its input region: a frame is written straight into it.
        self.frame_view = np.ndarray((1, H, W, 3), np.uint8, buffer=self.in_region._mpsm_handle.buf)

    def request(self, frame: np.ndarray, use_shm: bool):
        g = self.grpc
        inp = g.InferInput("frames", [1, H, W, 3], "UINT8")
        outs = [g.InferRequestedOutput(name) for name in self.outputs]
        if use_shm:
            np.copyto(self.frame_view, frame)
            inp.set_shared_memory(self.in_name, FRAME_BYTES)
            for i, out in enumerate(outs):
                out.set_shared_memory(self.out_name, OUT_BYTES // len(outs), offset=i * (OUT_BYTES // len(outs)))
        else:
            inp.set_data_from_numpy(frame)
        return self.client.infer(self.model, [inp], outputs=outs)

    def close(self) -> None:
        self.client.unregister_system_shared_memory(self.in_name)
        self.client.unregister_system_shared_memory(self.out_name)
        self.client.close()
        del self.frame_view
        self.shm.destroy_shared_memory_region(self.in_region)
        self.shm.destroy_shared_memory_region(self.out_region)


def _run(workers: list[Worker], frames: list[np.ndarray], use_shm: bool, seconds: float, pid: int) -> dict:
    latencies: list[list[float]] = [[] for _ in workers]
    errors: list[BaseException] = []
    start = threading.Barrier(len(workers) + 1)
    stop_at = [0.0]

    def loop(i: int) -> None:
        start.wait()
        n = 0
        try:
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                workers[i].request(frames[(i + n) % len(frames)], use_shm)
                latencies[i].append(time.perf_counter() - t0)
                n += 1
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - t0, _cpu_seconds(pid) - cpu0
    if errors:
        raise errors[0]
    flat = sorted(x for per in latencies for x in per)
    return {"n": len(flat), "seconds": elapsed, "cpu": cpu, "lat": flat}


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="per side, per round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating bytes/shm rounds (default: %(default)s)")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated client threads (default: %(default)s)")
    parser.add_argument("--models", default="transfer,effnet", help="transfer and/or effnet (default: %(default)s)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    models = args.models.split(",")
    effnet = ZOO / "models" / "efficientnet-lite0.onnx"
    if "effnet" in models and not effnet.exists():
        say(f"{effnet} is missing: running the transfer model only")
        models = [m for m in models if m != "effnet"]

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (1, H, W, 3), dtype=np.uint8) for _ in range(4)]
    outputs = {"transfer": ["pixel"], "effnet": ["scores", "classes"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = _repo(Path(tmp) / "repo", effnet if "effnet" in models else None)
        server = start_server(repository=repo, state_dir=Path(tmp) / "state", timeout=1800,
                              args=("--allow-shared-memory", "--shared-memory-max-mb", "256"))
        pid = server.proc.pid
        say(f"tegrad pid {pid} serving {', '.join(models)}; {args.rounds} round(s) of {args.seconds:.0f} s per side")
        try:
            for model in models:
                for conc in levels:
                    workers = [Worker(server.url, i, model, outputs[model]) for i in range(conc)]
                    try:
                        for w in workers:  # warm-up, and a check that both sides agree
                            a, b = w.request(frames[0], False), w.request(frames[0], True)
                            name = outputs[model][0]
                            got = w.shm.get_contents_as_numpy(w.out_region, a.as_numpy(name).dtype,
                                                              a.as_numpy(name).shape)
                            assert np.array_equal(got, a.as_numpy(name)), f"{model}: shm and bytes answers differ"
                            assert b.get_response().raw_output_contents[0] == b""
                        totals = {False: [], True: []}
                        for r in range(args.rounds):
                            for use_shm in ((False, True) if r % 2 == 0 else (True, False)):
                                totals[use_shm].append(_run(workers, frames, use_shm, args.seconds, pid))
                    finally:
                        for w in workers:
                            w.close()
                    side = {}
                    for use_shm, runs in totals.items():
                        n = sum(x["n"] for x in runs)
                        lat = sorted(v for x in runs for v in x["lat"])
                        side[use_shm] = {
                            "rps": n / sum(x["seconds"] for x in runs),
                            "p50": _pct(lat, 0.50) * 1e3, "p99": _pct(lat, 0.99) * 1e3,
                            "cpu_ms": sum(x["cpu"] for x in runs) / max(n, 1) * 1e3, "n": n,
                        }
                    for use_shm in (False, True):
                        s = side[use_shm]
                        rows.append([model, conc, "system shm" if use_shm else "gRPC bytes", s["n"],
                                     f"{s['rps']:.1f}", f"{s['p50']:.1f}", f"{s['p99']:.1f}", f"{s['cpu_ms']:.2f}",
                                     "" if not use_shm else f"{side[False]['rps'] and s['rps'] / side[False]['rps']:.2f}x",
                                     "" if not use_shm else f"{side[False]['cpu_ms'] / max(s['cpu_ms'], 1e-9):.1f}x"])
                    say(f"  {model} c={conc}: bytes {side[False]['rps']:.1f}/s {side[False]['cpu_ms']:.2f} ms CPU, "
                        f"shm {side[True]['rps']:.1f}/s {side[True]['cpu_ms']:.2f} ms CPU")
        finally:
            rc = server.stop()
            if rc != 0:
                say(server.log())
    say()
    say(f"1920x1080 BGR frames ({FRAME_BYTES / 1e6:.1f} MB), batch 1; server CPU = daemon utime+stime / requests")
    say(table(["model", "conc", "transport", "requests", "req/s", "p50 ms", "p99 ms", "server CPU ms/req",
               "throughput vs bytes", "CPU/req: bytes/shm"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
