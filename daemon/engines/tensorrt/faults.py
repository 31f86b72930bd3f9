"""What a CUDA error means for the process. Most errors belong to one call (a bad shape, out of
memory); a *sticky* error (an illegal address, a failed launch) poisons the CUDA context of the
whole process: every later call on it fails, whichever engine makes it. The engine that meets
one turns UNAVAILABLE with that first error, and the process is told, so that it can restart
(systemd's Restart=on-failure brings the daemon back with a fresh context) instead of serving
errors forever.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("tegrad.engines.tensorrt")

# The CUDA driver's descriptions of the errors after which the context cannot be used again
# (CUDA_ERROR_ILLEGAL_ADDRESS, _LAUNCH_FAILED, _HARDWARE_STACK_ERROR, _ILLEGAL_INSTRUCTION,
# _MISALIGNED_ADDRESS, _INVALID_ADDRESS_SPACE, _INVALID_PC, _ECC_UNCORRECTABLE), as pycuda and
# TensorRT's log quote them, plus the codes TensorRT prints.
_STICKY = (
    "illegal memory access", "illegal address", "unspecified launch failure", "launch failed",
    "hardware stack error", "illegal instruction", "misaligned address", "invalid address space",
    "invalid program counter", "uncorrectable ecc", "cuda error 700", "cuda error 719",
)
# EX_TEMPFAIL: a failure worth retrying, which systemd's Restart=on-failure does.
EXIT_CUDA_FAULT = 75

_lock = threading.Lock()
_handler: Callable[[str], None] | None = None
_reported = False


def is_sticky(message: str) -> bool:
    text = message.lower()
    return any(marker in text for marker in _STICKY)


def on_sticky_fault(handler: Callable[[str], None] | None) -> None:
    """Who hears about a poisoned context (the server, a test); None restores the default: exit."""
    global _handler, _reported
    with _lock:
        _handler, _reported = handler, False


def report_sticky_fault(message: str) -> None:
    """Once per process: later engines meeting the same poisoned context add nothing."""
    global _reported
    with _lock:
        if _reported:
            return
        _reported = True
        handler = _handler
    log.critical("the CUDA context is unusable (%s); tegrad exits so that its supervisor restarts it", message)
    if handler is not None:
        handler(message)
        return
    logging.shutdown()
    os._exit(EXIT_CUDA_FAULT)  # no drain: nothing queued on this context can finish anyway
