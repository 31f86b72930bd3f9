"""Per model-version statistics, as Triton's ModelStatistics RPC reports them,
recorded together with the Prometheus series so that both always agree."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from daemon.telemetry import metrics


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class VersionStats:
    """Counters for one model version. Called from the asyncio loop only, except
    ``lock``-protected snapshots, so plain integers are enough."""

    def __init__(self, model: str, version: str) -> None:
        self.model = model
        self.version = version
        self.lock = threading.Lock()
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchDurations] = defaultdict(BatchDurations)
        labels = (model, version)
        self._requests = {o: metrics.REQUESTS.labels(*labels, o) for o in metrics.OUTCOMES}
        self._stage = {s: metrics.REQUEST_DURATION.labels(*labels, s) for s in metrics.STAGES}
        self._batch = metrics.BATCH_SIZE.labels(*labels)
        self.queue_depth = metrics.QUEUE_DEPTH.labels(*labels)
        self.inflight = metrics.INFLIGHT.labels(*labels)

    def execution(self, batch_size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One model execution covering ``batch_size`` inferences."""
        with self.lock:
            self.execution_count += 1
            b = self.batches[batch_size]
            b.compute_input.add(input_ns)
            b.compute_infer.add(infer_ns)
            b.compute_output.add(output_ns)
        self._batch.observe(batch_size)

    def request_done(self, *, batch_size: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, total_ns: int) -> None:
        with self.lock:
            self.success.add(total_ns)
            self.queue.add(queue_ns)
            self.compute_input.add(input_ns)
            self.compute_infer.add(infer_ns)
            self.compute_output.add(output_ns)
            self.inference_count += batch_size
            self.last_inference_ms = int(time.time() * 1000)
        self._requests["success"].inc()
        self._stage["queue"].observe(queue_ns / 1e9)
        self._stage["compute_input"].observe(input_ns / 1e9)
        self._stage["infer"].observe(infer_ns / 1e9)
        self._stage["compute_output"].observe(output_ns / 1e9)
        self._stage["total"].observe(total_ns / 1e9)

    def request_failed(self, outcome: str, total_ns: int) -> None:
        with self.lock:
            self.fail.add(total_ns)
        self._requests[outcome].inc()
