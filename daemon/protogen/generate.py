"""Regenerate the committed protobuf/gRPC modules from protos/.

Run as ``python -m daemon.protogen.generate`` (``make protos``). protoc emits
imports relative to its include path (``import model_config_pb2``,
``from tegrad.v1 import admin_pb2``) that only work when the output folder is on
sys.path; the modules are flattened into ``daemon.protogen`` and those imports
rewritten to package imports. ``tegrad/v1/admin.proto`` keeps its full path as
its name in the protobuf descriptor pool, so it cannot clash with another
``admin.proto``. ``--check`` regenerates into
a temporary folder and reports files that differ (used by the tests).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# (include directory, proto files relative to it)
PROTOS = [
    (ROOT / "protos" / "inference", ["grpc_service.proto", "model_config.proto"]),
    (ROOT / "protos", ["tegrad/v1/admin.proto"]),
]
OUT = Path(__file__).resolve().parent
_IMPORT = re.compile(r"^(?:import|from [\w.]+ import) (\w+_pb2) as (\w+)$", re.MULTILINE)


def _generate(dest: Path) -> list[Path]:
    from grpc_tools import protoc  # test extra: only needed to regenerate

    written: list[Path] = []
    for proto_dir, protos in PROTOS:
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{proto_dir}",
            f"-I{include}",
            f"--python_out={dest}",
            f"--pyi_out={dest}",
            f"--grpc_python_out={dest}",
            *[str(proto_dir / p) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_dir}")
    for nested in sorted(dest.glob("*/**/*_pb2*.py*")):
        nested.rename(dest / nested.name)
    for folder in sorted((p for p in dest.glob("*/**") if p.is_dir()), reverse=True):
        folder.rmdir()
    for path in sorted(dest.glob("*_pb2*.py*")):
        text = path.read_text()
        text = _IMPORT.sub(r"from daemon.protogen import \1 as \2", text)
        path.write_text(text)
        written.append(path)
    return written


def check() -> list[str]:
    """Names of generated files that differ from what protoc produces now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in _generate(Path(tmp))}
    committed = {p.name: p.read_text() for p in OUT.glob("*_pb2*.py*")}
    names = set(fresh) | set(committed)
    return sorted(n for n in names if fresh.get(n) != committed.get(n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report differences")
    args = parser.parse_args(argv)
    if args.check:
        diff = check()
        for name in diff:
            print(f"out of date: daemon/protogen/{name}")
        return 1 if diff else 0
    for path in _generate(OUT):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
