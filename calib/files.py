"""File-system durability shared by everything that writes state: caches, models, engines, bundles."""

from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in ``path`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
