"""Log lines that a client can trigger at will, at most one per source per interval.

A client sending garbage in a loop must not be able to fill the disk or drown
the journal: the first occurrence from a source is logged, the rest within the
interval are counted and reported with the next line that gets through.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict


def source_of(peer: str | None) -> str:
    """The client host of a gRPC peer string ("ipv4:10.0.0.5:51234" → "ipv4:10.0.0.5"):
    per host, not per connection, or a client reconnecting would evade the limit."""
    if not peer:
        return "unknown"
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, max_sources: int = 1024,
                 clock=time.monotonic) -> None:
        self._log = logger
        self._interval = interval_s
        self._max = max_sources
        self._clock = clock
        # source → (time of the last line logged, occurrences suppressed since)
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def warning(self, source: str, message: str, *args) -> bool:
        """Log ``message % args`` for ``source`` unless it logged within the interval; True if logged."""
        now = self._clock()
        last = self._seen.get(source)
        if last is not None and now - last[0] < self._interval:
            self._seen[source] = (last[0], last[1] + 1)
            return False
        suppressed = last[1] if last is not None else 0
        self._seen[source] = (now, 0)
        self._seen.move_to_end(source)
        while len(self._seen) > self._max:  # bounded memory under many sources
            self._seen.popitem(last=False)
        suffix = f" ({suppressed} more from {source} in the last {self._interval:.0f} s not logged)" if suppressed else ""
        self._log.warning(message + "%s", *args, suffix)
        return True
