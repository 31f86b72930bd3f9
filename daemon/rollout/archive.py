"""Safe tar and file I/O for bundles: reading under limits, writing reproducibly and atomically.

Reading checks every tar header (regular files with plain names only, member
count and total size under limits, gzip decompression capped) before any data,
then streams members out by name while hashing them against the manifest.
Nothing is ever extracted with ``tarfile``'s own extraction, which leaves no
room for links, devices or paths outside the target. Writing uses fixed
metadata (mtime 0, owner 0, mode 0644, ustar) in the order given, so the same
inputs give the same bytes, and goes through a temporary file, fsync and rename.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from calib.files import fsync_dir
from daemon.rollout import BundleError
from daemon.rollout.manifest import MANIFEST, RESERVED, Manifest, MemberInfo, check_member_name

DEFAULT_MAX_BYTES = 4 << 30
DEFAULT_MAX_MEMBERS = 64
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 4096
_CHUNK = 1 << 20


# ---- reading tar files safely --------------------------------------------------------------------
class _Capped:
    """A decompressed stream that refuses to grow past ``cap`` bytes (a gzip bomb stops here)."""

    def __init__(self, raw: gzip.GzipFile, cap: int, where: Path) -> None:
        self._raw, self._cap, self._where = raw, cap, where

    def _over(self) -> BundleError:
        return BundleError(f"{self._where} decompresses to more than the limit of {self._cap} bytes")

    def read(self, n: int = -1) -> bytes:
        pos = self._raw.tell()
        room = self._cap - pos
        if n is None or n < 0 or n > room:
            n = room + 1
        try:
            data = self._raw.read(n)
        except (OSError, EOFError, zlib.error) as exc:
            raise BundleError(f"{self._where}: damaged gzip stream ({exc})") from None
        if pos + len(data) > self._cap:
            raise self._over()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else (self._raw.tell() + offset if whence == 1 else None)
        if target is not None and target > self._cap:
            raise self._over()
        try:
            return self._raw.seek(offset, whence)
        except (OSError, EOFError, zlib.error) as exc:
            raise BundleError(f"{self._where}: damaged gzip stream ({exc})") from None

    def tell(self) -> int:
        return self._raw.tell()


@contextlib.contextmanager
def open_tar(path: Path, max_bytes: int) -> Iterator[tarfile.TarFile]:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror}") from None
    with f:
        stream: Any = f
        if f.read(2) == b"\x1f\x8b":
            f.seek(0)
            stream = _Capped(gzip.GzipFile(fileobj=f, mode="rb"), max_bytes, path)
        else:
            f.seek(0)
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise BundleError(f"{path} is {size} bytes, over the limit of {max_bytes}")
        try:
            tf = tarfile.open(fileobj=stream, mode="r:")
        except tarfile.TarError as exc:
            raise BundleError(f"{path} is not a tar bundle ({exc})") from None
        with tf:
            yield tf


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"a symbolic link (to {info.linkname!r})"
    if info.islnk():
        return f"a hard link (to {info.linkname!r})"
    if info.ischr():
        return "a character device"
    if info.isblk():
        return "a block device"
    if info.isfifo():
        return "a FIFO"
    if info.isdir():
        return "a directory"
    if info.issparse():
        return "a sparse file"
    return f"a tar entry of type {info.type!r}"


def _is_regular(info: tarfile.TarInfo) -> bool:
    return info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and not info.issparse()


def scan(tf: tarfile.TarFile, where: Path, max_bytes: int, max_members: int) -> dict[str, tarfile.TarInfo]:
    """Every header, checked, without reading any member's data."""
    entries: dict[str, tarfile.TarInfo] = {}
    total = 0
    while True:
        try:
            info = tf.next()
        except tarfile.TarError as exc:
            raise BundleError(f"{where} is not a valid tar archive ({exc})") from None
        if info is None:
            break
        if len(entries) >= max_members:
            raise BundleError(f"{where} has more than {max_members} members; a bundle holds a handful of files")
        if not _is_regular(info):
            raise BundleError(f"member {info.name!r} is {_kind(info)}; bundles hold only regular files")
        check_member_name(info.name)
        if info.name in entries:
            raise BundleError(f"member {info.name!r} appears twice in {where}")
        total += info.size
        if total > max_bytes:
            raise BundleError(f"{where}: members add up to more than the limit of {max_bytes} bytes "
                              f"(at {info.name!r})")
        entries[info.name] = info
    if MANIFEST not in entries:
        raise BundleError(f"{where} has no {MANIFEST}; it is not a tegrad bundle")
    return entries


