"""The on-disk repository: ``<repo>/<model>/config.toml`` and
``<repo>/<model>/<version>/<default_model_filename>`` (version = positive integer).

A version installed from a bundle carries its own ``config.toml`` (with the
calibration cache and labels it names) in its version directory; that config
wins over the model's, so versions of different precision live side by side.
Names starting with '.' are never models or versions: rollouts stage there.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from daemon.config import CONFIG_FILENAME
from daemon.errors import FailedPrecondition, NoSpace, NotFound, TegradError


def relative(root: Path, path: str | os.PathLike) -> str:
    """``path`` as clients see it: relative to the repository root (which is the server's business)."""
    try:
        return Path(path).relative_to(root).as_posix() or "."
    except ValueError:
        return Path(path).name


def scrub(root: Path, text: str) -> str:
    """Repository paths in ``text`` made relative, for messages that leave the server."""
    prefix = str(root).rstrip("/")
    return text.replace(prefix + "/", "").replace(prefix, "the model repository")


def file_error(root: Path, exc: OSError) -> TegradError:
    """An OSError met reading the repository as a status-bearing error naming the relative path."""
    where = relative(root, exc.filename) if exc.filename else "the model repository"
    if exc.errno in (errno.EACCES, errno.EPERM):
        if exc.filename:
            where = relative(root, _first_closed(root, Path(exc.filename)))
        if where == ".":
            where = "the model repository"
        return FailedPrecondition(f"{where} cannot be read by tegrad (permission denied): "
                                  "give the user tegrad runs as read access (and search access to directories)")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"no space left on the model repository writing {where}")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
        return NotFound(f"{where} does not exist in the model repository")
    return FailedPrecondition(f"{where} cannot be read: {exc.strerror or exc}")


def _first_closed(root: Path, path: Path) -> Path:
    """The directory on the way from ``root`` to ``path`` that cannot be searched (else ``path``):
    what the operator has to open up."""
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return path
    step = root
    for part in ("", *parts[:-1]):
        step = step / part if part else step
        if not os.access(step, os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            return step
    return path


def _is_dir(root: Path, path: Path) -> bool:
    """Like Path.is_dir(), but a path that cannot be looked at raises rather than answering False."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        raise file_error(root, exc) from None


def model_names(root: Path) -> list[str]:
    """Model directories; names starting with '.' or '_' are skipped (caches, __pycache__)."""
    try:
        os.stat(root)
        children = [p for p in root.iterdir() if not p.name.startswith((".", "_"))]
    except FileNotFoundError:
        raise NotFound("the model repository does not exist") from None
    except OSError as exc:
        raise file_error(root, exc) from None
    return sorted(p.name for p in children if _is_dir(root, p))


def model_dir(root: Path, name: str) -> Path:
    path = root / name
    if not name or "/" in name or "\0" in name or name.startswith((".", "_")):
        raise NotFound(f"model {name!r} is not in the model repository")
    if not _is_dir(root, path):  # an unreadable root says so, rather than that no model is there
        raise NotFound(f"model {name!r} is not in the model repository")
    return path


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def versions_on_disk(path: Path, filename: str | tuple[str, ...] | None = None) -> list[int]:
    """Version directories of a model, those holding ``filename`` (or one of them) when given."""
    names = (filename,) if isinstance(filename, str) else filename
    found = []
    for child in path.iterdir():
        if not (child.name.isascii() and child.name.isdigit() and int(child.name) > 0):
            continue
        try:
            if not stat.S_ISDIR(os.stat(child).st_mode) or (
                    names is not None and not any(_is_file(child / n) for n in names)):
                continue
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:  # cannot look inside: a version all the same, whose load says what is wrong
            pass
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
    try:
        return own if stat.S_ISREG(os.stat(own / CONFIG_FILENAME).st_mode) else model_path
    except OSError:  # missing, or unreadable: the version's load reports the latter
        return model_path


def staging_root(root: Path) -> Path:
    """Where rollouts build new versions before the atomic rename into ``<repo>/<model>/<version>``."""
    return root / ".staging"
