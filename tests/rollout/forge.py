"""Hand-made bundles for tests: hostile tars and correctly signed forgeries of real bundles."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from daemon.rollout import signing
from daemon.rollout.bundle import Manifest, MemberInfo, parse_manifest


def members(path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tf:
        return [(m, tf.extractfile(m).read()) for m in tf.getmembers()]


def write_tar(path, entries) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in entries:
            if data is None:
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def entry(name, data=b"", type_=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    return info, (data if type_ == tarfile.REGTYPE else None)


def forge(src, dst, key, replace=None, update=None) -> Path:
    """A correctly hashed and signed copy of ``src`` with members and manifest fields changed."""
    items = {m.name: data for m, data in members(src)}
    manifest = parse_manifest(items.pop("manifest.json"))
    items.pop("manifest.sig", None)
    items.update(replace or {})
    infos = {n: MemberInfo(sha256=hashlib.sha256(b).hexdigest(), size=len(b)) for n, b in items.items()}
    data = Manifest.model_validate({**manifest.model_dump(), "members": infos, **(update or {})}).to_bytes()
    private = signing.load_private_key(key)
    sig = signing.encode_signature(signing.key_id(private.public_key()), signing.sign(data, private))
    entries = [entry("manifest.json", data), entry("manifest.sig", sig)]
    return write_tar(dst, entries + [entry(n, b) for n, b in items.items()])


def flip_byte(path, member, at=100) -> None:
    with tarfile.open(path) as tf:
        offset = tf.getmember(member).offset_data + at
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
