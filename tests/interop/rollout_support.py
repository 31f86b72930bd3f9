"""What the rollout tests share: signing keys, digits bundles (fp32 and int8), a tegrad with its
admin API on a real Unix socket, and a fingerprint of the files on disk.

The admin socket lives in a short directory under /tmp: a Unix socket path holds at most
107 bytes, which pytest's temporary directories can exceed.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.protogen import admin_pb2
from daemon.rollout import signing
from daemon.rollout.admin_client import AdminClient, state_name
from daemon.rollout.bundle import validation_for
from daemon.rollout.make import create, sign_bundle
from tests.interop.conftest import DIGITS, Server, start_server

CREATED = "2026-01-02T03:04:05Z"


@dataclass
class Keys:
    signer: Path      # private key whose .pub the device trusts
    rogue: Path       # private key nobody trusts
    trust_dir: Path   # holds signer's .pub


def make_keys(root: Path) -> Keys:
    signer, pub, _ = signing.generate_keypair(root / "signer", "fleet")
    rogue, _, _ = signing.generate_keypair(root / "rogue", "rogue")
    trust = root / "trusted"
    trust.mkdir()
    shutil.copy(pub, trust / pub.name)
    return Keys(signer, rogue, trust)


def golden_digits(count: int = 64) -> np.ndarray:
    with np.load(DIGITS / "data" / "heldout.npz") as z:
        return (z["x"][:count].astype(np.float32) / 16).reshape(-1, 1, 8, 8)


def heldout_digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(DIGITS / "data" / "heldout.npz") as z:
        return (z["x"].astype(np.float32) / 16).reshape(-1, 1, 8, 8), z["y"].astype(np.int64)


def digits_source(root: Path, precision: str = "int8") -> Path:
    """A model directory of the digits model in ``precision`` (int8 uses the shipped calibration cache)."""
    d = root / f"digits-{precision}" / "digits"
    d.mkdir(parents=True)
    shutil.copy(DIGITS / "1" / "model.onnx", d / "model.onnx")
    for name in ("calib.json", "labels.txt"):
        shutil.copy(DIGITS / name, d / name)
    config = (DIGITS / "config.toml").read_text()
    if precision != "fp32":
        config = config.replace('precision = "fp32"', f'precision = "{precision}"\ncalibration_cache = "calib.json"')
    (d / "config.toml").write_text(config)
    return d


def make_bundle(source: Path, out: Path, version: int, key: Path | None, **kw) -> Path:
    """A digits bundle of ``version`` made from ``source``, signed with ``key`` (unsigned when None)."""
    kw.setdefault("golden_inputs", golden_digits())
    kw.setdefault("golden_count", 64)
    create(source, out, version=version, created=CREATED, **kw)
    if key is not None:
        sign_bundle(out, key)
    return out


def strict_validation():
    """Thresholds an INT8 engine cannot meet: its logits are close to FP32, never equal."""
    return validation_for("classification", min_cosine=0.9999999)


def copy_repository(root: Path) -> Path:
    repo = root / "repo"
    shutil.copytree(DIGITS, repo / "digits", ignore=shutil.ignore_patterns("data", "README.md"))
    return repo


def short_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tgd-", dir="/tmp"))


@dataclass
class Device:
    """A tegrad serving ``repo`` with its admin API on ``socket``."""

    server: Server
    repo: Path
    state: Path
    socket: Path
    args: tuple[str, ...]

    @property
    def admin_address(self) -> str:
        return f"unix:{self.socket}"

    def admin(self) -> AdminClient:
        return AdminClient(self.admin_address)


def start_device(root: Path, trust_dir: Path | None, *, repo: Path | None = None, state: Path | None = None,
                 socket: Path | None = None, args: tuple[str, ...] = (), env: dict | None = None,
                 wait_ready: bool = True) -> Device:
    """Start tegrad with a repository holding digits v1 (fp32), trusting ``trust_dir``'s keys."""
    repo = repo or copy_repository(root)
    state = state or root / "state"
    socket = socket or short_dir() / "admin.sock"
    all_args = ("--admin-socket", str(socket), *(("--trust-dir", str(trust_dir)) if trust_dir else ()), *args)
    server = start_server(repository=repo, state_dir=state, args=all_args, env=env, wait_ready=wait_ready)
    return Device(server, repo, state, socket, all_args)


def restart(device: Device, *, env: dict | None = None) -> Device:
    """Start tegrad again on the same repository, state and socket (after a stop or a kill)."""
    if device.server.proc.poll() is None:
        device.server.stop()
    server = start_server(repository=device.repo, state_dir=device.state, args=device.args, env=env)
    return Device(server, device.repo, device.state, device.socket, device.args)


def wait_for_exit(device: Device, timeout: float = 120) -> int:
    """The exit status of a tegrad expected to die (a crash point SIGKILLs it: -9)."""
    return device.server.proc.wait(timeout)


def push(client: AdminClient, bundle: Path, *, activate: bool = False):
    """Upload, stage and wait; the finished operation."""
    status = client.upload(bundle)
    assert status.complete
    op = client.stage(status.sha256, auto_activate=activate)
    return client.wait(op.id)


def op_state(op) -> str:
    return state_name(op.state)


def version_states(client: AdminClient, model: str = "digits") -> dict[int, str]:
    (m,) = client.models(model)
    return {v.version: state_name(v.state, admin_pb2.VersionState) for v in m.versions}


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path → sha256): what 'nothing changed on disk' compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
