"""Making bundles (:func:`create`) and signing them (:func:`sign_bundle`), on the operator's machine.

``create`` gathers a model version's files, computes the golden FP32 outputs
with ONNX Runtime (and a calibration cache if asked), and writes the manifest
first, so that a reader meets it before the data it vouches for. ``sign_bundle``
checks a bundle as :mod:`daemon.rollout.bundle` would, then rewrites it with
``manifest.sig``. Kept apart from verification, which is all a device needs;
both are reachable as ``daemon.rollout.bundle.create`` and ``.sign_bundle``.
"""

from __future__ import annotations

import datetime as _dt
import io
import itertools
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from daemon import __version__
from daemon.config import ModelConfig, format_errors
from daemon.rollout import BundleError, signing
from daemon.rollout.archive import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MEMBERS,
    MAX_MANIFEST_BYTES,
    HashingReader,
    check_member_set,
    file_info,
    iter_checked,
    member_info,
    npz_bytes,
    open_tar,
    read_small,
    scan,
    write_tar_atomic,
)
from daemon.rollout.bundle import (
    check_config,
    external_data_locations,
    graph_io,
    open_checked,
    parse_cache,
    parse_config,
)
from daemon.rollout.manifest import (
    CONFIG,
    DEFAULT_LABELS,
    FORMAT,
    FORMAT_VERSION,
    GOLDEN,
    MANIFEST,
    MODEL,
    RESERVED,
    SIGNATURE,
    GoldenInfo,
    Manifest,
    MemberInfo,
    Validation,
    check_member_name,
    validation_for,
    version_tuple,
)

log = logging.getLogger("tegrad.rollout")


def _utc_now() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible-builds convention
    when = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch
            else _dt.datetime.now(_dt.timezone.utc))
    return when.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resolve_model(model: Path, source_version: int | None = None) -> tuple[Path, Path | None, int | None]:
    """``(model.onnx, model directory or None, the source's version number or None)``.

    ``model`` is a .onnx file, a version directory (``repo/digits/2``), or a model
    directory: its ``model.onnx``, else its newest ``<version>/model.onnx`` (or
    ``source_version``'s).
    """
    if model.is_file():
        return model, None, None
    if not model.is_dir():
        raise BundleError(f"{model}: no such model directory or .onnx file")
    if model.name.isdigit() and (model / MODEL).is_file() and (model.parent / CONFIG).is_file():
        return model / MODEL, model.parent, int(model.name)
    numbered = sorted(int(d.name) for d in model.iterdir() if d.name.isdigit() and (d / MODEL).is_file())
    if source_version is not None:
        if source_version in numbered:
            return model / str(source_version) / MODEL, model, source_version
    elif (model / MODEL).is_file():
        return model / MODEL, model, None
    elif numbered:
        return model / str(numbered[-1]) / MODEL, model, numbered[-1]
    have = f"versions {numbered}" if numbered else f"no <version>/{MODEL} and no {MODEL}"
    wanted = f" version {source_version}" if source_version else ""
    raise BundleError(f"{model}: cannot find the model{wanted} ({have})")


def _input_dims(proto: Any) -> dict[str, list[int | None]]:
    """Each graph input's non-batch dimensions, None where symbolic."""
    out = {}
    for i in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
        out[i.name] = dims[1:]
    return out


def _golden_feeds(golden: Any, proto: Any, count: int, config: ModelConfig | None = None,
                  scale: float | None = None) -> dict[str, np.ndarray]:
    """The golden samples for the model's graph inputs.

    ``golden``: paths (images, image folders, .npy/.npz by :mod:`daemon.tensor_files`' key
    mapping), an array, or a mapping input name -> array. Images are preprocessed with the
    config's ``[preprocess]``; ``scale`` multiplies tensors (e.g. raw 0..16 pixels to 0..1).
    """
    import onnx

    from daemon import tensor_files

    names, _ = graph_io(proto)
    dims = _input_dims(proto)
    try:
        if isinstance(golden, (str, os.PathLike)):
            golden = [golden]
        if isinstance(golden, (list, tuple)) and all(isinstance(g, (str, os.PathLike)) for g in golden):
            images, tensors = tensor_files.split_paths(golden)
            if images:
                golden = _golden_images(images[:count], config, names)
            else:
                golden = tensor_files.load_tensors(tensors, names)
                if scale is not None:
                    golden = {k: np.asarray(v, np.float32) * np.float32(scale) for k, v in golden.items()}
        elif isinstance(golden, np.ndarray):
            if len(names) != 1:
                raise BundleError(f"one array of golden inputs given, but the model has inputs {names}")
            golden = {names[0]: golden}
        elif not isinstance(golden, Mapping):
            raise BundleError("golden inputs: give images, .npz/.npy paths, an array, or a mapping input name -> array")
        golden = {k: tensor_files.fit_shape(np.asarray(v), dims.get(k, []), k, "golden inputs")
                  for k, v in golden.items()}
    except tensor_files.SampleFileError as exc:
        raise BundleError(f"golden inputs: {exc}") from None
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
        feeds[name] = arr
    n = min(min(a.shape[0] for a in feeds.values()), count)
    if n < 1:
        raise BundleError("golden inputs hold no samples")
    return {k: np.ascontiguousarray(v[:n]) for k, v in feeds.items()}


