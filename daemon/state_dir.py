"""Where tegrad keeps its state by default: one answer for the daemon and for the clients that
find its admin socket there."""

from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    if os.environ.get("TEGRAD_STATE_DIR"):
        return Path(os.environ["TEGRAD_STATE_DIR"])
    if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "tegrad"
