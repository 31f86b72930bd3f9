"""A precision suggestion as model ``config.toml`` text, printed or merged into an existing file.

``tegrad sensitivity`` (and ``tegrad plan``) end with a list of layers to keep out of INT8; this
turns it into the keys the daemon reads (``precision``, ``exclude``, ``exclude_precision``,
``calibration_cache``). Merging goes through tomlkit, so the file's other keys, tables and
comments stay as they were; the result is checked with the daemon's own loader before it
replaces the file (atomically), so a config that would not load is never written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

CONFIG_FILENAME = "config.toml"


def suggested_keys(
    exclude: Sequence[str],
    explicit: bool = False,
    exclude_precision: str = "fp16",
    calibration_cache: str | None = None,
) -> dict:
    """The top-level keys for the suggestion: ``mixed`` with exclusions, else ``int8`` (``explicit`` for Q/DQ models)."""
    keys: dict = {}
    if explicit:
        keys["precision"] = "explicit"
    else:
        keys["precision"] = "mixed" if exclude else "int8"
        if calibration_cache:
            keys["calibration_cache"] = calibration_cache
    if exclude:
        keys["exclude"] = list(exclude)
        if not explicit:
            keys["exclude_precision"] = exclude_precision
    return keys


def _document(keys: dict, doc=None):
    import tomlkit

    doc = tomlkit.document() if doc is None else doc
    for name, value in keys.items():
        if isinstance(value, list):
            arr = tomlkit.array()
            arr.extend(value)
            arr.multiline(len(value) > 1)
            value = arr
        doc[name] = value  # tomlkit puts new top-level keys before the first [table]
    return doc


def snippet(
    exclude: Sequence[str],
    explicit: bool = False,
    exclude_precision: str = "fp16",
    calibration_cache: str | None = None,
) -> str:
    """TOML text with the suggested keys, to paste at the top of the model's config.toml."""
    import tomlkit

    return tomlkit.dumps(_document(suggested_keys(exclude, explicit, exclude_precision, calibration_cache)))


def write_config(
    path: str | os.PathLike,
    exclude: Sequence[str],
    explicit: bool = False,
    exclude_precision: str = "fp16",
    calibration_cache: str | os.PathLike | None = None,
) -> Path:
    """Merge the suggestion into ``path`` (a config.toml, or a model folder holding one); returns the file.

    ``calibration_cache`` is written relative to the config's folder, and only when the file
    names none yet (an existing one is kept). Raises ``daemon.config.ConfigError`` when the
    result would not load; the file is then left untouched.
    """
    import tomlkit

    from calib.cache import atomic_write_text
    from daemon.config import parse_model_config

    target = Path(path)
    if target.is_dir() or (not target.suffix and not target.exists()):
        target = target / CONFIG_FILENAME
    text = target.read_text(encoding="utf-8") if target.exists() else ""
    doc = tomlkit.parse(text)
    cache = None
    if calibration_cache is not None and not explicit and "calibration_cache" not in doc:
        cache = os.path.relpath(Path(calibration_cache).resolve(), target.parent.resolve())
    keys = suggested_keys(exclude, explicit, exclude_precision, cache)
    if not explicit and "exclude_precision" not in keys and "exclude" in doc:
        del doc["exclude"]  # plain int8 takes no exclude (the loader would refuse it)
    out = tomlkit.dumps(_document(keys, doc))
    parse_model_config(out, target, target.parent.name)  # ConfigError names the problem
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, out)
    return target