def _golden_images(images: list[Path], config: ModelConfig | None, names: list[str]) -> dict[str, np.ndarray]:
    from daemon import tensor_files

    pre = config.preprocess if config is not None else None
    if pre is None:
        raise BundleError(f"golden inputs are images, but {CONFIG} has no [preprocess] to turn them into the "
                          "model's input; add [preprocess] or give preprocessed tensors (.npz/.npy)")
    target = pre.model_input or (names[0] if len(names) == 1 else None)
    if target is None:
        raise BundleError(f"{CONFIG}: [preprocess] model_input names no input; the model has {names}")
    return {target: tensor_files.preprocess_images(images, pre.to_spec())}


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
    from calib import auto_algorithm
    from calib.datasets import IterableSource, as_source

    # A stack of samples as single samples: auto's held-out split needs to know how many there are.
    source = IterableSource(list(data)) if isinstance(data, np.ndarray) else as_source(data)
    result = auto_algorithm.calibrate(model_path, source, algorithm, progress=False,
                                      note=lambda text: log.info("bundle calibration: %s", text))
    return result.cache(model_path, created=created).to_json().encode("utf-8")


def _cache_member(config: ModelConfig, data: bytes) -> str:
    if config.calibration_cache is not None:
        try:
            check_member_name(config.calibration_cache)
        except BundleError:
            raise BundleError(f"{CONFIG}: calibration_cache {config.calibration_cache!r} must be a plain file "
                              "name in a bundle (it sits beside config.toml)") from None
        return config.calibration_cache
    return "calib.cache" if data.startswith(b"TRT-") else "calib.json"


def _beside(ref: str, model_path: Path, model_dir: Path) -> Path:
    """A file the config names: in the version directory when it is there, else in the model directory."""
    own = model_path.parent / ref
    return own if own.is_file() else model_dir / ref


def _label_sources(config: ModelConfig, model_path: Path, model_dir: Path | None, labels: Any) -> dict[str, Path]:
    named = {t.labels for t in config.output if t.labels}
    # [postprocess] labels are read at load like an output's: a bundle without them cannot load.
    if config.postprocess is not None and config.postprocess.labels:
        named.add(config.postprocess.labels)
    refs = sorted(named)
    for ref in refs:
        try:
            check_member_name(ref)
        except BundleError:
            raise BundleError(f"{CONFIG}: labels {ref!r} must be a plain file name in a bundle") from None
    sources: dict[str, Path] = {}
    if labels is not None:
        if len(refs) > 1:
            raise BundleError(f"{CONFIG} names several label files {refs}; give the model directory instead of labels")
        sources[refs[0] if refs else DEFAULT_LABELS] = Path(labels)
    for ref in refs:
        if ref not in sources:
            found = _beside(ref, model_path, model_dir) if model_dir is not None else None
            if found is None or not found.is_file():
                raise BundleError(f"{CONFIG} uses labels {ref!r}, which was not found; pass the labels file")
            sources[ref] = found
    return sources


