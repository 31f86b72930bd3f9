"""Crash points for tests of crash safety.

``TEGRAD_CRASH_AT=<point>[,<point>...]`` makes the daemon SIGKILL itself the
first time it reaches one of the named points, so that a test can stop it at
an exact moment of a rollout instead of guessing with timers. Points: ``upload``
(a chunk was written, the upload is not complete), ``build`` (the build worker is
running), ``validate`` (the engine is built, validation not begun), ``install``
(the version directory is in the repository, STAGED not yet recorded),
``activate`` (the new version serves, ACTIVE not yet committed). Unset in
production, where :func:`reached` costs one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("tegrad")
POINTS = ("upload", "build", "validate", "install", "activate")


def reached(point: str) -> None:
    wanted = os.environ.get("TEGRAD_CRASH_AT")
    if wanted and point in wanted.split(","):
        log.warning("TEGRAD_CRASH_AT=%s: killing tegrad with SIGKILL at %r (a crash test)", wanted, point)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
