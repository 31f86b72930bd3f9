"""``tegrad push`` and ``tegrad rollout status | activate | rollback | delete | operations``: the admin API
from a shell (or a fleet job). Exit codes: 0 success, 1 the operation failed (e.g. validation), 2 refused
or unreachable."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from daemon.rollout.cli import command, positive_int


def _client(args: argparse.Namespace):
    from daemon.rollout.admin_client import AdminClient, default_address

    address = args.admin or default_address(args.state_dir)
    return AdminClient(address, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def _op_line(op: Any) -> str:
    from daemon.rollout.admin_client import state_name

    what = f"{op.model} v{op.version}" if op.model else "(bundle not yet verified)"
    tail = f": {op.error}" if op.error else (f" ({op.progress})" if op.progress else "")
    return f"{op.id} {what} {state_name(op.state)}{tail}"


def cmd_push(args: argparse.Namespace) -> int:
    from calib.cache import sha256_file
    from daemon.rollout.admin_client import state_name
    from daemon.rollout.bundle import read_manifest

    path = Path(args.bundle)
    # Unverified claims, enough to ask the device first: a refusal then costs no upload.
    manifest = read_manifest(path).manifest
    with _client(args) as c:
        check = c.check_bundle(manifest.model, manifest.version, path.stat().st_size, sha256_file(path))
        if check is not None and check.received:
            print(f"the device holds {check.received} bytes of {path.name} already; resuming", file=sys.stderr)
        start = time.monotonic()
        last = [0.0]

        def progress(sent: int, total: int) -> None:
            if time.monotonic() - last[0] > 1.0 or sent == total:
                last[0] = time.monotonic()
                print(f"uploading {path.name}: {sent}/{total} bytes", file=sys.stderr)

        status = c.upload(path, chunk=args.chunk_kb << 10, progress=progress)
        uploaded = time.monotonic() - start
        print(f"uploaded {path.name} ({status.total_size} bytes, sha256 {status.sha256[:16]}…) in {uploaded:.2f} s")
        op = c.stage(status.sha256, auto_activate=args.activate)
        print(f"staging: operation {op.id}")
        if args.no_wait:
            return 0
        op = c.wait(op.id, lambda o: print(_op_line(o), file=sys.stderr))
        took = time.monotonic() - start
        from daemon.telemetry.metrics import ROLLOUT_STAGES

        stages = ", ".join(f"{k} {op.stage_seconds[k]:.2f} s" for k in ROLLOUT_STAGES if k in op.stage_seconds)
        if op.validation.task:
            v = op.validation
            scores = ", ".join(f"{k} {s:.4f}" for k, s in sorted(v.scores.items()))
            print(f"validation {'passed' if v.passed else 'FAILED'} ({v.task}, {v.samples} samples, {scores})")
        if state_name(op.state) != "SUCCEEDED":
            print(f"FAILED {op.model} v{op.version}: {op.error}")
            return 1
        print(f"{'active' if args.activate else 'staged'}: {op.model} v{op.version} in {took:.2f} s from push "
              f"(upload {uploaded:.2f} s, {stages})")
    return 0


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if t else "-"


def cmd_status(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from daemon.rollout.admin_client import state_name

    with _client(args) as c:
        models = c.models(args.model or "")
    if args.json:
        print(json.dumps([MessageToDict(m, preserving_proto_field_name=True) for m in models], indent=2))
        return 0
    for m in models:
        print(f"{m.name}: active {m.active_version or '(version policy)'}, rollback to {m.previous_version or '-'}")
        for v in m.versions:
            scores = ", ".join(f"{k} {s:.4f}" for k, s in sorted(v.validation.scores.items()))
            print(f"  v{v.version:<4} {state_name(v.state, _version_enum()) or '-':<10} {v.serving_state or '-':<11} "
                  f"{v.precision or '-':<6} engine {v.engine_id or '-':<16} calib {v.calibration_cache_id or '-':<16} "
                  f"staged {_when(v.staged)} activated {_when(v.activated)}"
                  f"{'  ' + scores if scores else ''}{'  (' + v.reason + ')' if v.reason else ''}")
    return 0


def _version_enum():
    from daemon.protogen import admin_pb2

    return admin_pb2.VersionState


def cmd_activate(args: argparse.Namespace) -> int:
    start = time.monotonic()
    with _client(args) as c:
        m = c.activate(args.model, args.model_version)
    print(f"{m.name}: version {m.active_version} active in {time.monotonic() - start:.2f} s "
          f"(rollback goes to {m.previous_version or '-'})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    start = time.monotonic()
    with _client(args) as c:
        m = c.rollback(args.model)
    print(f"{m.name}: rolled back to version {m.active_version} in {time.monotonic() - start:.2f} s")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.delete(args.model, args.model_version)
    print(f"{args.model}: version {args.model_version} deleted")
    return 0


def cmd_operations(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.watch is not None:
            for op in c.watch(args.watch, args.model or ""):
                print(_op_line(op), flush=True)
            return 0
        for op in c.operations(args.model or ""):
            print(_op_line(op))
    return 0


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin", default=None, metavar="ADDRESS",
                   help="admin API: unix:PATH or HOST:PORT (default: unix:<state dir>/admin.sock)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the daemon's --state-dir: its admin socket is <state dir>/admin.sock (default: "
                        "$TEGRAD_STATE_DIR, else $XDG_STATE_HOME/tegrad, i.e. ~/.local/state/tegrad)")
    p.add_argument("--tls-ca", type=Path, help="for HOST:PORT: CA certificate that signed the device's certificate")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="its private key (PEM)")


def register(sub: Any) -> None:
    p = sub.add_parser("push", help="upload a bundle to a device, stage it (verify, build, validate), optionally activate",
                       description="Uploads in chunks (resuming after a broken connection), then stages and waits. "
                                   "Exit 0 when staged (or active with --activate), 1 when refused by validation "
                                   "or the build, 2 when the device refused or could not be reached.")
    p.add_argument("bundle")
    p.add_argument("--activate", action="store_true", help="activate when validation passes")
    p.add_argument("--no-wait", action="store_true", help="return once staging has started")
    p.add_argument("--chunk-kb", type=int, default=1024, help="upload chunk size (default: %(default)s)")
    _connection(p)
    p.set_defaults(func=command(cmd_push, "push"))

    r = sub.add_parser("rollout", help="model versions on a device: status, activate, rollback, delete, operations")
    rs = r.add_subparsers(dest="rollout_command", metavar="{status,activate,rollback,delete,operations}")
    rs.required = True
    s = rs.add_parser("status", help="models, versions, rollout and serving states, validation scores")
    s.add_argument("model", nargs="?")
    s.add_argument("--json", action="store_true")
    _connection(s)
    s.set_defaults(func=command(cmd_status, "rollout status"))
    a = rs.add_parser("activate", help="serve a staged or earlier version")
    a.add_argument("model")
    a.add_argument("model_version", type=positive_int, metavar="version")
    _connection(a)
    a.set_defaults(func=command(cmd_activate, "rollout activate"))
    b = rs.add_parser("rollback", help="serve the previously active version again")
    b.add_argument("model")
    _connection(b)
    b.set_defaults(func=command(cmd_rollback, "rollout rollback"))
    d = rs.add_parser("delete", help="delete a version that is not active (files and cached engines)")
    d.add_argument("model")
    d.add_argument("model_version", type=positive_int, metavar="version")
    _connection(d)
    d.set_defaults(func=command(cmd_delete, "rollout delete"))
    o = rs.add_parser("operations", help="staging, activate and rollback operations; --watch follows them")
    o.add_argument("--model")
    o.add_argument("--watch", nargs="?", const="", default=None, metavar="ID",
                   help="stream changes (of one operation, until it is done)")
    _connection(o)
    o.set_defaults(func=command(cmd_operations, "rollout operations"))