def _file_entries(members: Mapping[str, MemberInfo], sources: Mapping[str, bytes | Path]) -> Iterator[tuple[str, int, Any]]:
    for name, info in members.items():
        src = sources[name]
        if isinstance(src, bytes):
            yield name, info.size, io.BytesIO(src)
            continue
        with open(src, "rb") as f:
            reader = HashingReader(f, name)
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
    source_version: int | None = None,
    config_text: str | None = None,
    calibration_cache: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    golden_count: int = 8,
    golden_scale: float | None = None,
    validation: Validation | Mapping[str, Any] | None = None,
    calibrate_data: Any = None,
    calibrate_algorithm: str = "auto",
    min_tegrad_version: str | None = None,
    created: str | None = None,
) -> Manifest:
    """Make a bundle of ``model`` (a model directory, a version directory or a .onnx file) at ``out_path``.

    A model directory is a repository entry: ``config.toml``, ``<version>/model.onnx``
    (or ``model.onnx``), and the label and calibration files its config names; the
    newest version is taken unless ``source_version`` names one, and a version
    directory's own ``config.toml`` wins. ``version`` is the version the bundle
    ships as (default: the source's number, else 1). ``golden_inputs`` (images or
    image folders, preprocessed with the config's ``[preprocess]``; .npz/.npy files,
    see :mod:`daemon.tensor_files` for the key mapping; an array or a mapping) gives
    the first ``golden_count`` samples, whose FP32 outputs ONNX Runtime computes here.
    ``calibrate_data`` (anything ``calib.observe`` reads) makes a calibration cache
    when none is given.
    ``created`` defaults to ``$SOURCE_DATE_EPOCH`` or now; fix it to get
    byte-identical bundles from the same inputs.
    """
    import onnx

    model_path, model_dir, found_version = _resolve_model(Path(model), source_version)
    version = version or found_version or 1
    if config_text is None:
        own = model_path.parent / CONFIG  # a version directory's config wins over the model's
        if model_dir is None or not (own.is_file() or (model_dir / CONFIG).is_file()):
            raise BundleError(f"no {CONFIG} beside {model_path}; pass the model's config")
        config_text = (own if own.is_file() else model_dir / CONFIG).read_text(encoding="utf-8")
    name = name or (model_dir.name if model_dir is not None else None)
    if not name:
        raise BundleError("give the model's name (--name)")
    config = parse_config(config_text, name)
    created = created or _utc_now()

    proto = onnx.load(str(model_path), load_external_data=False)
    sources: dict[str, bytes | Path] = {MODEL: model_path}
    for tensor, loc in sorted(external_data_locations(proto).items(), key=lambda kv: kv[1]):
        try:
            check_member_name(loc)
        except BundleError:
            raise BundleError(f"{model_path}: tensor {tensor!r} keeps its data in {loc!r}; a bundle needs "
                              "external data in plain files beside the model") from None
        if not (model_path.parent / loc).is_file():
            raise BundleError(f"{model_path}: external data {loc!r} of tensor {tensor!r} not found")
        sources[loc] = model_path.parent / loc
    sources[CONFIG] = config_text.encode("utf-8")

    cache_name = None
    if calibration_cache is None and config.calibration_cache is not None and model_dir is not None:
        calibration_cache = _beside(config.calibration_cache, model_path, model_dir)
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

    sources.update(_label_sources(config, model_path, model_dir, labels))
    feeds, outputs = _reference_outputs(
        model_path, _golden_feeds(golden_inputs, proto, golden_count, config, golden_scale))
    sources[GOLDEN] = npz_bytes({**{f"input:{k}": v for k, v in feeds.items()},
                                 **{f"output:{k}": v for k, v in outputs.items()}}, compressed=True)

    members = {}
    for member, src in sources.items():
        if member in RESERVED:
            raise BundleError(f"{member!r} cannot be a member name")
        members[member] = member_info(src) if isinstance(src, bytes) else file_info(src)
    if isinstance(validation, Mapping):
        validation = validation_for(**validation)
    try:
        manifest = Manifest(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            model=name,
            version=version,
            precision=config.precision,
            min_tegrad_version=min_tegrad_version or ".".join(map(str, version_tuple(__version__))),
            created=created,
            members=members,
            config=config_text,
            calibration_cache=cache_name,
            golden=GoldenInfo(count=next(iter(feeds.values())).shape[0], inputs=list(feeds), outputs=list(outputs)),
            validation=validation or validation_for(),
        )
    except ValidationError as exc:
        raise BundleError(format_errors(MANIFEST, exc)) from None
    check_config(config, manifest)
    manifest_bytes = manifest.to_bytes()
    out = Path(out_path)
    first = [(MANIFEST, len(manifest_bytes), io.BytesIO(manifest_bytes))]
    # chained, not unpacked: each source file is opened only while it is being copied
    write_tar_atomic(out, itertools.chain(first, _file_entries(manifest.members, sources)))
    return manifest


def _check_cache_fits(data: bytes, path: Path, model_path: Path) -> None:
    from calib.cache import CacheMismatchError

    cache = parse_cache(data, str(path))
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
    vb = open_checked(path, None, allow_unsigned=False, check_signature=False,
                      max_bytes=DEFAULT_MAX_BYTES, max_members=DEFAULT_MAX_MEMBERS)
    sig = signing.encode_signature(kid, signing.sign(vb.manifest_bytes, key))

    def entries() -> Iterator[tuple[str, int, Any]]:
        yield MANIFEST, len(vb.manifest_bytes), io.BytesIO(vb.manifest_bytes)
        yield SIGNATURE, len(sig), io.BytesIO(sig)
        with open_tar(path, vb.max_bytes) as tf:
            found = scan(tf, path, vb.max_bytes, vb.max_members)
            if read_small(tf, found, MANIFEST, MAX_MANIFEST_BYTES) != vb.manifest_bytes:
                raise BundleError(f"{path} changed while being signed; sign it again")
            check_member_set(found, vb.manifest)
            for name, reader in iter_checked(tf, found, vb.manifest):
                yield name, vb.manifest.members[name].size, reader

    write_tar_atomic(Path(out_path) if out_path is not None else path, entries())
    return kid
