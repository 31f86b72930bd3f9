"""Package layering: the shared types and defaults live below the packages that use them, so no
two packages lean on each other (issue 11's layout note). Read from the import statements."""

from __future__ import annotations

import ast
from pathlib import Path

DAEMON = Path(__file__).resolve().parents[1] / "daemon"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _package_imports(package: str) -> dict[str, set[str]]:
    return {str(p.relative_to(DAEMON)): _imports(p) for p in (DAEMON / package).rglob("*.py")}


def _offenders(package: str, forbidden: str) -> list[str]:
    return sorted(f"{f} imports {m}" for f, mods in _package_imports(package).items()
                  for m in mods if m == forbidden or m.startswith(forbidden + "."))


def test_processing_does_not_import_engines():
    assert _offenders("processing", "daemon.engines") == []


def test_engines_do_not_import_processing():
    assert _offenders("engines", "daemon.processing") == []


def test_rollout_does_not_import_the_cli():
    assert _offenders("rollout", "daemon.cli") == []


def test_shared_modules_import_nothing_of_daemon():
    for name in ("tensor_spec.py", "device_tensor.py", "state_dir.py"):
        assert not [m for m in _imports(DAEMON / name) if m.startswith("daemon")], name
