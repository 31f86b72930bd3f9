"""Ed25519 keys and signatures for bundles.

Key files are PEM so that ``openssl pkey`` and other tools read them:
``NAME.key`` is the private key (PKCS#8, unencrypted, mode 0600; keep it off
the devices), ``NAME.pub`` the public key (SubjectPublicKeyInfo). A device
trusts every ``*.pub`` in its trust directory.

A key's id is the first 16 hex digits of sha256 over its 32 raw public bytes,
short enough to read out loud and long enough to never collide in one fleet.

``manifest.sig`` is a small JSON document: the algorithm, the signer's key id
and the 64-byte raw signature (hex) over the exact bytes of ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from daemon.rollout import BundleError

log = logging.getLogger("tegrad.rollout")

ALGORITHM = "ed25519"
SIGNATURE_BYTES = 64
_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")


class SignatureError(BundleError):
    """The signature is missing, malformed, from an untrusted key, or does not match."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: str | os.PathLike[str], name: str = "tegrad") -> tuple[Path, Path, str]:
    """Write ``NAME.key`` (0600) and ``NAME.pub`` into ``out_dir``; returns both paths and the key id.

    Existing files are never overwritten: replacing a signing key by accident
    would strand every device that trusts the old one.
    """
    if not _KEY_NAME_RE.match(name):
        raise BundleError(f"key name {name!r}: use letters, digits, '_', '.' or '-' (at most 64)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (key_path, pub_path):
        if os.path.lexists(p):
            raise BundleError(f"{p} already exists; choose another --name or move the old key away")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pub = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    # O_EXCL with mode 0600 from the start: the key is never readable by others, not even briefly.
    _write_new(key_path, pem, 0o600)
    _write_new(pub_path, pub, 0o644)
    return key_path, pub_path, key_id(private.public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read private key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path} is not an unencrypted PEM private key ({exc}); "
                          "make one with `tegrad bundle keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("private key %s is readable by other users; chmod 600 it", path)
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise BundleError(f"cannot read public key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{path} is not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def sign(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """64-byte raw Ed25519 signature over exactly these bytes."""
    return private_key.sign(manifest_bytes)


def encode_signature(signer: str, signature: bytes) -> bytes:
    """Contents of ``manifest.sig``."""
    if len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"an Ed25519 signature has {SIGNATURE_BYTES} bytes, got {len(signature)}")
    doc = {"algorithm": ALGORITHM, "key_id": signer, "signature": signature.hex()}
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def decode_signature(data: bytes) -> tuple[str, bytes]:
    """``(key id, raw signature)`` from ``manifest.sig``."""
    try:
        doc = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(f"manifest.sig is not a tegrad signature file ({exc})") from None
    if not isinstance(doc, dict) or set(doc) != {"algorithm", "key_id", "signature"}:
        raise SignatureError("manifest.sig must hold exactly 'algorithm', 'key_id' and 'signature'")
    if doc["algorithm"] != ALGORITHM:
        raise SignatureError(f"manifest.sig: algorithm {doc['algorithm']!r} is not supported (only {ALGORITHM!r})")
    kid, sig_hex = doc["key_id"], doc["signature"]
    if not isinstance(kid, str) or not _KEY_ID_RE.match(kid):
        raise SignatureError(f"manifest.sig: key_id must be 16 lower-case hex digits, got {kid!r}")
    if not isinstance(sig_hex, str) or not re.fullmatch(r"[0-9a-f]{128}", sig_hex):
        raise SignatureError("manifest.sig: signature must be 128 lower-case hex digits (64 bytes)")
    return kid, bytes.fromhex(sig_hex)


class TrustStore:
    """The public keys a device accepts bundles from: every ``*.pub`` in one directory.

    A ``.pub`` file that cannot be read as an Ed25519 key is an error rather
    than skipped, so a broken trust directory is noticed when it is loaded and
    not when the first bundle is refused.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise BundleError(f"trust directory {self.directory} does not exist; put the signers' .pub files there")
        self.keys: dict[str, tuple[Path, Ed25519PublicKey]] = {}
        for path in sorted(self.directory.glob("*.pub")):
            key = load_public_key(path)
            self.keys.setdefault(key_id(key), (path, key))

    def __len__(self) -> int:
        return len(self.keys)

    def describe(self) -> str:
        if not self.keys:
            return f"none (no *.pub files in {self.directory})"
        return ", ".join(f"{kid} ({path.name})" for kid, (path, _) in self.keys.items())

    def verify(self, manifest_bytes: bytes, signature: bytes, signer: str) -> Path:
        """Check ``signature`` by key ``signer`` over ``manifest_bytes``; returns the trusted key's file."""
        if signer not in self.keys:
            raise SignatureError(f"bundle is signed by unknown key {signer}; trusted keys: {self.describe()}")
        path, key = self.keys[signer]
        try:
            key.verify(signature, manifest_bytes)
        except InvalidSignature:
            raise SignatureError(
                f"signature does not match the manifest (key {signer}, {path.name}): "
                "manifest.json was changed after signing, or the bundle is damaged"
            ) from None
        return path
