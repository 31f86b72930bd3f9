"""Shared pytest set-up.

tritonclient and tegrad's generated modules both define the protobuf package
``inference`` and cannot live in one process, so ``tests/interop`` and
``tests/fuzz`` (which import tritonclient and run tegrad as a separate process)
are collected only when pytest is pointed at them: ``make test`` runs the
sessions one after the other.
"""

from __future__ import annotations

from pathlib import Path

from daemon.engines.availability import cuda_unavailable, tensorrt_unavailable

INTEROP = Path(__file__).parent / "interop"
# The fuzz suite drives the daemon with tritonclient's messages too, so it runs apart as well.
APART = (INTEROP, Path(__file__).parent / "fuzz")


def _apart(path: Path) -> bool:
    return any(path == d or d in path.parents for d in APART)


def _targets_interop_only(config) -> bool:
    args = [Path(str(a).split("::")[0]).resolve() for a in config.args] or [Path.cwd()]
    return all(_apart(p) for p in args)


def pytest_ignore_collect(collection_path, config):
    path = Path(collection_path)
    if _apart(path) and not _targets_interop_only(config):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    import pytest

    reasons = {}
    for item in items:
        for marker, probe in (("gpu", cuda_unavailable), ("tensorrt", tensorrt_unavailable)):
            if marker in item.keywords:
                if marker not in reasons:
                    reasons[marker] = probe()
                if reasons[marker]:
                    item.add_marker(pytest.mark.skip(reason=reasons[marker]))