def read_small(tf: tarfile.TarFile, entries: Mapping[str, tarfile.TarInfo], name: str, limit: int) -> bytes | None:
    info = entries.get(name)
    if info is None:
        return None
    if info.size > limit:
        raise BundleError(f"member {name!r} is {info.size} bytes; more than {limit} is not a real {name}")
    f = tf.extractfile(info)
    assert f is not None  # regular files always have data
    try:
        data = f.read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"member {name!r} cannot be read ({exc}); the bundle is truncated or damaged") from None
    if len(data) != info.size:
        raise BundleError(f"member {name!r} is truncated; the bundle is damaged")
    return data


def check_member_set(entries: Mapping[str, tarfile.TarInfo], manifest: Manifest) -> None:
    present = [n for n in entries if n not in RESERVED]
    extra = [n for n in present if n not in manifest.members]
    if extra:
        raise BundleError(f"member {extra[0]!r} is not listed in {MANIFEST}; refusing a bundle with unlisted files")
    missing = [n for n in manifest.members if n not in entries]
    if missing:
        raise BundleError(f"{MANIFEST} lists {missing[0]!r} but the bundle does not contain it")
    for name in present:
        if entries[name].size != manifest.members[name].size:
            raise BundleError(f"member {name!r} is {entries[name].size} bytes but {MANIFEST} says "
                              f"{manifest.members[name].size}; the bundle was changed or damaged")


class HashingReader:
    def __init__(self, f: BinaryIO, name: str) -> None:
        self._f, self.name = f, name
        self._h = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._f.read(n)
        except (tarfile.TarError, EOFError) as exc:
            raise BundleError(f"member {self.name!r} cannot be read ({exc}); "
                              "the bundle is truncated or damaged") from None
        self._h.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def check(self, expected: MemberInfo, what: str = "the bundle was changed or damaged") -> None:
        self.drain()
        got = self._h.hexdigest()
        if self.count != expected.size or got != expected.sha256:
            raise BundleError(f"member {self.name!r}: sha256 {got[:16]}… ({self.count} bytes) does not match "
                              f"{MANIFEST} ({expected.sha256[:16]}…, {expected.size} bytes); {what}")


def iter_checked(tf: tarfile.TarFile, entries: Mapping[str, tarfile.TarInfo],
                 manifest: Manifest) -> Iterator[tuple[str, HashingReader]]:
    """Stream each listed member in tar order; after the consumer is done with one, its hash is checked."""
    for name, info in entries.items():
        if name in RESERVED:
            continue
        f = tf.extractfile(info)
        assert f is not None
        reader = HashingReader(f, name)
        yield name, reader
        reader.check(manifest.members[name])


# ---- writing -------------------------------------------------------------------------------------
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_tar_atomic(out: Path, entries: Iterable[tuple[str, int, Any]]) -> None:
    """Write ``(name, size, file object)`` entries as a ustar file: temp name, fsync, rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for name, size, fileobj in entries:
                    tf.addfile(_tarinfo(name, size), fileobj)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(out.parent)


def write_new_file(path: Path, src: Any) -> None:
    # O_EXCL | O_NOFOLLOW: the staging directory is fresh, so anything already there is an attack.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        while True:
            block = src.read(_CHUNK)
            if not block:
                break
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def member_info(data: bytes) -> MemberInfo:
    return MemberInfo(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def npz_bytes(arrays: Mapping[str, np.ndarray], compressed: bool = False) -> bytes:
    """An .npz that depends only on the arrays (``np.savez`` stamps the current time into the zip)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zf.compression  # a ZipInfo made by hand would be stored whatever the file's default
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def file_info(path: Path) -> MemberInfo:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
            size += len(block)
    return MemberInfo(sha256=h.hexdigest(), size=size)
