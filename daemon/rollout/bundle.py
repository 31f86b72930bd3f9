"""Model bundles: one tar file that carries a model version to a device.

Members (plain file names only, no directories):

* ``manifest.json`` - what the bundle is (see :class:`Manifest`), with the
  size and sha256 of every other member except ``manifest.sig``;
* ``manifest.sig`` - optional Ed25519 signature over the exact bytes of
  ``manifest.json`` (see :mod:`daemon.rollout.signing`);
* ``model.onnx``, its ONNX external-data files, ``config.toml``, the
  calibration cache, label files and ``golden.npz`` (inputs and their FP32
  reference outputs, keys ``input:<name>`` and ``output:<name>``).

The manifest comes first so that a reader meets it before the data it vouches
for. Bundles are written with fixed metadata (mtime 0, owner 0, mode 0644,
ustar) in a fixed order, so the same inputs give the same bytes.

Nothing is ever extracted with ``tarfile``'s own extraction: members are
streamed out by name after the headers, the signature and every hash passed,
which leaves no room for links, devices or paths outside the target.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daemon import __version__
from daemon.config import ModelConfig, parse_model_config
from daemon.errors import ConfigError
from daemon.rollout import BundleError, signing

log = logging.getLogger("tegrad.rollout")

FORMAT = "tegrad-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODEL = "model.onnx"
CONFIG = "config.toml"
GOLDEN = "golden.npz"
DEFAULT_LABELS = "labels.txt"
_RESERVED = frozenset({MANIFEST, SIGNATURE})

DEFAULT_MAX_BYTES = 4 << 30
DEFAULT_MAX_MEMBERS = 64
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_SIGNATURE_BYTES = 4096
_CHUNK = 1 << 20

# ustar keeps names up to 100 bytes without extension headers; a leading '.' is refused so
# that nothing hidden lands on the device.
_MEMBER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}$")
# The model name becomes a directory name in the device's repository.
_MODEL_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_VERSION_RE = r"^\d+(\.\d+){0,2}$"
_CREATED_RE = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$"

Task = Literal["classification", "detection", "regression"]
_DEFAULT_THRESHOLDS: dict[str, dict[str, float | None]] = {
    "classification": {"min_top1_agreement": 0.99, "min_cosine": 0.99, "min_f1": None, "max_rel_error": None},
    "detection": {"min_top1_agreement": None, "min_cosine": None, "min_f1": 0.9, "max_rel_error": None},
    "regression": {"min_top1_agreement": None, "min_cosine": 0.99, "min_f1": None, "max_rel_error": 0.05},
}


# ---- manifest ------------------------------------------------------------------------------------
class _Strict(BaseModel):
    # Every key required, none unknown, no coercion: a manifest is written by tegrad, never by hand.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class MemberInfo(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Validation(_Strict):
    """How close the device's outputs must come to the golden FP32 outputs before a version takes traffic."""

    task: Task
    min_top1_agreement: float | None = Field(ge=0, le=1)
    min_cosine: float | None = Field(ge=-1, le=1)
    min_f1: float | None = Field(ge=0, le=1)
    max_rel_error: float | None = Field(gt=0)

    @model_validator(mode="after")
    def _main_threshold(self) -> Validation:
        needed = {"classification": ["min_top1_agreement"], "detection": ["min_f1"],
                  "regression": ["max_rel_error", "min_cosine"]}[self.task]
        if all(getattr(self, k) is None for k in needed):
            raise ValueError(f"task {self.task!r} needs {' or '.join(needed)}")
        return self


def validation_for(task: str = "classification", **overrides: float | None) -> Validation:
    """Default thresholds of ``task`` with ``overrides`` applied."""
    if task not in _DEFAULT_THRESHOLDS:
        raise BundleError(f"unknown validation task {task!r}; use one of {', '.join(_DEFAULT_THRESHOLDS)}")
    values: dict[str, Any] = dict(_DEFAULT_THRESHOLDS[task])
    for key, value in overrides.items():
        if key not in values:
            raise BundleError(f"unknown validation threshold {key!r}; use one of {', '.join(values)}")
        values[key] = None if value is None else float(value)
    try:
        return Validation(task=task, **values)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise BundleError(_format_errors("validation", exc)) from None


class GoldenInfo(_Strict):
    count: int = Field(ge=1)
    inputs: list[str] = Field(min_length=1)
    outputs: list[str] = Field(min_length=1)


