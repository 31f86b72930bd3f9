"""Per model-version scheduler.

Requests wait in a bounded FIFO; ``instances`` workers (one per execution slot,
each with its own thread) take them, merge shape-compatible requests into one
batch up to ``max_batch`` (waiting at most ``max_queue_delay_us`` for more when
the batch is below its target size), drop requests whose deadline has passed,
and run the engine off the event loop. ONNX Runtime and TensorRT release the
GIL while they compute, so slots overlap.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from daemon.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted, Unavailable
from daemon.telemetry.stats import VersionStats


@dataclass
class Timing:
    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    execution_batch: int = 1


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]
    batch_size: int
    deadline_ns: int | None
    future: asyncio.Future
    enqueued_ns: int
    key: tuple = field(default=())


@dataclass(frozen=True)
class SchedulerOptions:
    max_batch: int = 0
    instances: int = 1
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 256
    # Executions that recently took less than this run on the event loop thread itself:
    # handing a sub-millisecond inference to a slot thread and back costs more than it.
    inline_below_us: int = 300


class Scheduler:
    def __init__(self, engine, options: SchedulerOptions, stats: VersionStats, label: str) -> None:
        self._engine = engine
        self._opt = options
        self._stats = stats
        self._label = label
        self._pending: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"tegrad-{label}-slot{i}") for i in range(options.instances)
        ]
        self._workers = [asyncio.ensure_future(self._worker(i)) for i in range(options.instances)]
        self._busy = 0
        self._recent_infer_ns: float | None = None  # moving average; None until measured
        # Batch target: the largest preferred size, else max_batch.
        prefs = [p for p in options.preferred_batch_sizes if p <= options.max_batch]
        self._target = max(prefs) if prefs else options.max_batch
        self._preferred = set(prefs)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def check_admission(self) -> None:
        """Raise what a new request would meet now (unloading, queue full); called on a
        request's first bytes too, so a refusal costs no parse or decode."""
        if self._stopping:
            raise Unavailable(f"model {self._label} is being unloaded; retry to reach the new version")
        if len(self._pending) >= self._opt.max_queue_size:
            raise ResourceExhausted(
                f"model {self._label}: queue is full ({self._opt.max_queue_size} requests waiting); retry later "
                "or raise dynamic_batching.max_queue_size"
            )

    async def infer(self, inputs: dict[str, np.ndarray], deadline_ns: int | None) -> tuple[dict[str, np.ndarray], Timing]:
        """Queue one request and wait for its outputs (sliced to its own batch)."""
        self.check_admission()
        if self._opt.max_batch > 0:
            first = next(iter(inputs.values()))
            batch_size = int(first.shape[0]) if first.ndim else 1
            key = tuple((name, a.shape[1:], a.dtype.str) for name, a in inputs.items())
        else:
            batch_size, key = 1, ()
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(inputs, batch_size, deadline_ns, future, time.perf_counter_ns(), key))
        self._stats.queue_depth.set(len(self._pending))
        self._wakeup.set()
        return await future

    def _take(self) -> list[_Pending]:
        # With other slots idle, take only a fair share of what waits: merging everything into
        # this slot would leave them idle while it runs a big batch (on a CPU, one thread each).
        idle = max(1, self._opt.instances - self._busy)
        share = -(-len(self._pending) // idle)
        first = self._pending.popleft()
        group = [first]
        if self._opt.max_batch > 0:
            total = first.batch_size
            # FIFO: stop at the first request that cannot join, so nobody is overtaken.
            while self._pending and total < self._target and len(group) < share:
                nxt = self._pending[0]
                if nxt.key != first.key or total + nxt.batch_size > self._opt.max_batch:
                    break
                group.append(self._pending.popleft())
                total += nxt.batch_size
                if total in self._preferred:
                    break
        return group

    async def _collect(self) -> list[_Pending]:
        group = self._take()
        delay_ns = self._opt.max_queue_delay_us * 1000
        if self._opt.max_batch == 0 or delay_ns == 0:
            return group
        while True:
            total = sum(p.batch_size for p in group)
            if total >= self._target or total in self._preferred:
                return group
            remaining = group[0].enqueued_ns + delay_ns - time.perf_counter_ns()
            if remaining <= 0 or self._stopping:
                return group
            if self._pending and (self._pending[0].key != group[0].key or total + self._pending[0].batch_size > self._opt.max_batch):
                return group
            if not self._pending:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining / 1e9)
                except asyncio.TimeoutError:
                    return group
                continue
            nxt = self._pending.popleft()
            group.append(nxt)

    async def _worker(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        executor = self._executors[slot]
        while True:
            while not self._pending:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            group = await self._collect()
            self._stats.queue_depth.set(len(self._pending))
            now = time.perf_counter_ns()
            live = []
            for p in group:
                if p.future.done():  # the client went away while queued
                    continue
                if p.deadline_ns is not None and now >= p.deadline_ns:
                    p.future.set_exception(
                        DeadlineExceeded(f"model {self._label}: deadline passed after {(now - p.enqueued_ns) / 1e6:.1f} ms in the queue")
                    )
                    continue
                live.append(p)
            if not live:
                continue
            self._busy += 1
            try:
                if self._runs_inline(sum(p.batch_size for p in live)):
                    outputs, timing = self._execute(live, slot)
                else:
                    outputs, timing = await loop.run_in_executor(executor, self._execute, live, slot)
            except Exception as exc:  # a backend failure fails this batch, never the worker
                err = exc if isinstance(exc, (ResourceExhausted, InvalidArgument)) else Internal(f"model {self._label}: inference failed: {exc}")
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            finally:
                self._busy -= 1
                if self._stopping and not self._pending:
                    self._wakeup.set()
            per_item = timing.infer_ns / timing.execution_batch
            avg = self._recent_infer_ns
            self._recent_infer_ns = per_item if avg is None else 0.8 * avg + 0.2 * per_item
            self._stats.execution(timing.execution_batch, timing.input_ns, timing.infer_ns, timing.output_ns)
            for p, out in zip(live, outputs):
                if not p.future.done():
                    t = Timing(now - p.enqueued_ns, timing.input_ns, timing.infer_ns, timing.output_ns, timing.execution_batch)
                    p.future.set_result((out, t))

    def _runs_inline(self, items: int) -> bool:
        # Predicted from the per-item average, so a large batch of a small model still
        # goes to a thread; only one inline execution at a time (the loop is one slot).
        return (
            self._recent_infer_ns is not None
            and self._recent_infer_ns * items < self._opt.inline_below_us * 1000
            and self._busy == 1
        )

    def _execute(self, group: list[_Pending], slot: int) -> tuple[list[dict[str, np.ndarray]], Timing]:
        t0 = time.perf_counter_ns()
        if len(group) == 1:
            feeds = group[0].inputs
        else:
            feeds = {name: np.concatenate([p.inputs[name] for p in group]) for name in group[0].inputs}
        t1 = time.perf_counter_ns()
        outputs = self._engine.infer(feeds, slot)
        t2 = time.perf_counter_ns()
        if len(group) == 1:
            parts = [outputs]
        else:
            parts, offset = [], 0
            for p in group:
                parts.append({k: v[offset : offset + p.batch_size] for k, v in outputs.items()})
                offset += p.batch_size
        t3 = time.perf_counter_ns()
        total = sum(p.batch_size for p in group)
        split = getattr(self._engine, "stage_ns", None)
        if split is not None:  # pre/post-processing ran inside the engine call: report it as its stages
            pre, infer, post = split(slot)
            return parts, Timing(0, t1 - t0 + pre, infer, t3 - t2 + post, total)
        return parts, Timing(0, t1 - t0, t2 - t1, t3 - t2, total)

    async def drain(self, timeout: float | None = None) -> bool:
        """Finish everything queued, then stop the workers. True if it drained in time."""
        self._stopping = True
        self._wakeup.set()
        done, pending = await asyncio.wait(self._workers, timeout=timeout)
        for task in pending:
            task.cancel()
        for p in self._pending:
            if not p.future.done():
                p.future.set_exception(Unavailable(f"model {self._label} was unloaded before this request ran"))
        self._pending.clear()
        for ex in self._executors:
            ex.shutdown(wait=not pending)
        return not pending
