"""The daemon's budget of memory for decoded images: what decoding and preprocessing may hold at once.

On a 4 GB Jetson, eight 40-megapixel photos decoded at once are 1 GB. Each request asks for
what its images will need (estimated from their headers, see :mod:`daemon.processing.images`)
before any of them is decoded, all at once so that two requests never each hold half and wait
for the rest. Requests wait in arrival order (a large one is never overtaken for good by a
stream of small ones); a request that needs more than the whole budget is refused at once.
Waiting ends with the request: a client deadline or cancellation cancels the wait.

What a decoded image holds is given back when the image is no longer referenced, or earlier,
when the slot has preprocessed it (:meth:`DecodeBudget.release_image`), so an image that waits in
the scheduler queue still counts.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from daemon.errors import ResourceExhausted
from daemon.telemetry.metrics import DECODE_BUDGET_IN_USE

#: Default for ``tegrad serve --max-decode-bytes``: an eighth of a 4 GB Orin Nano's memory. Room for
#: one image at the default max_image_pixels (40 MP, even a progressive JPEG) or a batch of 64
#: 1080p JPEGs for a 224x224 model.
DEFAULT_MAX_DECODE_BYTES = 512 << 20


@dataclass(eq=False)
class _Waiter:
    nbytes: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    granted: bool = field(default=False)


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class DecodeBudget:
    """Bytes of decoded images in flight across the daemon, at most ``limit``; thread-safe."""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"the decode budget must be positive, got {limit} bytes")
        self.limit = limit
        self._used = 0
        # Reentrant: a finalizer can run inside any allocation, in the middle of another method.
        self._lock = threading.RLock()
        self._waiters: deque[_Waiter] = deque()
        self._held: dict[int, weakref.finalize] = {}

    @property
    def in_use(self) -> int:
        return self._used

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, nbytes: int, what: str) -> None:
        """Take ``nbytes``, waiting behind earlier requests; ``what`` names the request in the refusal."""
        if nbytes > self.limit:
            raise ResourceExhausted(
                f"{what} needs {mib(nbytes)} to decode and preprocess, more than the daemon's whole decode "
                f"budget of {mib(self.limit)}: send fewer or smaller images per request, or raise "
                "tegrad serve --max-decode-bytes"
            )
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self._used + nbytes <= self.limit:
                self._take(nbytes)
                return
            waiter = _Waiter(nbytes, loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                if waiter.granted:
                    self._used -= nbytes
                else:
                    self._waiters.remove(waiter)
                self._grant()
            raise

    def release(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        with self._lock:
            self._used -= nbytes
            self._grant()

    def hold(self, image: np.ndarray, nbytes: int) -> None:
        """Give ``nbytes`` back when ``image`` is freed or passed to :meth:`release_image`."""
        key = id(image)
        with self._lock:
            # id() is unique while the image lives, and the finalizer drops the key when it dies.
            self._held[key] = weakref.finalize(image, self._forget, key, nbytes)

    def release_image(self, image: object) -> None:
        with self._lock:
            finalizer = self._held.get(id(image))
        if finalizer is not None:
            finalizer()

    def _forget(self, key: int, nbytes: int) -> None:
        with self._lock:
            self._held.pop(key, None)
            self._used -= nbytes
            self._grant()

    def _take(self, nbytes: int) -> None:
        self._used += nbytes
        DECODE_BUDGET_IN_USE.set(self._used)

    def _grant(self) -> None:
        # Under the lock. Strict arrival order: the first waiter that does not fit stops the rest.
        while self._waiters and self._used + self._waiters[0].nbytes <= self.limit:
            waiter = self._waiters.popleft()
            waiter.granted = True
            self._take(waiter.nbytes)
            try:
                waiter.loop.call_soon_threadsafe(_wake, waiter.future)
            except RuntimeError:  # its loop is closed: nobody waits any more
                self._used -= waiter.nbytes
        DECODE_BUDGET_IN_USE.set(self._used)


def mib(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


_daemon = DecodeBudget(DEFAULT_MAX_DECODE_BYTES)


def daemon_budget() -> DecodeBudget:
    """The one budget every model of this process shares."""
    return _daemon


def set_daemon_budget(limit: int) -> DecodeBudget:
    """Replace the shared budget (``tegrad serve`` does, before any model loads)."""
    global _daemon
    _daemon = DecodeBudget(limit)
    return _daemon