class Manifest(_Strict):
    format: Literal["tegrad-bundle"]
    format_version: int
    model: str = Field(pattern=_MODEL_NAME_RE)
    version: int = Field(ge=1)
    precision: Literal["fp32", "fp16", "int8", "mixed"]
    min_tegrad_version: str = Field(pattern=_VERSION_RE)
    created: str = Field(pattern=_CREATED_RE)
    members: dict[str, MemberInfo]
    config: str
    calibration_cache: str | None
    golden: GoldenInfo
    validation: Validation

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"format_version {v} is not {FORMAT_VERSION}, the only one this tegrad reads")
        return v

    @field_validator("members")
    @classmethod
    def _member_names(cls, members: dict[str, MemberInfo]) -> dict[str, MemberInfo]:
        for name in members:
            _check_member_name(name)
            if name in _RESERVED:
                raise ValueError(f"{name!r} cannot be listed as a member")
        missing = [n for n in (MODEL, CONFIG, GOLDEN) if n not in members]
        if missing:
            raise ValueError(f"required members missing: {', '.join(missing)}")
        return members

    @model_validator(mode="after")
    def _cache_listed(self) -> Manifest:
        cache = self.calibration_cache
        if cache is not None and (cache not in self.members or cache in (MODEL, CONFIG, GOLDEN)):
            raise ValueError(f"calibration_cache {cache!r} is not a calibration cache member")
        return self

    def to_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _format_errors(where: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{where}: {key}: {msg}")
    return "; ".join(lines)


def parse_manifest(data: bytes) -> Manifest:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{MANIFEST} is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BundleError(f"{MANIFEST}: 'format' is not {FORMAT!r}; this is not a tegrad bundle")
    version = doc.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        # Checked before the schema: a newer format may differ in every other key.
        raise BundleError(f"{MANIFEST}: format_version {version} was written by a newer tegrad "
                          f"(this one reads {FORMAT_VERSION}); upgrade tegrad on this device")
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        raise BundleError(_format_errors(MANIFEST, exc)) from None


def _version_tuple(text: str) -> tuple[int, int, int]:
    m = re.match(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if not m:
        return (0, 0, 0)
    a, b, c = (int(g or 0) for g in m.groups())
    return (a, b, c)


def _check_version(manifest: Manifest) -> None:
    if _version_tuple(manifest.min_tegrad_version) > _version_tuple(__version__):
        raise BundleError(f"bundle {manifest.model} v{manifest.version} needs tegrad >= "
                          f"{manifest.min_tegrad_version}, this is {__version__}; upgrade tegrad first")


def _check_member_name(name: str) -> None:
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise BundleError(f"member {name!r} has an absolute path; bundle members are plain file names")
    if ".." in re.split(r"[/\\]", name):
        raise BundleError(f"member {name!r} points outside the bundle ('..'); refusing it")
    if "/" in name or "\\" in name:
        raise BundleError(f"member {name!r} has a directory part; bundle members are plain file names")
    if not _MEMBER_RE.match(name):
        raise BundleError(f"member {name!r} is not a plain file name (letters, digits, '_', '.', '+', '-'; "
                          "not starting with '.'; at most 100 characters)")


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
def _open_tar(path: Path, max_bytes: int) -> Iterator[tarfile.TarFile]:
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


def _scan(tf: tarfile.TarFile, where: Path, max_bytes: int, max_members: int) -> dict[str, tarfile.TarInfo]:
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
        _check_member_name(info.name)
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


def _read_small(tf: tarfile.TarFile, entries: Mapping[str, tarfile.TarInfo], name: str, limit: int) -> bytes | None:
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


def _check_member_set(entries: Mapping[str, tarfile.TarInfo], manifest: Manifest) -> None:
    present = [n for n in entries if n not in _RESERVED]
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


class _HashingReader:
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


def _iter_checked(tf: tarfile.TarFile, entries: Mapping[str, tarfile.TarInfo],
                  manifest: Manifest) -> Iterator[tuple[str, _HashingReader]]:
    """Stream each listed member in tar order; after the consumer is done with one, its hash is checked."""
    for name, info in entries.items():
        if name in _RESERVED:
            continue
        f = tf.extractfile(info)
        assert f is not None
        reader = _HashingReader(f, name)
        yield name, reader
        reader.check(manifest.members[name])


# ---- opening and verifying -----------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class VerifiedBundle:
    """A bundle whose signature (unless allowed unsigned), hashes and contents passed every check."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes | None  # contents of manifest.sig, kept with the extracted files
    signer: str | None  # key id that verified it; None when accepted unverified
    signer_key: Path | None
    config: ModelConfig
    golden_inputs: dict[str, np.ndarray] = field(repr=False)
    golden_outputs: dict[str, np.ndarray] = field(repr=False)
    max_bytes: int = DEFAULT_MAX_BYTES
    max_members: int = DEFAULT_MAX_MEMBERS

    @property
    def verified(self) -> bool:
        return self.signer is not None

    def extract_to(self, dest: str | os.PathLike[str]) -> Path:
        """Write the members into the new directory ``dest``: complete, or not at all.

        Everything goes to a temporary directory beside ``dest`` (same file
        system), hashed as it is written, fsynced, then renamed to ``dest``.
        The bundle file is read again, so a file changed since verification is
        caught here rather than installed.
        """
        dest = Path(dest)
        if os.path.lexists(dest):
            raise BundleError(f"{dest} already exists; a bundle is extracted into a new directory only")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        try:
            with _open_tar(self.path, self.max_bytes) as tf:
                entries = _scan(tf, self.path, self.max_bytes, self.max_members)
                if _read_small(tf, entries, MANIFEST, _MAX_MANIFEST_BYTES) != self.manifest_bytes:
                    raise BundleError(f"{self.path} changed since it was verified ({MANIFEST} differs); "
                                      "verify it again")
                _check_member_set(entries, self.manifest)
                for name, reader in _iter_checked(tf, entries, self.manifest):
                    _write_new_file(tmp / name, reader)
            _write_new_file(tmp / MANIFEST, io.BytesIO(self.manifest_bytes))
            if self.signature is not None:
                _write_new_file(tmp / SIGNATURE, io.BytesIO(self.signature))
            # mkdtemp makes 0700; the daemon and the operator's tools both read model directories.
            os.chmod(tmp, 0o755)
            _fsync_dir(tmp)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(dest.parent)
        return dest


def open_bundle(
    path: str | os.PathLike[str],
    trust: signing.TrustStore | None,
    *,
    allow_unsigned: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_members: int = DEFAULT_MAX_MEMBERS,
) -> VerifiedBundle:
    """Check a bundle completely without unpacking it; raise :class:`BundleError` on the first problem.

    Order: tar headers (types, names, duplicates, limits), the signature over
    the raw manifest bytes, the manifest schema and tegrad version, the member
    list, every member's size and sha256, then the contents (config, ONNX
    external-data locations, golden samples, calibration cache).
    ``allow_unsigned`` (development only) accepts a missing or failing
    signature with a WARNING; hashes are checked all the same.
    """
    return _open(Path(path), trust, allow_unsigned=allow_unsigned, check_signature=True,
                 max_bytes=max_bytes, max_members=max_members)


def _open(path: Path, trust: signing.TrustStore | None, *, allow_unsigned: bool, check_signature: bool,
          max_bytes: int, max_members: int) -> VerifiedBundle:
    with _open_tar(path, max_bytes) as tf:
        entries = _scan(tf, path, max_bytes, max_members)
        manifest_bytes = _read_small(tf, entries, MANIFEST, _MAX_MANIFEST_BYTES)
        assert manifest_bytes is not None  # _scan requires it
        sig_bytes = _read_small(tf, entries, SIGNATURE, _MAX_SIGNATURE_BYTES)
        signer = signer_key = None
        if check_signature:
            # Before the manifest is parsed: unsigned JSON from anywhere never reaches the parser.
            signer, signer_key = _check_signature(path, manifest_bytes, sig_bytes, trust, allow_unsigned)
        manifest = parse_manifest(manifest_bytes)
        if check_signature:  # signing a bundle for newer devices is fine; installing it here is not
            _check_version(manifest)
        _check_member_set(entries, manifest)
        wanted = {MODEL, CONFIG, GOLDEN, manifest.calibration_cache}
        contents: dict[str, bytes] = {}
        for name, reader in _iter_checked(tf, entries, manifest):
            if name in wanted:
                contents[name] = reader.read()
    config = _check_config_text(contents[CONFIG], manifest)
    proto = _load_onnx(contents.pop(MODEL))
    _check_external_data(proto, manifest.members)
    inputs, outputs = _check_golden(contents[GOLDEN], manifest, proto)
    if manifest.calibration_cache is not None:
        _check_cache(contents[manifest.calibration_cache], manifest)
    return VerifiedBundle(path=path, manifest=manifest, manifest_bytes=manifest_bytes, signature=sig_bytes,
                          signer=signer, signer_key=signer_key, config=config, golden_inputs=inputs,
                          golden_outputs=outputs, max_bytes=max_bytes, max_members=max_members)


def _check_signature(path: Path, manifest_bytes: bytes, sig_bytes: bytes | None,
                     trust: signing.TrustStore | None, allow_unsigned: bool) -> tuple[str | None, Path | None]:
    try:
        if sig_bytes is None:
            raise signing.SignatureError(f"{path} is not signed; sign it with `tegrad bundle sign` "
                                         "(or, in development only, pass --allow-unsigned)")
        if trust is None:
            raise signing.SignatureError(f"no trusted keys are configured to check {path}; "
                                         "give a trust directory holding the signers' .pub files")
        kid, sig = signing.decode_signature(sig_bytes)
        return kid, trust.verify(manifest_bytes, sig, kid)
    except signing.SignatureError as exc:
        if not allow_unsigned:
            raise
        log.warning("UNVERIFIED BUNDLE %s accepted only because --allow-unsigned is set: %s. "
                    "Anyone could have made or changed it; never use --allow-unsigned on a production device.",
                    path, exc)
        return None, None


def _check_config_text(data: bytes, manifest: Manifest) -> ModelConfig:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{CONFIG} is not UTF-8 text") from None
    if text != manifest.config:
        raise BundleError(f"{CONFIG} differs from the config text in {MANIFEST}; the bundle is inconsistent")
    config = _parse_config(text, manifest.model)
    _check_config(config, manifest)
    return config


def _parse_config(text: str, model: str) -> ModelConfig:
    try:
        return parse_model_config(text, Path(CONFIG), model)
    except ConfigError as exc:
        raise BundleError(str(exc)) from None


def _check_config(config: ModelConfig, manifest: Manifest) -> None:
    if config.precision != manifest.precision:
        raise BundleError(f"{CONFIG}: precision {config.precision!r} differs from the manifest's "
                          f"{manifest.precision!r}")
    if config.default_model_filename != MODEL:
        raise BundleError(f"{CONFIG}: default_model_filename must be {MODEL!r} in a bundle")
    if config.calibration_cache is not None and config.calibration_cache != manifest.calibration_cache:
        raise BundleError(f"{CONFIG}: calibration_cache {config.calibration_cache!r} is not the bundle's "
                          f"calibration cache ({manifest.calibration_cache!r})")
    for t in config.output:
        if t.labels is not None and t.labels not in manifest.members:
            raise BundleError(f"{CONFIG}: output {t.name!r} uses labels {t.labels!r}, which the bundle lacks")


def _load_onnx(data: bytes) -> Any:
    import onnx

    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises its own DecodeError, not a ValueError
        raise BundleError(f"{MODEL} is not a valid ONNX model ({exc})") from None


def _all_tensors(proto: Any) -> Iterator[Any]:
    """Every TensorProto of a model: initializers, node attributes, subgraphs and functions."""

    def of_graph(g: Any) -> Iterator[Any]:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield from (sp.values, sp.indices)
        for node in g.node:
            yield from of_node(node)

    def of_node(node: Any) -> Iterator[Any]:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("sparse_tensor"):
                yield from (a.sparse_tensor.values, a.sparse_tensor.indices)
            if a.HasField("g"):
                yield from of_graph(a.g)
            for sub in a.graphs:
                yield from of_graph(sub)

    yield from of_graph(proto.graph)
    for fn in proto.functions:
        for node in fn.node:
            yield from of_node(node)


def external_data_locations(proto: Any) -> dict[str, str]:
    """``location`` of every tensor stored outside the ONNX file, by tensor name."""
    import onnx

    found = {}
    for t in _all_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            found[t.name or "(unnamed)"] = info.get("location", "")
    return found


def _check_external_data(proto: Any, members: Mapping[str, MemberInfo]) -> None:
    import onnx

    for t in _all_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"{MODEL}: tensor {t.name!r} keeps its data in {loc!r}"
        try:
            _check_member_name(loc)
        except BundleError:
            raise BundleError(f"{where}, which is not a plain file name inside the bundle; refusing it") from None
        if loc not in members or loc in (MODEL, CONFIG, GOLDEN):
            raise BundleError(f"{where}, which is not a data member of the bundle")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", members[loc].size))
        except ValueError:
            raise BundleError(f"{where} with a non-numeric offset or length") from None
        if offset < 0 or length < 0 or offset + length > members[loc].size:
            raise BundleError(f"{where} at bytes {offset}..{offset + length}, beyond that member's end")


def _graph_io(proto: Any) -> tuple[list[str], list[str]]:
    inits = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits], [o.name for o in proto.graph.output]


def _check_golden(data: bytes, manifest: Manifest, proto: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{GOLDEN} is not a readable .npz file ({exc})") from None
    inputs = {k[len("input:"):]: v for k, v in arrays.items() if k.startswith("input:")}
    outputs = {k[len("output:"):]: v for k, v in arrays.items() if k.startswith("output:")}
    stray = [k for k in arrays if not k.startswith(("input:", "output:"))]
    if stray:
        raise BundleError(f"{GOLDEN}: key {stray[0]!r} is neither 'input:<name>' nor 'output:<name>'")
    want_in, want_out = _graph_io(proto)
    g = manifest.golden
    if sorted(inputs) != sorted(g.inputs) or sorted(g.inputs) != sorted(want_in):
        raise BundleError(f"{GOLDEN}: inputs {sorted(inputs)} do not match the manifest {g.inputs} "
                          f"and the model's inputs {want_in}")
    if sorted(outputs) != sorted(g.outputs) or sorted(g.outputs) != sorted(want_out):
        raise BundleError(f"{GOLDEN}: outputs {sorted(outputs)} do not match the manifest {g.outputs} "
                          f"and the model's outputs {want_out}")
    for key, arr in arrays.items():
        if arr.ndim == 0 or arr.shape[0] != g.count:
            raise BundleError(f"{GOLDEN}: {key!r} has shape {arr.shape}, expected {g.count} samples first")
    return inputs, outputs


def _parse_cache(data: bytes, name: str) -> Any:
    from calib.cache import CalibrationCache

    try:
        text = data.decode("utf-8")
        if text.startswith("TRT-"):
            return CalibrationCache.from_trt_text(text)
        return CalibrationCache.from_dict(json.loads(text))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"calibration cache {name!r}: {exc}") from None


def _check_cache(data: bytes, manifest: Manifest) -> None:
    name = manifest.calibration_cache
    assert name is not None
    cache = _parse_cache(data, name)
    model_sha = manifest.members[MODEL].sha256
    if cache.model_sha256 is not None and cache.model_sha256 != model_sha:
        raise BundleError(f"calibration cache {name!r} was computed on model sha256 {cache.model_sha256[:16]}…, "
                          f"not on this bundle's {MODEL} ({model_sha[:16]}…); recalibrate")


# ---- reading without verifying (inspect) ---------------------------------------------------------
@dataclass(frozen=True)
class BundleInfo:
    """What ``manifest.json`` and ``manifest.sig`` claim; nothing here has been verified."""

    path: Path
    size: int
    manifest: Manifest
    signer: str | None
    signature_problem: str | None


def read_manifest(path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                  max_members: int = DEFAULT_MAX_MEMBERS) -> BundleInfo:
    path = Path(path)
    with _open_tar(path, max_bytes) as tf:
        entries = _scan(tf, path, max_bytes, max_members)
        manifest_bytes = _read_small(tf, entries, MANIFEST, _MAX_MANIFEST_BYTES)
        sig_bytes = _read_small(tf, entries, SIGNATURE, _MAX_SIGNATURE_BYTES)
    assert manifest_bytes is not None
    signer = problem = None
    if sig_bytes is not None:
        try:
            signer, _ = signing.decode_signature(sig_bytes)
        except signing.SignatureError as exc:
            problem = str(exc)
    return BundleInfo(path, path.stat().st_size, parse_manifest(manifest_bytes), signer, problem)


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


def _write_tar_atomic(out: Path, entries: Iterable[tuple[str, int, Any]]) -> None:
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
    _fsync_dir(out.parent)


def _write_new_file(path: Path, src: Any) -> None:
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _member_info(data: bytes) -> MemberInfo:
    return MemberInfo(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An .npz that depends only on the arrays (``np.savez`` stamps the current time into the zip)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _utc_now() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible-builds convention
    when = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch
            else _dt.datetime.now(_dt.timezone.utc))
    return when.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resolve_model(model: Path, version: int | None) -> tuple[Path, Path | None, int]:
    """``(model.onnx, model directory or None, version)`` for a .onnx file or a model directory."""
    if model.is_file():
        return model, None, version or 1
    if not model.is_dir():
        raise BundleError(f"{model}: no such model directory or .onnx file")
    numbered = sorted(int(d.name) for d in model.iterdir() if d.name.isdigit() and (d / MODEL).is_file())
    if version is not None and version in numbered:
        return model / str(version) / MODEL, model, version
    if (model / MODEL).is_file():
        return model / MODEL, model, version or 1
    if numbered and version is None:
        return model / str(numbered[-1]) / MODEL, model, numbered[-1]
    have = f"versions {numbered}" if numbered else f"no <version>/{MODEL} and no {MODEL}"
    raise BundleError(f"{model}: cannot find the model{f' version {version}' if version else ''} ({have})")


def _golden_feeds(golden: Any, proto: Any, count: int) -> dict[str, np.ndarray]:
    import onnx

    names, _ = _graph_io(proto)
    if isinstance(golden, (str, os.PathLike)):
        golden = _load_golden_file(Path(golden), names)
    elif isinstance(golden, np.ndarray):
        if len(names) != 1:
            raise BundleError(f"one array of golden inputs given, but the model has inputs {names}")
        golden = {names[0]: golden}
    elif not isinstance(golden, Mapping):
        raise BundleError("golden inputs: give an .npz/.npy path, an array, or a mapping input name -> array")
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    feeds = {}
    for name in names:
        if name not in golden:
            raise BundleError(f"golden inputs lack model input {name!r}; they have {sorted(golden)}")
        arr = np.asarray(golden[name])
        want = onnx.helper.tensor_dtype_to_np_dtype(types[name])
        if arr.dtype != want:
            if not np.can_cast(arr.dtype, want, casting="same_kind"):
                raise BundleError(f"golden input {name!r} is {arr.dtype}, the model takes {want}")
            arr = arr.astype(want)
        if arr.ndim == 0:
            raise BundleError(f"golden input {name!r} needs a leading sample dimension")
        feeds[name] = arr
    n = min(min(a.shape[0] for a in feeds.values()), count)
    if n < 1:
        raise BundleError("golden inputs hold no samples")
    return {k: np.ascontiguousarray(v[:n]) for k, v in feeds.items()}


def _load_golden_file(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    try:
        if path.suffix.lower() == ".npy":
            if len(names) != 1:
                raise BundleError(f"{path}: a .npy file feeds one input, but the model has {names}; use an .npz")
            return {names[0]: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as z:
            return {k.removeprefix("input:"): z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"golden inputs {path}: {exc}") from None


def _reference_outputs(model_path: Path, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """FP32 outputs of ONNX Runtime on the CPU, one thread so that they do not depend on the machine's cores."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        out_names = [o.name for o in sess.get_outputs()]
        dim0 = sess.get_inputs()[0].shape[0] if sess.get_inputs()[0].shape else None
        n = next(iter(feeds.values())).shape[0]
        # A model with a fixed batch runs the samples in batches of that size.
        step = dim0 if isinstance(dim0, int) and dim0 > 0 else n
        n -= n % step
        if n == 0:
            raise BundleError(f"{model_path} has a fixed batch of {step}; give at least that many golden inputs")
        feeds = {k: v[:n] for k, v in feeds.items()}
        parts = [sess.run(out_names, {k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
    except BundleError:
        raise
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise BundleError(f"ONNX Runtime could not run {model_path} on the golden inputs: {exc}") from None
    outputs = {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(out_names)}
    return feeds, outputs


def _calibrate(model_path: Path, data: Any, algorithm: str, created: str) -> bytes:
    from calib import algorithms
    from calib.cache import CalibrationCache
    from calib.observe import observe

    obs = observe(model_path, data, batch_size=8, histogram=algorithm != "max", progress=False)
    cache = CalibrationCache(
        amax=algorithms.compute_all(obs, algorithm),
        algorithm=algorithm,
        params=algorithms.resolved_params(algorithm),
        num_samples=obs.num_samples,
        model_sha256=obs.model_sha256,
        source=dict(obs.source or {}),
        created=created,
    )
    return cache.to_json().encode("utf-8")


def _cache_member(config: ModelConfig, data: bytes) -> str:
    if config.calibration_cache is not None:
        try:
            _check_member_name(config.calibration_cache)
        except BundleError:
            raise BundleError(f"{CONFIG}: calibration_cache {config.calibration_cache!r} must be a plain file "
                              "name in a bundle (it sits beside config.toml)") from None
        return config.calibration_cache
    return "calib.cache" if data.startswith(b"TRT-") else "calib.json"


def _label_sources(config: ModelConfig, model_dir: Path | None, labels: Any) -> dict[str, Path]:
    refs = sorted({t.labels for t in config.output if t.labels})
    for ref in refs:
        try:
            _check_member_name(ref)
        except BundleError:
            raise BundleError(f"{CONFIG}: labels {ref!r} must be a plain file name in a bundle") from None
    sources: dict[str, Path] = {}
    if labels is not None:
        if len(refs) > 1:
            raise BundleError(f"{CONFIG} names several label files {refs}; give the model directory instead of labels")
        sources[refs[0] if refs else DEFAULT_LABELS] = Path(labels)
    for ref in refs:
        if ref not in sources:
            if model_dir is None or not (model_dir / ref).is_file():
                raise BundleError(f"{CONFIG} uses labels {ref!r}, which was not found; pass the labels file")
            sources[ref] = model_dir / ref
    return sources


def _file_entries(members: Mapping[str, MemberInfo], sources: Mapping[str, bytes | Path]) -> Iterator[tuple[str, int, Any]]:
    for name, info in members.items():
        src = sources[name]
        if isinstance(src, bytes):
            yield name, info.size, io.BytesIO(src)
            continue
        with open(src, "rb") as f:
            reader = _HashingReader(f, name)
            yield name, info.size, reader
            # The file was hashed for the manifest before; it must not have changed while being copied.
            reader.check(info, what=f"{src} changed while the bundle was being written")


def create(
    model: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    golden_inputs: Any,
    name: str | None = None,
    version: int | None = None,
    config_text: str | None = None,
    calibration_cache: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    golden_count: int = 8,
    validation: Validation | Mapping[str, Any] | None = None,
    calibrate_data: Any = None,
    calibrate_algorithm: str = "entropy",
    min_tegrad_version: str | None = None,
    created: str | None = None,
) -> Manifest:
    """Make a bundle of ``model`` (a model directory or a .onnx file) at ``out_path``.

    A model directory is a repository entry: ``config.toml``, ``<version>/model.onnx``
    (or ``model.onnx``), and the label and calibration files its config names.
    ``golden_inputs`` (an .npz keyed by input name, a .npy for one input, an
    array or a mapping) gives the first ``golden_count`` samples, whose FP32
    outputs ONNX Runtime computes here. ``calibrate_data`` (anything
    ``calib.observe`` reads) makes a calibration cache when none is given.
    ``created`` defaults to ``$SOURCE_DATE_EPOCH`` or now; fix it to get
    byte-identical bundles from the same inputs.
    """
    import onnx

    model_path, model_dir, version = _resolve_model(Path(model), version)
    if config_text is None:
        if model_dir is None or not (model_dir / CONFIG).is_file():
            raise BundleError(f"no {CONFIG} beside {model_path}; pass the model's config")
        config_text = (model_dir / CONFIG).read_text(encoding="utf-8")
    name = name or (model_dir.name if model_dir is not None else None)
    if not name:
        raise BundleError("give the model's name (--name)")
    config = _parse_config(config_text, name)
    created = created or _utc_now()

    proto = onnx.load(str(model_path), load_external_data=False)
    sources: dict[str, bytes | Path] = {MODEL: model_path}
    for tensor, loc in sorted(external_data_locations(proto).items(), key=lambda kv: kv[1]):
        try:
            _check_member_name(loc)
        except BundleError:
            raise BundleError(f"{model_path}: tensor {tensor!r} keeps its data in {loc!r}; a bundle needs "
                              "external data in plain files beside the model") from None
        if not (model_path.parent / loc).is_file():
            raise BundleError(f"{model_path}: external data {loc!r} of tensor {tensor!r} not found")
        sources[loc] = model_path.parent / loc
    sources[CONFIG] = config_text.encode("utf-8")

    cache_name = None
    if calibration_cache is None and config.calibration_cache is not None and model_dir is not None:
        calibration_cache = model_dir / config.calibration_cache
    if calibration_cache is not None:
        if not Path(calibration_cache).is_file():
            raise BundleError(f"calibration cache {calibration_cache} not found")
        cache_bytes = Path(calibration_cache).read_bytes()
        _check_cache_fits(cache_bytes, Path(calibration_cache), model_path)
    elif calibrate_data is not None:
        cache_bytes = _calibrate(model_path, calibrate_data, calibrate_algorithm, created)
    if calibration_cache is not None or calibrate_data is not None:
        cache_name = _cache_member(config, cache_bytes)
        sources[cache_name] = cache_bytes

    sources.update(_label_sources(config, model_dir, labels))
    feeds, outputs = _reference_outputs(model_path, _golden_feeds(golden_inputs, proto, golden_count))
    sources[GOLDEN] = _npz_bytes({**{f"input:{k}": v for k, v in feeds.items()},
                                  **{f"output:{k}": v for k, v in outputs.items()}})

    members = {}
    for member, src in sources.items():
        if member in _RESERVED:
            raise BundleError(f"{member!r} cannot be a member name")
        members[member] = _member_info(src) if isinstance(src, bytes) else _file_info(src)
    if isinstance(validation, Mapping):
        validation = validation_for(**validation)
    try:
        manifest = Manifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            model=name,
            version=version,
            precision=config.precision,
            min_tegrad_version=min_tegrad_version or ".".join(map(str, _version_tuple(__version__))),
            created=created,
            members=members,
            config=config_text,
            calibration_cache=cache_name,
            golden=GoldenInfo(count=next(iter(feeds.values())).shape[0], inputs=list(feeds), outputs=list(outputs)),
            validation=validation or validation_for(),
        )
    except ValidationError as exc:
        raise BundleError(_format_errors(MANIFEST, exc)) from None
    _check_config(config, manifest)
    manifest_bytes = manifest.to_bytes()
    out = Path(out_path)
    first = [(MANIFEST, len(manifest_bytes), io.BytesIO(manifest_bytes))]
    # chained, not unpacked: each source file is opened only while it is being copied
    _write_tar_atomic(out, itertools.chain(first, _file_entries(manifest.members, sources)))
    return manifest


def _file_info(path: Path) -> MemberInfo:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
            size += len(block)
    return MemberInfo(sha256=h.hexdigest(), size=size)


def _check_cache_fits(data: bytes, path: Path, model_path: Path) -> None:
    from calib.cache import CacheMismatchError

    cache = _parse_cache(data, str(path))
    try:
        cache.check_against(model_path)
    except CacheMismatchError as exc:
        raise BundleError(f"calibration cache {path}: {exc}") from None


def sign_bundle(path: str | os.PathLike[str], private_key_path: str | os.PathLike[str],
                out_path: str | os.PathLike[str] | None = None) -> str:
    """Add or replace ``manifest.sig``; the bundle is checked first and rewritten atomically.

    Returns the signer's key id. Ed25519 signatures are deterministic, so
    signing the same bundle with the same key gives the same bytes.
    """
    path = Path(path)
    key = signing.load_private_key(private_key_path)
    kid = signing.key_id(key.public_key())
    # A bundle whose members do not match its manifest must not get a signature.
    vb = _open(path, None, allow_unsigned=False, check_signature=False,
               max_bytes=DEFAULT_MAX_BYTES, max_members=DEFAULT_MAX_MEMBERS)
    sig = signing.encode_signature(kid, signing.sign(vb.manifest_bytes, key))

    def entries() -> Iterator[tuple[str, int, Any]]:
        yield MANIFEST, len(vb.manifest_bytes), io.BytesIO(vb.manifest_bytes)
        yield SIGNATURE, len(sig), io.BytesIO(sig)
        with _open_tar(path, vb.max_bytes) as tf:
            found = _scan(tf, path, vb.max_bytes, vb.max_members)
            if _read_small(tf, found, MANIFEST, _MAX_MANIFEST_BYTES) != vb.manifest_bytes:
                raise BundleError(f"{path} changed while being signed; sign it again")
            _check_member_set(found, vb.manifest)
            for name, reader in _iter_checked(tf, found, vb.manifest):
                yield name, vb.manifest.members[name].size, reader

    _write_tar_atomic(Path(out_path) if out_path is not None else path, entries())
    return kid
