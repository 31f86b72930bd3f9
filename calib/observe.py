"""Collect activation statistics by running a model with ONNX Runtime.

The tensors of interest are exposed as extra graph outputs of an in-memory
copy of the model. Each tensor keeps constant-size streaming statistics
(:class:`TensorStats`): min, max and a fixed 2048-bin histogram of ``|x|``.
Memory therefore does not depend on the number of calibration samples, unlike
ONNX Runtime's own calibrators, which keep every intermediate output until the
end.

Throughput: while ONNX Runtime computes batch ``k+1`` (it releases the GIL),
a worker thread folds batch ``k`` into the histograms, and another thread
decodes and preprocesses the images of batch ``k+2``. All queues are bounded,
so at most a few batches of activations are alive at a time.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx

from calib.datasets import DataSource, Feed, SourceLike, as_source, batches
from calib.input_stats import InputStatsBuilder
from calib.ort_exact import keep_exact
from calib.preprocess import PreprocessSpec

DEFAULT_NUM_BINS = 2048

_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class TensorStats:
    """Streaming statistics of one tensor: min, max, element count and |x| histogram.

    The histogram covers ``[0, hist_range]`` with ``num_bins`` equal bins.
    When a batch exceeds the range, the range grows by the smallest integer
    factor ``k`` that covers it and every ``k`` old bins merge into one new
    bin. The merge is exact (no redistribution of counts), and the final
    range stays below twice the final ``absmax``.
    """

    __slots__ = ("name", "num_bins", "min", "max", "count", "hist", "hist_range")

    def __init__(self, name: str, num_bins: int = DEFAULT_NUM_BINS, histogram: bool = True) -> None:
        if num_bins < 2:
            raise ValueError("num_bins must be at least 2")
        self.name = name
        self.num_bins = num_bins
        self.min = math.inf
        self.max = -math.inf
        self.count = 0
        self.hist: np.ndarray | None = np.zeros(num_bins, dtype=np.int64) if histogram else None
        self.hist_range = 0.0

    @property
    def absmax(self) -> float:
        if self.count == 0:
            return 0.0
        return float(max(-self.min, self.max))

    @property
    def bin_width(self) -> float:
        return self.hist_range / self.num_bins

    @property
    def bin_edges(self) -> np.ndarray:
        return np.linspace(0.0, self.hist_range, self.num_bins + 1)

    def __repr__(self) -> str:
        return (f"TensorStats({self.name!r}, min={self.min:.6g}, max={self.max:.6g}, count={self.count}, "
                f"hist_range={self.hist_range:.6g})")

    def _grow(self, amax: float) -> None:
        if self.hist_range == 0.0:
            self.hist_range = amax
            return
        k = max(2, int(math.ceil(amax / self.hist_range)))
        while k * self.hist_range < amax:
            k += 1
        if self.hist is not None:
            nb = self.num_bins
            merged_len = -(-nb // k)
            padded = np.zeros(merged_len * k, dtype=np.int64)
            padded[:nb] = self.hist
            hist = np.zeros(nb, dtype=np.int64)
            hist[:merged_len] = padded.reshape(merged_len, k).sum(axis=1)
            self.hist = hist
        self.hist_range *= k

    def update(self, x: np.ndarray, scratch: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Fold one array into the statistics.

        ``scratch`` is an optional pair of reusable work buffers (float32,
        intp) at least ``x.size`` long; reusing them avoids page-faulting
        fresh memory for every tensor of every batch, a large share of the cost.
        """
        x = np.asarray(x)
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            # Rare: inf/NaN activations. Keep the statistics of the finite part.
            x = x[np.isfinite(x)]
            if x.size == 0:
                return
            lo, hi = float(x.min()), float(x.max())
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self.count += int(x.size)
        amax = max(-lo, hi)
        if self.hist is None:
            return
        if amax == 0.0:
            # Bin 0 contains 0 whatever the range becomes.
            self.hist[0] += x.size
            return
        if amax > self.hist_range:
            self._grow(amax)
        nb = self.num_bins
        n = x.size
        if scratch is not None and scratch[0].size >= n and scratch[1].size >= n:
            fbuf, ibuf = scratch[0][:n], scratch[1][:n]
        else:
            fbuf, ibuf = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.intp)
        # Bin index = floor(|x| * nb / range). np.bincount instead of np.histogram:
        # no sorting or edge search, several times faster on millions of values.
        np.abs(x, out=fbuf)
        np.multiply(fbuf, np.float32(nb / self.hist_range), out=fbuf)
        np.copyto(ibuf, fbuf, casting="unsafe")
        counts = np.bincount(ibuf, minlength=nb)
        if counts.size > nb:
            # float32 rounding can put |x| == range at index nb: it belongs to the last bin.
            counts[nb - 1] += counts[nb:].sum()
            counts = counts[:nb]
        self.hist += counts

    def merge(self, other: TensorStats) -> None:
        """Fold another TensorStats of the same tensor (e.g. from a parallel run) into this one."""
        if other.count == 0:
            return
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        if self.hist is None or other.hist is None:
            self.hist = None
            return
        if other.num_bins != self.num_bins:
            raise ValueError("cannot merge histograms with different bin counts")
        o = other.hist.astype(np.int64)
        rng = other.hist_range
        if rng > self.hist_range:
            self._grow(rng)
        if rng == 0.0:
            self.hist[0] += int(o.sum())
            return
        # Re-bin the other histogram onto ours by bin centres; exact when the ranges are
        # equal or an integer multiple, approximate to one bin otherwise.
        centres = (np.arange(self.num_bins) + 0.5) * (rng / self.num_bins)
        idx = np.minimum((centres * (self.num_bins / self.hist_range)).astype(np.intp), self.num_bins - 1)
        self.hist += np.bincount(idx, weights=o, minlength=self.num_bins).astype(np.int64)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            "scalars": np.array([self.min, self.max, self.hist_range], dtype=np.float64),
            "count": np.array([self.count, self.num_bins], dtype=np.int64),
        }
        if self.hist is not None:
            out["hist"] = self.hist
        return out

    @classmethod
    def from_arrays(cls, name: str, arrays: Mapping[str, np.ndarray]) -> TensorStats:
        count, num_bins = (int(v) for v in arrays["count"])
        st = cls(name, num_bins=num_bins, histogram="hist" in arrays)
        st.min, st.max, st.hist_range = (float(v) for v in arrays["scalars"])
        st.count = count
        if "hist" in arrays:
            st.hist = np.asarray(arrays["hist"], dtype=np.int64).copy()
        return st


