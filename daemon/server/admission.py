"""Daemon-wide bound on the bytes of inference requests being parsed, decoded
and run at once, and the return of their memory to the system afterwards.

gRPC has received a request's bytes by the time a handler runs; what grows
after that (the parsed message, decoded tensors, batches) is a multiple of the
request size. Holding a share of a fixed budget for each request bounds that
growth under a burst of large requests: the next waits for the budget (until
its deadline) instead of adding another copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections import deque
from collections.abc import AsyncIterator

from daemon.errors import ResourceExhausted

log = logging.getLogger("tegrad.server")

# Requests at least this large leave freed memory that glibc keeps in its arenas
# (gRPC's receive buffers are many small blocks spread over its threads' arenas).
TRIM_AFTER_BYTES = 16 << 20
# Trim once the burst is over, not after every request of it.
_TRIM_DELAY_S = 0.2
DEFAULT_WAIT_S = 30.0  # for requests without a deadline (streams)


def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class RequestBytesBudget:
    def __init__(self, limit_bytes: int, trim: bool = True) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()  # FIFO: a large request is not starved
        self._trim = _malloc_trim() if trim else None
        self._large_since_trim = 0
        self._trim_timer: asyncio.TimerHandle | None = None
        self.trims = 0

    @contextlib.asynccontextmanager
    async def hold(self, size: int, timeout_s: float | None) -> AsyncIterator[None]:
        """Hold ``size`` bytes of the budget (a request larger than all of it runs alone)."""
        share = min(size, self.limit)
        if self._waiters or self.used + share > self.limit:
            wait = DEFAULT_WAIT_S if timeout_s is None else max(0.0, timeout_s)
            granted = asyncio.get_running_loop().create_future()
            entry = (share, granted)
            self._waiters.append(entry)
            try:
                # Shielded: on a timeout, whether _grant got there first is read from the future itself.
                await asyncio.wait_for(asyncio.shield(granted), wait)
            except asyncio.TimeoutError:
                pass
            except BaseException:  # the call was cancelled while it waited
                self._give_up(entry)
                raise
            if not granted.done():
                self._give_up(entry)
                raise ResourceExhausted(
                    f"{self.used >> 20} MiB of requests are being processed, the limit is {self.limit >> 20} MiB "
                    f"(--max-inflight-request-mb); this request of {size >> 20} MiB waited {wait:.1f} s for room; "
                    "retry later or send smaller requests"
                )
        else:
            self.used += share
        if size >= TRIM_AFTER_BYTES:
            self._large_since_trim += size
        try:
            yield
        finally:
            self.used -= share
            self._grant()
            if self.used == 0 and self._large_since_trim and self._trim is not None:
                self._schedule_trim()

    def _give_up(self, entry: tuple[int, asyncio.Future]) -> None:
        share, granted = entry
        if granted.done():  # granted meanwhile: hand the share back
            self.used -= share
        else:
            granted.cancel()
            self._waiters.remove(entry)
        self._grant()  # this one may have been what held the others back

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            share, granted = self._waiters.popleft()
            if not granted.done():
                self.used += share
                granted.set_result(None)

    def _schedule_trim(self) -> None:
        loop = asyncio.get_running_loop()
        if self._trim_timer is not None:
            self._trim_timer.cancel()
        self._trim_timer = loop.call_later(_TRIM_DELAY_S, self._start_trim, loop)

    def _start_trim(self, loop: asyncio.AbstractEventLoop) -> None:
        self._trim_timer = None
        if self.used:  # a new burst began; its end trims
            return
        self._large_since_trim = 0
        self.trims += 1
        # malloc_trim walks every arena; on a big heap that takes milliseconds, off the loop.
        loop.run_in_executor(None, self._trim, 0)
