"""The on-disk repository: ``<repo>/<model>/config.toml`` and
``<repo>/<model>/<version>/<default_model_filename>`` (version = positive integer).

A version installed from a bundle carries its own ``config.toml`` (with the
calibration cache and labels it names) in its version directory; that config
wins over the model's, so versions of different precision live side by side.
Names starting with '.' are never models or versions: rollouts stage there.
"""

from __future__ import annotations

from pathlib import Path

from daemon.config import CONFIG_FILENAME
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


def versions_on_disk(path: Path, filename: str | None = None) -> list[int]:
    """Version directories of a model, those holding ``filename`` when given."""
    found = []
    for child in path.iterdir():
        if child.is_dir() and child.name.isdigit() and int(child.name) > 0 \
                and (filename is None or (child / filename).is_file()):
            found.append(int(child.name))
    return sorted(found)


def config_dir(model_path: Path, version: int) -> Path:
    """Where version ``version``'s config.toml and the files it names live."""
    own = model_path / str(version)
    return own if (own / CONFIG_FILENAME).is_file() else model_path


def staging_root(root: Path) -> Path:
    """Where rollouts build new versions before the atomic rename into ``<repo>/<model>/<version>``."""
    return root / ".staging"
