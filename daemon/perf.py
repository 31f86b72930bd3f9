"""``tegrad perf MODEL``: a load generator with perf_analyzer's core, on tegrad's own gRPC stubs.

For each load level (a number of concurrent outstanding requests, or a request
rate) it warms up, then measures in windows of ``measurement_interval`` until
the last three windows are stable: their throughput and average latency each
within ``stability`` percent of the three windows' mean (perf_analyzer's rule,
at most ``max_trials`` windows; an unstable level is reported as such). The
reported figures come from those three windows: client latency percentiles and
throughput; the server's per-request queue / compute_input / compute_infer /
compute_output times from the deltas of ModelStatistics over the same windows;
and this process's own CPU use, because a client that saturates its core
measures itself rather than the server.
"""

from __future__ import annotations

import asyncio
import csv
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

STAGES = ("queue", "compute_input", "compute_infer", "compute_output")
CPU_WARNING = 80.0  # percent of one core
_STABLE_WINDOWS = 3


@dataclass
class PerfOptions:
    model: str
    version: str = ""
    url: str = "localhost:8001"
    concurrency: list[int] = field(default_factory=lambda: [1])
    rates: list[float] = field(default_factory=list)  # requests/s; when given, replaces concurrency
    distribution: str = "constant"  # or poisson (rate mode)
    max_outstanding: int = 256  # rate mode: requests in flight before new ones wait
    batch: int = 1
    images: list[str] = field(default_factory=list)
    input_data: list[str] = field(default_factory=list)
    measurement_ms: int = 5000
    stability: float = 10.0
    max_trials: int = 10
    warmup_s: float = 1.0
    timeout_s: float = 30.0


@dataclass
class LevelResult:
    mode: str  # "concurrency" or "rate"
    level: float
    batch: int
    stable: bool
    windows: int
    requests: int
    errors: int
    throughput_rps: float  # requests per second
    throughput_ips: float  # inferences (samples) per second
    latency_avg_us: float
    latency_p50_us: float
    latency_p90_us: float
    latency_p95_us: float
    latency_p99_us: float
    server_requests: int
    server_queue_us: float
    server_compute_input_us: float
    server_compute_infer_us: float
    server_compute_output_us: float
    client_cpu_pct: float
    first_error: str = ""


class PerfError(Exception):
    """The model or the inputs cannot be measured; the message says why."""


