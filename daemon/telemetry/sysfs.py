"""Reading sysfs/procfs files that may be missing, unreadable or busy.

Every helper returns None instead of raising: on a Jetson a powered-off engine's
thermal zone answers EAGAIN, debugfs is root-only and files come and go with
JetPack releases, and each of those must cost only the one value.
"""

from __future__ import annotations

import os
from pathlib import Path


def read_text(path: Path | str) -> str | None:
    # os.open/os.read: a third of the cost of open() with its buffered file object, at ~150 files a period.
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
    except OSError:
        return None
    # Device-tree properties end in NUL; sysfs values in a newline.
    text = data.decode("utf-8", "replace").strip("\0\n\t ")
    return text or None


def read_file(path: Path | str) -> str | None:
    """A whole regular file (dpkg's status, nvpmodel.conf), beyond the one read sysfs values need."""
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def read_int(path: Path | str) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def read_lines(path: Path | str) -> list[str]:
    text = read_text(path)
    return text.splitlines() if text else []


def numbered(parent: Path, prefix: str) -> list[Path]:
    """``parent/prefixN`` directories in numeric order (thermal_zone10 after thermal_zone9)."""
    try:
        entries = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    except OSError:
        return []
    return sorted(entries, key=lambda p: int(p.name[len(prefix):]))