class Observations(Mapping[str, TensorStats]):
    """Per-tensor statistics of one calibration run (a read-only mapping name → TensorStats)."""

    def __init__(
        self,
        stats: Mapping[str, TensorStats],
        num_samples: int,
        model_sha256: str,
        source: dict[str, Any] | None = None,
        input_like: Iterable[str] = (),
    ) -> None:
        self.stats = dict(stats)
        self.num_samples = num_samples
        self.model_sha256 = model_sha256
        self.source = source
        # Model inputs, and tensors that only rearrange them, are calibrated differently
        # (see algorithms.compute_all).
        self.input_like = tuple(n for n in input_like if n in self.stats)

    def __getitem__(self, name: str) -> TensorStats:
        return self.stats[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Store as ``.npz`` so that algorithms can be re-run without inference."""
        arrays: dict[str, np.ndarray] = {
            "__meta__": np.array([self.model_sha256, str(self.num_samples)]),
            "__names__": np.array(list(self.stats), dtype=object).astype(str),
            "__inputs__": np.array(list(self.input_like), dtype=object).astype(str),
        }
        for i, st in enumerate(self.stats.values()):
            for k, v in st.to_arrays().items():
                arrays[f"{i}/{k}"] = v
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Observations:
        with np.load(path, allow_pickle=False) as z:
            sha, n = (str(v) for v in z["__meta__"])
            stats = {}
            for i, name in enumerate(z["__names__"]):
                arrays = {k: z[f"{i}/{k}"] for k in ("scalars", "count", "hist") if f"{i}/{k}" in z.files}
                stats[str(name)] = TensorStats.from_arrays(str(name), arrays)
            inputs = [str(v) for v in z["__inputs__"]] if "__inputs__" in z.files else []
        return cls(stats, int(n), sha, input_like=inputs)


def _load_model(model: onnx.ModelProto | str | os.PathLike[str]) -> tuple[onnx.ModelProto, str]:
    from calib.cache import model_sha256

    if isinstance(model, onnx.ModelProto):
        return model, model_sha256(model)
    return onnx.load(os.fspath(model)), model_sha256(model)


def _graph_inputs(model: onnx.ModelProto) -> list[str]:
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


# Ops whose outputs hold only (copies of) their data input's values, or values within
# its range: a chain of them from a model input is still "the input".
_REARRANGING_OPS = frozenset({
    "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice", "Split", "Concat",
    "Gather", "Pad", "SpaceToDepth", "DepthToSpace", "Resize", "Upsample", "Tile", "Expand",
})


def input_like_tensors(model: onnx.ModelProto) -> list[str]:
    """Model inputs plus tensors derived from them only through rearranging ops
    (e.g. YOLOX's Focus slices), in graph order."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    found = _graph_inputs(model)
    members = set(found)
    for node in model.graph.node:
        data = [i for i in node.input if i and i not in consts]
        if node.op_type in _REARRANGING_OPS and data and all(i in members for i in data):
            for out in node.output:
                if out and out not in members:
                    members.add(out)
                    found.append(out)
    return found


def _known_tensors(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {i.name for i in g.input} | {o.name for o in g.output}
    for n in g.node:
        names.update(o for o in n.output if o)
    return names


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (typed where the graph knows the type)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    typed = {vi.name: vi for vi in m.graph.value_info}
    for name in names:
        if name in existing:
            continue
        if name in typed:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(typed[name])
            m.graph.output.append(vi)
        else:
            # ONNX Runtime infers the type of an output declared without one.
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return m


def _libc_trim():
    """glibc's malloc_trim, or a no-op where there is none (musl, macOS)."""
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


# Every batch frees tens of MB of activations on the stats threads; glibc keeps those pages
# in per-thread arenas, so the peak RSS crept up by ~2-8 MiB per image (EfficientNet-Lite0).
# Returning them after each batch keeps memory flat in the number of samples.
_release_freed_memory = _libc_trim()


def _make_session(model: onnx.ModelProto, providers: list[str] | None, intra_op_threads: int | None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if intra_op_threads is not None:
        so.intra_op_num_threads = intra_op_threads
    # Idle ORT worker threads spin by default, stealing the cores the histogram
    # threads need between runs.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # ONNX Runtime's arena keeps (and fragments) the largest outputs it ever returned: with every
    # activation fetched, that grows with the run rather than the model.
    so.enable_cpu_mem_arena = False
    keep_exact(so, model)
    data = model.SerializeToString()
    return ort.InferenceSession(data, so, providers=providers or ["CPUExecutionProvider"])


def _prefetch(it: Iterator[Feed], depth: int) -> Iterator[Feed]:
    """Run ``it`` in a thread (image decoding releases the GIL) with a bounded queue."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)

    t = threading.Thread(target=work, name="calib-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


class _StatsPool:
    """Folds fetched outputs into TensorStats on worker threads.

    Each tensor belongs to one worker, so its updates stay in batch order and
    the result is deterministic. Tensors are balanced across workers by size
    on the first batch. ``np.bincount`` and the ufuncs release the GIL for
    large arrays, so two workers use two cores while ONNX Runtime computes
    the next batch. Each worker queue holds at most one batch.
    """

    def __init__(self, stats: dict[str, TensorStats], workers: int) -> None:
        self.stats = stats
        self.workers = max(0, workers)
        self.error: BaseException | None = None
        self.owner: dict[str, int] = {}
        self.scratch = [(np.empty(0, np.float32), np.empty(0, np.intp)) for _ in range(max(1, self.workers))]
        self.queues: list[queue.Queue[Any]] = []
        self.threads: list[threading.Thread] = []
        for w in range(self.workers):
            q: queue.Queue[Any] = queue.Queue(maxsize=1)
            t = threading.Thread(target=self._run, args=(w, q), name=f"calib-stats-{w}", daemon=True)
            t.start()
            self.queues.append(q)
            self.threads.append(t)

    def _fold(self, w: int, arrays: Mapping[str, np.ndarray]) -> None:
        for name, arr in arrays.items():
            if self.workers and self.owner[name] != w:
                continue
            fbuf, ibuf = self.scratch[w]
            if arr.size > fbuf.size:
                fbuf, ibuf = np.empty(arr.size, np.float32), np.empty(arr.size, np.intp)
                self.scratch[w] = (fbuf, ibuf)
            self.stats[name].update(arr, scratch=(fbuf, ibuf))

    def _run(self, w: int, q: queue.Queue[Any]) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self._fold(w, item)
                except BaseException as exc:
                    self.error = exc

    def _assign(self, arrays: Mapping[str, np.ndarray]) -> None:
        load = [0] * self.workers
        for name in sorted(arrays, key=lambda n: -arrays[n].size):
            w = load.index(min(load))
            self.owner[name] = w
            load[w] += arrays[name].size

    def submit(self, arrays: Mapping[str, np.ndarray]) -> None:
        if self.error is not None:
            raise self.error
        if not self.workers:
            self._fold(0, arrays)
            return
        if not self.owner:
            self._assign(arrays)
        for q in self.queues:
            q.put(arrays)

    def finish(self) -> None:
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error


def observe(
    model: onnx.ModelProto | str | os.PathLike[str],
    data: SourceLike,
    tensors: Iterable[str] | None = None,
    *,
    batch_size: int = 8,
    spec: PreprocessSpec | None = None,
    limit: int | None = None,
    input_name: str | None = None,
    histogram: bool = True,
    num_bins: int = DEFAULT_NUM_BINS,
    progress: bool = True,
    providers: list[str] | None = None,
    intra_op_threads: int | None = None,
    threaded: bool = True,
    stats_workers: int | None = None,
) -> Observations:
    """Run ``model`` over ``data`` and return streaming statistics of ``tensors``.

    ``data`` is anything :func:`calib.datasets.as_source` accepts (an image
    folder needs ``spec``). ``tensors`` defaults to the activations the Q/DQ
    lowering will quantize (``calib.qdq.activation_tensors_to_quantize``).
    ``histogram=False`` keeps only min/max, enough for the ``max`` algorithm
    and noticeably cheaper. ``threaded=False`` runs everything on the
    calling thread; ``stats_workers`` sets the histogram threads (default:
    up to 2, fewer on machines with fewer cores).
    """
    proto, sha = _load_model(model)
    if tensors is None:
        from calib.qdq import activation_tensors_to_quantize

        names = list(dict.fromkeys(activation_tensors_to_quantize(proto)))
    else:
        names = list(dict.fromkeys(tensors))
    if not names:
        raise ValueError("no tensors to observe")
    known = _known_tensors(proto)
    initializers = {i.name for i in proto.graph.initializer}
    for name in names:
        if name in initializers:
            raise ValueError(f"{name!r} is a weight (initializer), not an activation")
        if name not in known:
            raise ValueError(f"{name!r} is not a tensor of this model")

    graph_inputs = _graph_inputs(proto)
    if input_name is None and len(graph_inputs) == 1:
        input_name = graph_inputs[0]
    from_feed = [n for n in names if n in graph_inputs]
    fetched = [n for n in names if n not in graph_inputs]

    session = _make_session(with_outputs(proto, fetched), providers, intra_op_threads)
    in_meta = {i.name: i for i in session.get_inputs()}
    if input_name is not None and input_name in in_meta:
        dim0 = in_meta[input_name].shape[0] if in_meta[input_name].shape else None
        if isinstance(dim0, int) and dim0 > 0 and batch_size != dim0:
            if batch_size > dim0:
                warnings.warn(f"model input {input_name!r} has a fixed batch of {dim0}; using batch_size={dim0}",
                              stacklevel=2)
            batch_size = dim0

    source: DataSource = as_source(data, spec=spec, limit=limit)
    total = source.num_samples
    stats = {n: TensorStats(n, num_bins=num_bins, histogram=histogram) for n in names}

    from tqdm import tqdm

    bar = tqdm(total=total, unit="img" if spec is not None else "sample", desc="calibrate",
               disable=not progress, leave=False)
    if not threaded:
        nworkers = 0
    elif stats_workers is not None:
        nworkers = stats_workers
    else:
        nworkers = max(1, min(2, os.cpu_count() or 1))
    worker = _StatsPool(stats, workers=nworkers)
    inputs_seen = InputStatsBuilder()
    num_samples = 0
    try:
        feeds = batches(source, input_name=input_name, batch_size=batch_size)
        if threaded:
            feeds = _prefetch(feeds, depth=2)
        for feed in feeds:
            unknown = [k for k in feed if k not in in_meta]
            if unknown:
                raise ValueError(f"data has inputs {unknown} that the model does not have "
                                 f"(model inputs: {list(in_meta)})")
            for k, meta in in_meta.items():
                want = _ORT_FLOAT_TYPES.get(meta.type)
                if k in feed and want is not None and feed[k].dtype != want:
                    feed[k] = feed[k].astype(want)
            outs = session.run(fetched, feed) if fetched else []
            arrays = dict(zip(fetched, outs))
            for n in from_feed:
                arrays[n] = feed[n]
            worker.submit(arrays)
            if input_name in feed:
                inputs_seen.update(feed[input_name])
            _release_freed_memory()
            n = next(iter(feed.values())).shape[0]
            num_samples += n
            bar.update(n)
    finally:
        bar.close()
        worker.finish()
    if num_samples == 0:
        raise ValueError("the calibration data is empty")
    described = source.describe()
    # For the daemon's drift monitor: what the model input looked like during calibration.
    summary = inputs_seen.result()
    if summary is not None:
        described["input_stats"] = {input_name: summary}
    return Observations(stats, num_samples, sha, source=described, input_like=input_like_tensors(proto))
