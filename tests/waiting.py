"""Waiting on a condition, the one way tests wait (never on a fixed sleep)."""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.02):
    """Poll ``predicate`` until it returns something true and return that; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
