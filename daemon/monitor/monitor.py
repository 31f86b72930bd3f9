"""The precision monitor of one served model version: sample, shadow-run in FP32, compare.

The slot threads hand over a copy of a sampled item (the preprocessed tensors the engine saw
and the outputs it gave) with :meth:`PrecisionMonitor.offer`, which never blocks: when the
shadow worker is still busy with the previous sample, the new one is dropped and counted.
The worker runs the model's source ONNX on ONNX Runtime (CPU, FP32) at the lowest scheduling
priority and within its CPU budget (``shadow_max_cpu``: after each run it rests long enough to
average out at that many cores), then updates the agreement window, the saturation of the
calibrated tensors and the input drift, and exports them. A breach of ``rollback_below``
calls ``on_breach`` once, from the worker thread.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calib import input_stats
from calib.observe import with_outputs
from daemon.monitor.capture import Capture
from daemon.monitor.compare import Task, score, window_values
from daemon.monitor.saturation import Saturation
from daemon.monitor.settings import UPPER_BOUND_METRICS, MonitorConfig
from daemon.monitor.window import CountWindow, Window
from daemon.telemetry import metrics

log = logging.getLogger("tegrad.monitor")

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}

_registry: dict[tuple[str, int], PrecisionMonitor] = {}
_registry_lock = threading.Lock()


def lookup(model: str, version: int) -> PrecisionMonitor | None:
    with _registry_lock:
        return _registry.get((model, version))


class PrecisionMonitor:
    def __init__(self, *, model: str, version: int, settings: MonitorConfig, source_onnx: Path, task: Task,
                 amax: dict[str, float] | None = None, input_stats: dict | None = None, batched: bool = True,
                 on_breach: Callable[[str, int, str], None] | None = None, seed: int | None = None) -> None:
        self.model, self.version, self.settings, self.task = model, version, settings, task
        self._labels = (model, str(version))
        self._source = Path(source_onnx)
        self._batched = batched
        self._on_breach = on_breach
        self._rng = random.Random(seed)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.window = Window(settings.window)
        amax = dict(amax or {})
        if settings.monitor_tensors:
            amax = {n: a for n, a in amax.items() if any(fnmatch.fnmatchcase(n, p) for p in settings.monitor_tensors)}
        self.saturation = Saturation(amax, settings.window, settings.max_tensors) if amax else None
        self._stats = input_stats or {}
        self._drift = {name: CountWindow(settings.window) for name in self._stats}
        self.compared = 0
        self.breached: str | None = None
        self.capture = (Capture(Path(settings.capture_dir), int(settings.capture_max_mb * 2 ** 20), model, version)
                        if settings.capture_dir else None)
        self._threads = max(1, math.floor(settings.shadow_max_cpu))
        self._failures_logged = 0
        # Counters exist from the start (at 0), so that rate() and increase() see the first event.
        for result in ("compared", "dropped", "failed"):
            metrics.PRECISION_SAMPLES.labels(*self._labels, result)
        metrics.PRECISION_ROLLBACKS.labels(model)
        self._thread = threading.Thread(target=self._run, name=f"tegrad-monitor-{model}-{version}", daemon=True)
        with _registry_lock:
            _registry[(model, version)] = self
        self._thread.start()

    # -- the serving side: cheap, never raises ------------------------------------------------

    def offer(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        rate = self.settings.shadow_rate
        if rate <= 0.0 or self._stop.is_set():
            return
        try:
            n = int(next(iter(feeds.values())).shape[0]) if self._batched and feeds else 1
            for i in range(n):
                if rate < 1.0 and self._rng.random() >= rate:
                    continue
                if self._queue.full():
                    metrics.PRECISION_SAMPLES.labels(*self._labels, "dropped").inc()
                    continue
                if self._batched:
                    item = ({k: np.array(v[i:i + 1]) for k, v in feeds.items()},
                            {k: np.array(v[i:i + 1]) for k, v in outputs.items()})
                else:
                    item = ({k: np.array(v) for k, v in feeds.items()}, {k: np.array(v) for k, v in outputs.items()})
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    metrics.PRECISION_SAMPLES.labels(*self._labels, "dropped").inc()
        except Exception:  # monitoring must never cost a live request
            log.exception("model %s/%d: precision monitor could not take a sample", self.model, self.version)

    # -- the shadow worker ------------------------------------------------------------------------

    def _session(self):
        import onnx
        import onnxruntime as ort

        proto = onnx.load(str(self._source))
        # Calibrated activations (graph inputs come from the feed itself).
        produced = {v for node in proto.graph.node for v in node.output}
        proto = with_outputs(proto, [n for n in (self.saturation.amax if self.saturation else ()) if n in produced])
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def _run(self) -> None:
        try:
            # Linux: nice is per thread, and ONNX Runtime's pool threads, created below, inherit it.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        try:
            session = self._session()
        except Exception as exc:
            log.error("model %s/%d: precision monitor off: cannot load the FP32 reference %s: %s",
                      self.model, self.version, self._source.name, exc)
            self._stop.set()
            return
        outputs = [o.name for o in session.get_outputs()]
        in_types = {i.name: _ORT_TYPES.get(i.type) for i in session.get_inputs()}
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                break
            start = time.perf_counter()
            try:
                self._compare(session, outputs, in_types, *item)
                metrics.PRECISION_SAMPLES.labels(*self._labels, "compared").inc()
            except Exception as exc:
                metrics.PRECISION_SAMPLES.labels(*self._labels, "failed").inc()
                if self._failures_logged < 3:
                    self._failures_logged += 1
                    log.warning("model %s/%d: precision monitor sample failed: %s", self.model, self.version, exc)
            busy = time.perf_counter() - start
            rest = busy * (self._threads / self.settings.shadow_max_cpu - 1.0)
            if rest > 0:
                self._stop.wait(rest)

    def _compare(self, session, outputs: list[str], in_types: dict, feeds: dict, served: dict) -> None:
        feed = {k: (v.astype(in_types[k], copy=False) if in_types.get(k) is not None else v)
                for k, v in feeds.items() if k in in_types}
        ref = dict(zip(outputs, session.run(outputs, feed)))
        entry = score(self.task, served[self.task.output], ref[self.task.output])
        with self._lock:
            self.window.add(**entry)
            self.compared += 1
            values = window_values(self.task, self.window)
            for metric, value in values.items():
                metrics.PRECISION_AGREEMENT.labels(*self._labels, metric).set(value)
            if self.saturation is not None:
                self.saturation.add({**{k: v for k, v in feeds.items() if k in self.saturation.amax},
                                     **{k: v for k, v in ref.items() if k in self.saturation.amax}})
                exported, removed = self.saturation.choose()
                for name in removed:
                    metrics.CALIBRATION_SATURATION_RATIO.remove(*self._labels, name)
                for name in exported:
                    metrics.CALIBRATION_SATURATION_RATIO.labels(*self._labels, name).set(self.saturation.ratio(name))
                metrics.CALIBRATION_SATURATION_MAX.labels(*self._labels).set(self.saturation.maximum())
            if self._drift:
                for name, counts in self._drift.items():
                    if name in feeds:
                        counts.add(input_stats.histogram(feeds[name], self._stats[name]))
                metrics.INPUT_DRIFT_SCORE.labels(*self._labels).set(self.drift())
        if self.capture is not None:
            self.capture.add(feeds)
        self._check(values)

    def _check(self, values: dict[str, float]) -> None:
        limits = self.settings.rollback_below
        if not limits or self.breached is not None or self.compared < self.settings.min_samples:
            return
        for metric, limit in limits.items():
            value = values.get(metric)
            if value is None:
                continue
            bad = value > limit if metric in UPPER_BOUND_METRICS else value < limit
            if bad:
                side = "above" if metric in UPPER_BOUND_METRICS else "below"
                self.breached = (f"{metric} {value:.4f} {side} {limit:g} over the last "
                                 f"{min(self.compared, self.settings.window)} compared samples")
                log.warning("model %s/%d: live precision breach: %s", self.model, self.version, self.breached)
                if self._on_breach is not None:
                    self._on_breach(self.model, self.version, self.breached)
                return

    # -- reading ------------------------------------------------------------------------------------

    def drift(self) -> float:
        scores = [input_stats.psi(self._stats[n], w.total) for n, w in self._drift.items() if w.total is not None]
        return max(scores) if scores else 0.0

    def summary(self) -> dict[str, float]:
        """The window's agreement values, plus ``drift`` and ``saturation_max`` where measured."""
        with self._lock:
            out = dict(window_values(self.task, self.window))
            if any(w.total is not None for w in self._drift.values()):
                out["drift"] = self.drift()
            if self.saturation is not None and self.compared:
                out["saturation_max"] = self.saturation.maximum()
            out["samples"] = float(self.compared)
        return out

    def close(self) -> None:
        self._stop.set()
        while True:  # wake the worker: a sample may still sit in the one-place queue
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join(timeout=10)
        with _registry_lock:
            if _registry.get((self.model, self.version)) is self:
                del _registry[(self.model, self.version)]
        metrics.forget_monitor(self.model, str(self.version))
