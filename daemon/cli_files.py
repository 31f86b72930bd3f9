"""The file arguments of each ``tegrad`` command that must exist before the command starts.

Checked once after parsing, for every command in one table, so that a path
that is not there costs the user one line naming the argument and the path
(exit 2, as argparse does for its own refusals) instead of a traceback or a
half-done run. Arguments a command writes (``--out`` and the like) are not
listed. An attribute a command does not have is skipped, so the table may
name options another command adds later.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FILE, DIR, ANY = "file", "directory", "file or directory"

# command (with subcommand) -> [(attribute, how the user wrote it, what it must be)]
INPUTS: dict[str, list[tuple[str, str, str]]] = {
    "serve": [("model_repository", "--model-repository", DIR), ("admin_tls_cert", "--admin-tls-cert", FILE),
              ("admin_tls_key", "--admin-tls-key", FILE), ("admin_client_ca", "--admin-client-ca", FILE),
              ("trust_dir", "--trust-dir", DIR)],
    "infer": [("image", "--image", FILE), ("input", "--input", FILE)],
    "perf": [("image", "--image", ANY), ("input_data", "--input-data", FILE)],
    "bundle create": [("model", "MODEL", ANY), ("config", "--config", FILE),
                      ("calibration_cache", "--calibration-cache", FILE), ("labels", "--labels", FILE),
                      ("golden_inputs", "--golden-inputs", ANY), ("calibrate_data", "--calibrate-data", ANY),
                      ("key", "--key", FILE)],
    "bundle sign": [("bundle", "BUNDLE", FILE), ("key", "--key", FILE)],
    "bundle verify": [("bundle", "BUNDLE", FILE), ("trust", "--trust", DIR)],
    "bundle inspect": [("bundle", "BUNDLE", FILE)],
    "push": [("bundle", "BUNDLE", FILE)],
    "calibrate": [("model", "MODEL", FILE), ("data", "--data", ANY), ("observations", "--observations", FILE),
                  ("config", "--config", ANY)],
    "quantize": [("model", "MODEL", FILE), ("cache", "--cache", FILE), ("config", "--config", ANY)],
    "sensitivity": [("model", "MODEL", FILE), ("cache", "--cache", FILE), ("data", "--data", ANY),
                    ("labels", "--labels", FILE), ("config", "--config", ANY)],
    "evaluate": [("reference", "REFERENCE", FILE), ("candidate", "CANDIDATE", FILE), ("data", "--data", ANY),
                 ("labels", "--labels", FILE), ("config", "--config", ANY)],
    "cache convert": [("input", "INPUT", FILE)],
}
# Every client of the admin API takes these.
_TLS = [("tls_ca", "--tls-ca", FILE), ("tls_cert", "--tls-cert", FILE), ("tls_key", "--tls-key", FILE)]
for _name in ("push", "rollout status", "rollout activate", "rollout rollback", "rollout delete",
              "rollout operations"):
    INPUTS.setdefault(_name, []).extend(_TLS)


def command_name(args: argparse.Namespace) -> str:
    parts = [getattr(args, "command", None)]
    parts += [getattr(args, dest, None) for dest in ("bundle_command", "rollout_command", "cache_command")]
    return " ".join(p for p in parts if p)


def _paths(value: object, attr: str) -> list[str]:
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if v is None or v == "":
            continue
        text = str(v)
        if attr == "input" and "=" in text:  # NAME=FILE.npy
            text = text.partition("=")[2]
        out.append(text)
    return out


def problem(args: argparse.Namespace) -> str | None:
    """One line naming the first input file argument that is missing or of the wrong kind, or None."""
    name = command_name(args)
    for attr, label, kind in INPUTS.get(name, ()):
        for text in _paths(getattr(args, attr, None), attr):
            path = Path(text).expanduser()
            if not path.exists():
                return f"tegrad {name}: error: {label} {text}: no such {kind}"
            if kind == FILE and path.is_dir():
                return f"tegrad {name}: error: {label} {text}: is a directory, a file is expected"
            if kind == DIR and not path.is_dir():
                return f"tegrad {name}: error: {label} {text}: is not a directory"
    return None


def check(args: argparse.Namespace) -> int | None:
    """Print the problem and return exit code 2, or None when every input file is there."""
    line = problem(args)
    if line is None:
        return None
    print(line, file=sys.stderr)
    return 2
