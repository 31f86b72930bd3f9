"""The on-disk repository: ``<repo>/<model>/config.toml`` and
``<repo>/<model>/<version>/<default_model_filename>`` (version = positive integer)."""

from __future__ import annotations

from pathlib import Path

from daemon.errors import NotFound


def model_names(root: Path) -> list[str]:
    """Model directories; names starting with '.' or '_' are skipped (caches, __pycache__)."""
    if not root.is_dir():
        raise NotFound(f"model repository {root} does not exist")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def model_dir(root: Path, name: str) -> Path:
    path = root / name
    if not name or "/" in name or name.startswith((".", "_")) or not path.is_dir():
        raise NotFound(f"model {name!r} is not in the repository {root}")
    return path


def versions_on_disk(path: Path, filename: str) -> list[int]:
    found = []
    for child in path.iterdir():
        if child.is_dir() and child.name.isdigit() and int(child.name) > 0 and (child / filename).is_file():
            found.append(int(child.name))
    return sorted(found)
