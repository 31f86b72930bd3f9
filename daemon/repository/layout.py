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


def versions_on_disk(path: Path, filename: str | tuple[str, ...] | None = None) -> list[int]:
    """Version directories of a model, those holding ``filename`` (or one of them) when given."""
    names = (filename,) if isinstance(filename, str) else filename
    found = []
    for child in path.iterdir():
        if child.is_dir() and child.name.isdigit() and int(child.name) > 0 \
                and (names is None or any((child / n).is_file() for n in names)):
            found.append(int(child.name))
    return sorted(found)


# What DeepStream and trtexec users bring: an engine already built (served as is by backend "tensorrt").
PREBUILT_ENGINES = ("model.plan", "model.engine")


def model_filenames(config) -> tuple[str, ...]:
    """The files that can be a version's model, in the order they are looked for."""
    if config.backend == "tensorrt":
        return (config.default_model_filename, *(n for n in PREBUILT_ENGINES if n != config.default_model_filename))
    return (config.default_model_filename,)


def model_file(version_dir: Path, config) -> Path:
    """The version's model: its ONNX, or for backend "tensorrt" a prebuilt plan when there is no ONNX."""
    for name in model_filenames(config):
        if (version_dir / name).is_file():
            return version_dir / name
    return version_dir / config.default_model_filename


def config_dir(model_path: Path, version: int) -> Path:
    """Where version ``version``'s config.toml and the files it names live."""
    own = model_path / str(version)
    return own if (own / CONFIG_FILENAME).is_file() else model_path


def staging_root(root: Path) -> Path:
    """Where rollouts build new versions before the atomic rename into ``<repo>/<model>/<version>``."""
    return root / ".staging"
