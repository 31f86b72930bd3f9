"""Readiness, graceful drain, and systemd's notify protocol (READY/STOPPING/WATCHDOG)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Iterator

log = logging.getLogger("tegrad.lifecycle")


def sd_notify(state: str) -> bool:
    """Send a state string to systemd when run as a Type=notify unit; a no-op otherwise.

    The protocol is one datagram on $NOTIFY_SOCKET; a leading '@' names an
    abstract socket. Written out because it is a dozen lines and avoids a
    libsystemd dependency on Jetson images.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify(%r) failed: %s", state, exc)
        return False


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec when it applies to this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


class Lifecycle:
    def __init__(self, models, *, strict_readiness: bool = True) -> None:
        self.models = models
        # Triton's --strict-readiness: true = ready only when every model that should load is READY;
        # false = ready once started, whatever the models' states.
        self.strict_readiness = strict_readiness
        self.started = False
        self.draining = False
        self.stop_requested = asyncio.Event()
        self.inflight = 0  # requests doing work (inference, loads); the drain waits for them

    def ready(self) -> bool:
        if not self.started or self.draining:
            return False
        return self.models.all_ready() if self.strict_readiness else True

    def live(self) -> bool:
        # Triton stays live while it drains: a restart now would cut the in-flight requests.
        return True

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight, at most ``timeout`` s; True if idle."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.inflight and loop.time() < end:
            await asyncio.sleep(0.02)
        return not self.inflight

    def request_stop(self, signame: str) -> None:
        if not self.stop_requested.is_set():
            log.info("received %s: draining", signame)
        self.stop_requested.set()

    async def watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself, so a wedged loop stops the pings and systemd restarts us.
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)