# ---- requests -----------------------------------------------------------------------------------
def build_requests(meta, config, opts: PerfOptions, count: int = 32) -> list:
    """Ready ModelInferRequests that cycle over the given images or tensors (random when none)."""
    from daemon import tensor_files
    from daemon.client import random_tensor
    from daemon.engines.base import DATATYPE_TO_NUMPY
    from daemon.protogen import grpc_service_pb2 as pb
    from daemon.server.tensors import serialize_bytes_tensor

    b = opts.batch
    optional = {i.name for i in config.input if i.optional}
    feeds: list[dict[str, np.ndarray]] = []
    try:
        images, tensors = tensor_files.split_paths([*opts.images, *opts.input_data])
    except tensor_files.SampleFileError as exc:
        raise PerfError(str(exc)) from None
    if images:
        names = [t.name for t in meta.inputs if t.datatype == "BYTES"]
        if not names:
            raise PerfError(f"model {meta.name} takes no images (no BYTES input); its inputs are "
                            + ", ".join(t.name for t in meta.inputs))
        blobs = [p.read_bytes() for p in images]
        for i in range(max(1, min(count, len(blobs) // b))):
            batch = np.empty(b, dtype=object)
            for j in range(b):
                batch[j] = blobs[(i * b + j) % len(blobs)]
            feeds.append({names[0]: batch})
    else:
        specs = [t for t in meta.inputs if not (t.name in optional and t.datatype == "BYTES")]
        if tensors:
            try:
                arrays = tensor_files.load_tensors(tensors, [t.name for t in specs])
                arrays = {t.name: tensor_files.fit_shape(
                    np.asarray(arrays[t.name]), [d if d >= 0 else None for d in t.shape[1:]], t.name,
                    "input data").astype(DATATYPE_TO_NUMPY[t.datatype], copy=False) for t in specs}
            except (tensor_files.SampleFileError, ValueError, TypeError) as exc:
                raise PerfError(str(exc)) from None
            n = min(a.shape[0] for a in arrays.values())
            for i in range(min(count, max(1, n // b))):
                rows = [(i * b + j) % n for j in range(b)]
                feeds.append({k: np.ascontiguousarray(a[rows]) for k, a in arrays.items()})
        else:
            rng = np.random.default_rng(0)
            for _ in range(min(count, 8)):
                feeds.append({t.name: random_tensor(t, b, rng) for t in specs})
    requests = []
    for feed in feeds:
        req = pb.ModelInferRequest(model_name=opts.model, model_version=opts.version)
        for name, arr in feed.items():
            datatype = next(t.datatype for t in meta.inputs if t.name == name)
            req.inputs.add(name=name, datatype=datatype, shape=arr.shape)
            req.raw_input_contents.append(serialize_bytes_tensor(arr) if datatype == "BYTES"
                                          else np.ascontiguousarray(arr).tobytes())
        requests.append(req)
    return requests


# ---- measuring ----------------------------------------------------------------------------------
@dataclass
class _Window:
    start: float
    end: float
    latencies: list[float]  # seconds
    errors: int
    stats: dict[str, tuple[int, int]]  # server totals at the window's end: stage -> (count, ns)
    cpu: float  # this process's CPU seconds at the window's end


def _server_totals(stats_response) -> dict[str, tuple[int, int]]:
    out = {k: [0, 0] for k in ("success", *STAGES)}
    for ms in stats_response.model_stats:
        s = ms.inference_stats
        for k in out:
            d = getattr(s, k)
            out[k][0] += d.count
            out[k][1] += d.ns
    return {k: (c, ns) for k, (c, ns) in out.items()}


class _Load:
    """Keeps a load level running and collects completions into the current window."""

    def __init__(self, stub, requests: list, opts: PerfOptions) -> None:
        self.stub = stub
        self.requests = requests
        self.opts = opts
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error = ""
        self._next = 0
        self._stop = False
        self._tasks: list[asyncio.Task] = []

    def _request(self):
        req = self.requests[self._next % len(self.requests)]
        self._next += 1
        return req

    async def _one(self) -> None:
        import grpc

        t0 = time.perf_counter()
        try:
            await self.stub.ModelInfer(self._request(), timeout=self.opts.timeout_s)
        except grpc.RpcError as exc:
            self.errors += 1
            if not self.first_error:
                self.first_error = f"{exc.code().name}: {exc.details()}"
            return
        self.latencies.append(time.perf_counter() - t0)

    async def _closed_loop(self) -> None:
        while not self._stop:
            await self._one()

    async def _open_loop(self, rate: float) -> None:
        rng = np.random.default_rng(0)
        gate = asyncio.Semaphore(self.opts.max_outstanding)
        due = time.perf_counter()

        async def run() -> None:
            try:
                await self._one()
            finally:
                gate.release()

        pending: set[asyncio.Task] = set()
        while not self._stop:
            due += rng.exponential(1 / rate) if self.opts.distribution == "poisson" else 1 / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            task = asyncio.ensure_future(run())
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending, return_exceptions=True)

    def start(self, mode: str, level: float) -> None:
        if mode == "concurrency":
            self._tasks = [asyncio.ensure_future(self._closed_loop()) for _ in range(int(level))]
        else:
            self._tasks = [asyncio.ensure_future(self._open_loop(level))]

    def take(self) -> tuple[list[float], int]:
        lat, err = self.latencies, self.errors
        self.latencies, self.errors = [], 0
        return lat, err

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _stable(windows: Sequence[_Window], pct: float) -> bool:
    if len(windows) < _STABLE_WINDOWS:
        return False
    last = windows[-_STABLE_WINDOWS:]
    tput = [len(w.latencies) / (w.end - w.start) for w in last]
    lat = [float(np.mean(w.latencies)) if w.latencies else float("inf") for w in last]
    for values in (tput, lat):
        mean = float(np.mean(values))
        if not np.isfinite(mean) or mean <= 0 or any(abs(v - mean) > mean * pct / 100 for v in values):
            return False
    return True


async def _measure_level(stub, stats_call, requests, opts: PerfOptions, mode: str, level: float) -> LevelResult:
    load = _Load(stub, requests, opts)
    load.start(mode, level)
    try:
        await asyncio.sleep(opts.warmup_s)
        load.take()
        first = _Window(time.perf_counter(), time.perf_counter(), [], 0, _server_totals(await stats_call()),
                        time.process_time())
        windows = [first]
        while len(windows) - 1 < opts.max_trials:
            await asyncio.sleep(opts.measurement_ms / 1000)
            end = time.perf_counter()
            lat, err = load.take()
            stats = _server_totals(await stats_call())
            windows.append(_Window(windows[-1].end, end, lat, err, stats, time.process_time()))
            if _stable(windows[1:], opts.stability):
                break
    finally:
        await load.stop()
    measured = windows[1:]
    used = measured[-_STABLE_WINDOWS:]
    before = windows[len(windows) - len(used) - 1]
    return _summarise(mode, level, opts.batch, _stable(measured, opts.stability), len(measured), used, before,
                      load.first_error)


def _summarise(mode: str, level: float, batch: int, stable: bool, trials: int, used: list[_Window],
               before: _Window, first_error: str) -> LevelResult:
    wall = used[-1].end - used[0].start
    lat = np.array([x for w in used for x in w.latencies]) * 1e6
    after = used[-1].stats
    server_requests = after["success"][0] - before.stats["success"][0]

    def per_request(stage: str) -> float:
        count = after[stage][0] - before.stats[stage][0]
        return (after[stage][1] - before.stats[stage][1]) / count / 1e3 if count else 0.0

    def pct(q: float) -> float:
        return float(np.percentile(lat, q)) if lat.size else 0.0

    return LevelResult(
        mode=mode, level=level, batch=batch, stable=stable, windows=trials, requests=int(lat.size),
        errors=sum(w.errors for w in used), throughput_rps=lat.size / wall, throughput_ips=lat.size * batch / wall,
        latency_avg_us=float(lat.mean()) if lat.size else 0.0, latency_p50_us=pct(50), latency_p90_us=pct(90),
        latency_p95_us=pct(95), latency_p99_us=pct(99), server_requests=server_requests,
        server_queue_us=per_request("queue"), server_compute_input_us=per_request("compute_input"),
        server_compute_infer_us=per_request("compute_infer"), server_compute_output_us=per_request("compute_output"),
        client_cpu_pct=100 * (used[-1].cpu - before.cpu) / wall, first_error=first_error)


async def run_async(opts: PerfOptions, report=print) -> list[LevelResult]:
    import grpc

    from daemon.protogen import grpc_service_pb2 as pb
    from daemon.protogen import grpc_service_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    async with grpc.aio.insecure_channel(opts.url, options=options) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=opts.model, version=opts.version),
                                            timeout=opts.timeout_s)
            config = (await stub.ModelConfig(pb.ModelConfigRequest(name=opts.model, version=opts.version),
                                             timeout=opts.timeout_s)).config
        except grpc.RpcError as exc:
            raise PerfError(f"{exc.code().name}: {exc.details()}") from None
        requests = build_requests(meta, config, opts)
        try:  # one request first: a refused input stops here with the server's sentence
            await stub.ModelInfer(requests[0], timeout=opts.timeout_s)
        except grpc.RpcError as exc:
            raise PerfError(f"the first request was refused: {exc.code().name}: {exc.details()}") from None

        def stats_call():
            return stub.ModelStatistics(pb.ModelStatisticsRequest(name=opts.model, version=opts.version),
                                        timeout=opts.timeout_s)

        mode, levels = ("rate", list(opts.rates)) if opts.rates else ("concurrency", list(opts.concurrency))
        results = []
        for level in levels:
            result = await _measure_level(stub, stats_call, requests, opts, mode, level)
            report(result)
            results.append(result)
        return results


# ---- output -------------------------------------------------------------------------------------
def header(mode: str) -> str:
    first = "concurrency" if mode == "concurrency" else "rate/s"
    return (f"{first:>11}  {'infer/s':>9}  {'req/s':>9}  {'p50 ms':>8}  {'p90 ms':>8}  {'p99 ms':>8}  "
            f"{'avg ms':>8}  server per request, µs: {'queue':>7} {'c_input':>7} {'c_infer':>7} {'c_output':>8}  "
            f"{'client CPU':>10}  errors  stable")


def row(r: LevelResult) -> str:
    level = f"{int(r.level)}" if r.mode == "concurrency" else f"{r.level:g}"
    return (f"{level:>11}  {r.throughput_ips:>9.1f}  {r.throughput_rps:>9.1f}  {r.latency_p50_us / 1e3:>8.3f}  "
            f"{r.latency_p90_us / 1e3:>8.3f}  {r.latency_p99_us / 1e3:>8.3f}  {r.latency_avg_us / 1e3:>8.3f}  "
            f"{'':>24}{r.server_queue_us:>7.0f} {r.server_compute_input_us:>7.0f} {r.server_compute_infer_us:>7.0f} "
            f"{r.server_compute_output_us:>8.0f}  {r.client_cpu_pct:>9.0f}%  {r.errors:>6}  "
            f"{'yes' if r.stable else 'NO'}")


def write_csv(path: Path, results: Sequence[LevelResult]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(results[0])))
        w.writeheader()
        for r in results:
            w.writerow(asdict(r))


def write_json(path: Path, opts: PerfOptions, results: Sequence[LevelResult]) -> None:
    doc = {"options": asdict(opts), "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


# ---- command ------------------------------------------------------------------------------------
def parse_levels(text: str, kind=int) -> list:
    """``1,2,4`` or ``START:END[:STEP]`` (inclusive, as perf_analyzer's ranges)."""
    try:
        if ":" in text:
            parts = [kind(p) for p in text.split(":")]
            start, end = parts[0], parts[1]
            step = parts[2] if len(parts) > 2 else kind(1)
            if step <= 0 or end < start:
                raise ValueError
            out, v = [], start
            while v <= end + 1e-9:
                out.append(v)
                v += step
        else:
            out = [kind(p) for p in text.split(",") if p.strip()]
        if not out or any(v <= 0 for v in out):
            raise ValueError
        return out
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected positive values as 1,2,4 or START:END[:STEP], got {text!r}") from None


def register(sub) -> None:
    p = sub.add_parser(
        "perf", help="load generator: concurrency sweep or request rate, latency percentiles, server stage times",
        description="Measures MODEL on a running tegrad (or any KServe v2 server) the way perf_analyzer does: "
                    "for each load level, warm up, then measure in windows until the last three are stable "
                    "(throughput and average latency within --stability-percentage), and report those three: "
                    "client p50/p90/p99 latency and throughput, the server's queue / compute_input / "
                    "compute_infer / compute_output time per request (ModelStatistics deltas over the same "
                    "windows), and this client's own CPU use.")
    p.add_argument("model")
    p.add_argument("--model-version", default="", help="version (default: the latest ready)")
    p.add_argument("--url", default="localhost:8001", help="server address (default: %(default)s)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=parse_levels, default=[1], metavar="LIST|RANGE",
                      help="outstanding requests: 1,2,4 or 1:8:2 (default: 1)")
    load.add_argument("--rate", type=lambda t: parse_levels(t, float), default=[], metavar="LIST|RANGE",
                      help="requests per second instead (open loop): 100,200 or 100:400:100")
    p.add_argument("--request-distribution", choices=("constant", "poisson"), default="constant",
                   help="with --rate: intervals between requests (default: %(default)s)")
    p.add_argument("-b", "--batch-size", type=int, default=1, help="samples per request (default: %(default)s)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="images or folders of images sent to the model's image (BYTES) input; repeatable")
    p.add_argument("--input-data", action="append", default=[], metavar="NPY|NPZ",
                   help="tensors (.npz keyed by input name, or 'x'/one array for a one-input model; .npy); "
                        "without images or tensors, random data shaped like the inputs is sent")
    p.add_argument("--measurement-interval", type=int, default=5000, metavar="MS",
                   help="length of one measurement window (default: %(default)s)")
    p.add_argument("--stability-percentage", type=float, default=10.0,
                   help="how close the last three windows must be (default: %(default)s)")
    p.add_argument("--max-trials", type=int, default=10, help="windows per level before giving up on stability")
    p.add_argument("--warmup", type=float, default=1.0, metavar="S", help="seconds of load before measuring")
    p.add_argument("--max-outstanding", type=int, default=256,
                   help="with --rate: requests in flight before new ones wait (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=30.0, help="gRPC deadline per request in seconds")
    p.add_argument("--csv", type=Path, metavar="PATH", help="also write the results as CSV")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the options and results as JSON")
    p.set_defaults(func=main)


def main(args) -> int:
    opts = PerfOptions(
        model=args.model, version=args.model_version, url=args.url, concurrency=args.concurrency,
        rates=args.rate, distribution=args.request_distribution, max_outstanding=args.max_outstanding,
        batch=args.batch_size, images=args.image, input_data=args.input_data,
        measurement_ms=args.measurement_interval, stability=args.stability_percentage,
        max_trials=max(args.max_trials, _STABLE_WINDOWS), warmup_s=args.warmup, timeout_s=args.timeout)
    if opts.batch < 1 or opts.measurement_ms < 1:
        print("tegrad perf: error: --batch-size and --measurement-interval must be positive", file=sys.stderr)
        return 2
    mode = "rate" if opts.rates else "concurrency"
    print(f"tegrad perf: {opts.model} at {opts.url}, batch {opts.batch}, windows of {opts.measurement_ms} ms, "
          f"stable within {opts.stability:g} % over {_STABLE_WINDOWS} windows")
    print(header(mode))

    def report(r: LevelResult) -> None:
        print(row(r), flush=True)
        if r.client_cpu_pct > CPU_WARNING:
            print(f"WARNING: this client used {r.client_cpu_pct:.0f} % of a core at {mode} {r.level:g}: it may be "
                  "measuring itself; run it on another machine or lower the load", file=sys.stderr)
        if not r.stable:
            print(f"WARNING: {mode} {r.level:g} did not stabilise in {r.windows} windows; its figures are the "
                  "last three (longer --measurement-interval or more --max-trials help)", file=sys.stderr)
        if r.errors:
            print(f"WARNING: {r.errors} requests failed at {mode} {r.level:g}, first: {r.first_error}",
                  file=sys.stderr)

    import grpc

    try:
        results = asyncio.run(run_async(opts, report))
    except PerfError as exc:
        print(f"tegrad perf: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:  # ModelStatistics between windows: the server went away or unloaded the model
        print(f"tegrad perf: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tegrad perf: interrupted", file=sys.stderr)
        return 130
    if args.csv:
        write_csv(args.csv, results)
        print(f"wrote {args.csv}")
    if args.json:
        write_json(args.json, opts, results)
        print(f"wrote {args.json}")
    return 0 if all(r.stable for r in results) else 1
