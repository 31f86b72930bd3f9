"""Model bundles: one tar file that carries a model version to a device.

Members (plain file names only, no directories):

* ``manifest.json`` - what the bundle is (see :class:`Manifest`), with the
  size and sha256 of every other member except ``manifest.sig``;
* ``manifest.sig`` - optional Ed25519 signature over the exact bytes of
  ``manifest.json`` (see :mod:`daemon.rollout.signing`);
* ``model.onnx``, its ONNX external-data files, ``config.toml``, the
  calibration cache, label files and ``golden.npz`` (inputs and their FP32
  reference outputs, keys ``input:<name>`` and ``output:<name>``).

This module opens and verifies bundles (:func:`open_bundle`,
:meth:`VerifiedBundle.extract_to`) and reads their claims unverified
(:func:`read_manifest`). Members are extracted only after the headers, the
signature and every hash passed. The manifest schema is in
:mod:`daemon.rollout.manifest`, the tar and file I/O in
:mod:`daemon.rollout.archive`, and making and signing bundles in
:mod:`daemon.rollout.make`; their public names are re-exported here.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calib.files import fsync_dir
from daemon.config import ModelConfig, parse_model_config
from daemon.errors import ConfigError
from daemon.rollout import BundleError, signing
from daemon.rollout.archive import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MEMBERS,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    check_member_set,
    iter_checked,
    open_tar,
    read_small,
    scan,
    write_new_file,
)
from daemon.rollout.manifest import (
    CONFIG,
    DEFAULT_LABELS,
    FORMAT,
    FORMAT_VERSION,
    GOLDEN,
    MANIFEST,
    MODEL,
    SIGNATURE,
    GoldenInfo,
    Manifest,
    MemberInfo,
    Task,
    Validation,
    check_member_name,
    check_version,
    parse_manifest,
    validation_for,
)

__all__ = [
    "CONFIG", "DEFAULT_LABELS", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_MEMBERS", "FORMAT", "FORMAT_VERSION", "GOLDEN",
    "MANIFEST", "MODEL", "SIGNATURE", "BundleError", "BundleInfo", "GoldenInfo", "Manifest", "MemberInfo", "Task",
    "Validation", "VerifiedBundle", "external_data_locations", "open_bundle", "parse_manifest",
    "read_manifest", "validation_for",
]

log = logging.getLogger("tegrad.rollout")


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
            with open_tar(self.path, self.max_bytes) as tf:
                entries = scan(tf, self.path, self.max_bytes, self.max_members)
                if read_small(tf, entries, MANIFEST, MAX_MANIFEST_BYTES) != self.manifest_bytes:
                    raise BundleError(f"{self.path} changed since it was verified ({MANIFEST} differs); "
                                      "verify it again")
                check_member_set(entries, self.manifest)
                for name, reader in iter_checked(tf, entries, self.manifest):
                    write_new_file(tmp / name, reader)
            write_new_file(tmp / MANIFEST, io.BytesIO(self.manifest_bytes))
            if self.signature is not None:
                write_new_file(tmp / SIGNATURE, io.BytesIO(self.signature))
            # mkdtemp makes 0700; the daemon and the operator's tools both read model directories.
            os.chmod(tmp, 0o755)
            fsync_dir(tmp)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(dest.parent)
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
    return open_checked(Path(path), trust, allow_unsigned=allow_unsigned, check_signature=True,
                        max_bytes=max_bytes, max_members=max_members)


def open_checked(path: Path, trust: signing.TrustStore | None, *, allow_unsigned: bool,
                 check_signature: bool, max_bytes: int, max_members: int) -> VerifiedBundle:
    with open_tar(path, max_bytes) as tf:
        entries = scan(tf, path, max_bytes, max_members)
        manifest_bytes = read_small(tf, entries, MANIFEST, MAX_MANIFEST_BYTES)
        assert manifest_bytes is not None  # scan requires it
        sig_bytes = read_small(tf, entries, SIGNATURE, MAX_SIGNATURE_BYTES)
        signer = signer_key = None
        if check_signature:
            # Before the manifest is parsed: unsigned JSON from anywhere never reaches the parser.
            signer, signer_key = _check_signature(path, manifest_bytes, sig_bytes, trust, allow_unsigned)
        manifest = parse_manifest(manifest_bytes)
        if check_signature:  # signing a bundle for newer devices is fine; installing it here is not
            check_version(manifest)
        check_member_set(entries, manifest)
        wanted = {MODEL, CONFIG, GOLDEN, manifest.calibration_cache}
        contents: dict[str, bytes] = {}
        for name, reader in iter_checked(tf, entries, manifest):
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
    config = parse_config(text, manifest.model)
    check_config(config, manifest)
    return config


def parse_config(text: str, model: str) -> ModelConfig:
    try:
        return parse_model_config(text, Path(CONFIG), model)
    except ConfigError as exc:
        raise BundleError(str(exc)) from None


def check_config(config: ModelConfig, manifest: Manifest) -> None:
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
    post = config.postprocess
    if post is not None and post.labels and post.labels not in manifest.members:
        raise BundleError(f"{CONFIG}: [postprocess] uses labels {post.labels!r}, which the bundle lacks")


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
            check_member_name(loc)
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


def graph_io(proto: Any) -> tuple[list[str], list[str]]:
    inits = {i.name for i in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits], [o.name for o in proto.graph.output]


# Golden samples are deflated (since 0.1): their expanded size is bounded before anything is inflated.
MAX_GOLDEN_BYTES = 512 << 20


def _check_golden(data: bytes, manifest: Manifest, proto: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            expanded = sum(i.file_size for i in zf.infolist())
        if expanded > MAX_GOLDEN_BYTES:
            raise BundleError(f"{GOLDEN} expands to {expanded} bytes, more than the {MAX_GOLDEN_BYTES >> 20} MiB "
                              "allowed for golden samples; keep fewer samples (--golden-count)")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except BundleError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{GOLDEN} is not a readable .npz file ({exc})") from None
    inputs = {k[len("input:"):]: v for k, v in arrays.items() if k.startswith("input:")}
    outputs = {k[len("output:"):]: v for k, v in arrays.items() if k.startswith("output:")}
    stray = [k for k in arrays if not k.startswith(("input:", "output:"))]
    if stray:
        raise BundleError(f"{GOLDEN}: key {stray[0]!r} is neither 'input:<name>' nor 'output:<name>'")
    want_in, want_out = graph_io(proto)
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


def parse_cache(data: bytes, name: str) -> Any:
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
    cache = parse_cache(data, name)
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
    with open_tar(path, max_bytes) as tf:
        entries = scan(tf, path, max_bytes, max_members)
        manifest_bytes = read_small(tf, entries, MANIFEST, MAX_MANIFEST_BYTES)
        sig_bytes = read_small(tf, entries, SIGNATURE, MAX_SIGNATURE_BYTES)
    assert manifest_bytes is not None
    signer = problem = None
    if sig_bytes is not None:
        try:
            signer, _ = signing.decode_signature(sig_bytes)
        except signing.SignatureError as exc:
            problem = str(exc)
    return BundleInfo(path, path.stat().st_size, parse_manifest(manifest_bytes), signer, problem)
