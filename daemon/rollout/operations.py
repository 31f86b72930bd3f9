"""Long-running rollout operations: their records (SQLite), watchers, metrics and event lines.

Every change of an operation goes through :meth:`OperationBoard.update`, which
persists it, logs a structured line when the state changes, keeps the
in-progress gauge and the finished-operations counter, and wakes every watcher
whose filter matches.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from daemon.errors import NotFound
from daemon.repository.state import OperationRecord, StateStore, event
from daemon.telemetry import metrics

QUEUED, VERIFYING, BUILDING, VALIDATING, ACTIVATING, SUCCEEDED, FAILED = (
    "QUEUED", "VERIFYING", "BUILDING", "VALIDATING", "ACTIVATING", "SUCCEEDED", "FAILED")
DONE = (SUCCEEDED, FAILED)
KEEP_DONE = 200  # finished operations remembered (GetOperation, ListOperations); older ones are forgotten


class OperationBoard:
    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._ops: dict[str, OperationRecord] = {}
        self._watchers: list[tuple[str, str, asyncio.Queue]] = []
        self.reload()

    def reload(self) -> None:
        """Read the operations from SQLite again (after :meth:`StateStore.recover` changed them)."""
        self._ops = {op.id: op for op in self._store.operations()}

    def create(self, kind: str, **fields: Any) -> OperationRecord:
        now = time.time()
        op = OperationRecord(id=f"{kind}-{secrets.token_hex(6)}", kind=kind, state=QUEUED, created=now, updated=now,
                             **fields)
        self._ops[op.id] = op
        self._store.put_operation(op)
        self._forget_old()
        metrics.ROLLOUT_ACTIVE_OPERATIONS.labels(QUEUED).inc()
        event("operation", id=op.id, kind=kind, model=op.model, version=op.version, old="", new=QUEUED, reason="")
        self._notify(op)
        return op

    def update(self, op_id: str, **changes: Any) -> OperationRecord:
        old = self._ops[op_id]
        new = replace(old, updated=time.time(), **changes)
        if new.state in DONE:
            new = replace(new, done=True)
        self._ops[op_id] = new
        self._store.put_operation(new)
        if new.state != old.state:
            metrics.ROLLOUT_ACTIVE_OPERATIONS.labels(old.state).dec()
            if new.done:
                metrics.ROLLOUT_OPERATIONS.labels(new.kind, new.state.lower()).inc()
            else:
                metrics.ROLLOUT_ACTIVE_OPERATIONS.labels(new.state).inc()
            event("operation", id=new.id, kind=new.kind, model=new.model, version=new.version, old=old.state,
                  new=new.state, reason=new.error)
        self._notify(new)
        return new

    def _forget_old(self) -> None:
        done = [op for op in self.list() if op.done]
        old = [op.id for op in done[:max(0, len(done) - KEEP_DONE)]]
        if old:
            self._store.delete_operations(old)
            for op_id in old:
                del self._ops[op_id]

    def get(self, op_id: str) -> OperationRecord:
        op = self._ops.get(op_id)
        if op is None:
            raise NotFound(f"no operation {op_id!r} on this device")
        return op

    def list(self, model: str = "") -> list[OperationRecord]:
        return sorted((op for op in self._ops.values() if not model or op.model == model), key=lambda o: o.created)

    async def watch(self, op_id: str = "", model: str = "") -> AsyncIterator[OperationRecord]:
        """The matching operations now (one, or those not done), then each change; ends when ``op_id`` is done."""
        queue: asyncio.Queue = asyncio.Queue()
        watcher = (op_id, model, queue)
        self._watchers.append(watcher)
        try:
            current = [self.get(op_id)] if op_id else [op for op in self.list(model) if not op.done]
            for op in current:
                yield op
                if op_id and op.done:
                    return
            while True:
                op = await queue.get()
                yield op
                if op_id and op.done:
                    return
        finally:
            self._watchers.remove(watcher)

    def _notify(self, op: OperationRecord) -> None:
        for op_id, model, queue in self._watchers:
            if (op_id and op.id == op_id) or (not op_id and (not model or op.model == model)):
                queue.put_nowait(op)
