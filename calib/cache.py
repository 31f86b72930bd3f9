"""Portable calibration cache: per-tensor amax plus provenance.

Two serialisations:

* tegrad JSON (``format: "tegrad-calib"``, ``format_version: 1``): amax per
  tensor, the algorithm and its parameters (with ``--algorithm auto``, also
  ``selection``: the candidates and their held-out scores), sample count, the sha256 of the
  ONNX file it was computed on, the preprocessing spec, and where it came from.
  Version-neutral: it is compiled into explicit Q/DQ on the device.
* TensorRT's text cache: header ``TRT-<version>-<Algorithm>``, then one
  ``<tensor name>: <hex>`` line per tensor, hex being the big-endian IEEE-754
  float32 bit pattern of ``scale = amax / 127``. Import is the migration path
  from trtexec / DeepStream / jetson-inference caches; an imported cache
  re-exports byte for byte.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .files import fsync_dir

FORMAT = "tegrad-calib"
FORMAT_VERSION = 1
DEFAULT_TRT_VERSION = "100300"
DEFAULT_TRT_ALGORITHM = "EntropyCalibration2"

_HEADER_RE = re.compile(r"^TRT-(\d+)-([A-Za-z0-9_]+)$")
# TensorRT names tensors of layers it created itself like this; they can never
# match an ONNX tensor, so a name check against the ONNX graph ignores them.
_TRT_INTERNAL_PREFIX = "(Unnamed Layer*"


class CacheMismatchError(ValueError):
    """The cache does not belong to the model it is being applied to."""


def _tegrad_version() -> str:
    try:
        from importlib.metadata import version

        return version("tegrad")
    except Exception:
        return "unknown"


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_sha256(model: Any) -> str:
    """sha256 of an ONNX model: of the file bytes for a path, of the serialisation for a ModelProto.

    ``onnx.save`` writes exactly ``SerializeToString()``, so a model saved with
    onnx hashes the same either way.
    """
    if isinstance(model, (str, os.PathLike)):
        return sha256_file(model)
    if hasattr(model, "SerializeToString"):
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    if isinstance(model, (bytes, bytearray, memoryview)):
        return hashlib.sha256(model).hexdigest()
    raise TypeError(f"cannot hash {type(model).__name__} as an ONNX model")


def scale_to_hex(scale: float, pad: bool = False, upper: bool = False) -> str:
    """float32 bit pattern of ``scale`` as TensorRT writes it (lower-case hex, no zero padding).

    The variants exist for caches written by other tools, so that they too
    re-export byte for byte; they only differ for scales below 2.5e-29.
    """
    (bits,) = struct.unpack(">I", struct.pack(">f", scale))
    return format(bits, ("08" if pad else "") + ("X" if upper else "x"))


def hex_to_scale(text: str) -> float:
    try:
        bits = int(text, 16)
    except ValueError:
        raise ValueError(f"not a hexadecimal float32 bit pattern: {text!r}") from None
    if not 0 <= bits <= 0xFFFFFFFF:
        raise ValueError(f"not a 32-bit pattern: {text!r}")
    return struct.unpack(">f", struct.pack(">I", bits))[0]


def amax_to_scale(amax: float) -> float:
    """float32 scale as stored in a TensorRT cache."""
    return struct.unpack(">f", struct.pack(">f", amax / 127.0))[0]


def _short(h: str | None) -> str:
    return (h or "none")[:12]


def _list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class CalibrationCache:
    """Per-tensor activation amax (symmetric range ±amax) with provenance."""

    def __init__(
        self,
        amax: Mapping[str, float],
        algorithm: str,
        params: Mapping[str, Any] | None = None,
        num_samples: int | None = None,
        model_sha256: str | None = None,
        preprocess: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
        created: str | None = None,
        tegrad_version: str | None = None,
        selection: Mapping[str, Any] | None = None,
    ) -> None:
        self.amax: dict[str, float] = {}
        for name, value in amax.items():
            v = float(value)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"amax of {name!r} must be finite and >= 0, got {value!r}")
            self.amax[str(name)] = v
        self.algorithm = algorithm
        self.params = dict(params or {})
        self.num_samples = num_samples
        self.model_sha256 = model_sha256
        self.preprocess = dict(preprocess) if preprocess is not None else None
        self.source = dict(source or {})
        self.created = created or _utc_now()
        self.tegrad_version = tegrad_version or _tegrad_version()
        # How `--algorithm auto` chose `algorithm`: the candidates and their held-out scores.
        self.selection = dict(selection) if selection is not None else None

    def __repr__(self) -> str:
        return (f"CalibrationCache({len(self.amax)} tensors, algorithm={self.algorithm!r}, "
                f"model={_short(self.model_sha256)})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CalibrationCache) and self.to_dict() == other.to_dict()

    def scales(self) -> dict[str, float]:
        """Per-tensor float32 scale ``amax / 127``."""
        return {k: amax_to_scale(v) for k, v in self.amax.items()}

    # ---- JSON -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tegrad_version": self.tegrad_version,
            "created": self.created,
            "algorithm": self.algorithm,
            "params": self.params,
            "num_samples": self.num_samples,
            "model_sha256": self.model_sha256,
            "preprocess": self.preprocess,
            "source": self.source,
            "amax": dict(self.amax),
        }
        if self.selection is not None:
            # Only when present, so caches of a fixed algorithm read as they always did.
            doc["selection"] = self.selection
        return doc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationCache:
        if not isinstance(data, Mapping):
            raise ValueError("calibration cache: expected a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"calibration cache: 'format' must be {FORMAT!r}, got {data.get('format')!r}")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"calibration cache: 'format_version' must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(f"calibration cache: format_version {version} was written by a newer tegrad "
                             f"(this one reads up to {FORMAT_VERSION}); upgrade tegrad")
        if version < 1:
            raise ValueError(f"calibration cache: invalid format_version {version}")
        amax = data.get("amax")
        if not isinstance(amax, Mapping) or not amax:
            raise ValueError("calibration cache: 'amax' must be a non-empty object of tensor name → number")
        for name, value in amax.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"calibration cache: amax of {name!r} is not a number: {value!r}")
        algorithm = data.get("algorithm")
        if not isinstance(algorithm, str) or not algorithm:
            raise ValueError("calibration cache: 'algorithm' must be a non-empty string")
        for key, typ in (("params", Mapping), ("source", Mapping), ("preprocess", Mapping), ("selection", Mapping)):
            if data.get(key) is not None and not isinstance(data[key], typ):
                raise ValueError(f"calibration cache: {key!r} must be an object or null")
        num_samples = data.get("num_samples")
        if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)):
            raise ValueError(f"calibration cache: 'num_samples' must be an integer or null, got {num_samples!r}")
        sha = data.get("model_sha256")
        if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise ValueError(f"calibration cache: 'model_sha256' must be 64 hex digits or null, got {sha!r}")
        return cls(
            amax=amax,
            algorithm=algorithm,
            params=data.get("params"),
            num_samples=num_samples,
            model_sha256=sha,
            preprocess=data.get("preprocess"),
            source=data.get("source"),
            created=data.get("created"),
            tegrad_version=data.get("tegrad_version"),
            selection=data.get("selection"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically (``.cache``/``.calib``/``.txt`` paths get TensorRT text)."""
        text = self.to_trt_text() if _is_trt_path(path) else self.to_json()
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationCache:
        """Read a tegrad JSON cache or a TensorRT text cache (detected from the content)."""
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        if text.startswith("TRT-"):
            cache = cls.from_trt_text(text)
            cache.source.setdefault("path", os.fspath(path))
            return cache
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{os.fspath(path)}: neither a tegrad JSON cache nor a TensorRT cache "
                             f"(JSON error: {exc})") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{os.fspath(path)}: {exc}") from None

    # ---- TensorRT text ----------------------------------------------------
    def to_trt_text(self, trt_version: str | None = None, algorithm: str | None = None) -> str:
        """TensorRT calibration cache text.

        Version and algorithm default to those of an imported TensorRT cache
        (so import → export is byte-exact), else ``100300`` and the TensorRT
        calibrator closest to how the amax were chosen (``MinMaxCalibration``
        for ``max``, else ``EntropyCalibration2``).
        """
        trt = self.source if self.source.get("kind") == "tensorrt" else {}
        version = str(trt_version or trt.get("trt_version") or DEFAULT_TRT_VERSION)
        own = "MinMaxCalibration" if self.algorithm == "max" else DEFAULT_TRT_ALGORITHM
        algo = algorithm or trt.get("trt_algorithm") or own
        if not _HEADER_RE.match(f"TRT-{version}-{algo}"):
            raise ValueError(f"invalid TensorRT header 'TRT-{version}-{algo}'")
        style = str(trt.get("hex_style", "x"))
        pad, upper = style.startswith("08"), style.endswith("X")
        lines = [f"TRT-{version}-{algo}"]
        for name, amax in self.amax.items():
            if "\n" in name:
                raise ValueError(f"tensor name {name!r} cannot be written to a TensorRT cache")
            lines.append(f"{name}: {scale_to_hex(amax_to_scale(amax), pad=pad, upper=upper)}")
        eol = "\r\n" if trt.get("line_ending") == "crlf" else "\n"
        text = eol.join(lines)
        if trt.get("trailing_newline", True):
            text += eol
        return text

    @classmethod
    def from_trt_text(cls, text: str) -> CalibrationCache:
        """Parse a TensorRT calibration cache; amax = float32 scale × 127 (exact in float64)."""
        crlf = "\r\n" in text  # caches edited on Windows; kept so re-export is byte-exact
        trailing = text.endswith("\n")
        lines = text.split("\n")
        if trailing:
            lines.pop()
        if not lines:
            raise ValueError("TensorRT cache is empty")
        header = lines[0].rstrip("\r")
        m = _HEADER_RE.match(header)
        if not m:
            raise ValueError(f"line 1: expected a header like 'TRT-8600-EntropyCalibration2', got {header!r}")
        amax: dict[str, float] = {}
        hex_pad = hex_upper = False
        for lineno, raw in enumerate(lines[1:], start=2):
            line = raw.rstrip("\r")
            if not line.strip():
                raise ValueError(f"line {lineno}: empty line in TensorRT cache")
            # Names may themselves contain ': ', the value never does.
            name, sep, hexval = line.rpartition(": ")
            if not sep or not name:
                raise ValueError(f"line {lineno}: expected '<tensor name>: <hex>', got {line!r}")
            if name in amax:
                raise ValueError(f"line {lineno}: tensor {name!r} appears twice")
            try:
                scale = hex_to_scale(hexval)
            except ValueError as exc:
                raise ValueError(f"line {lineno}: {exc}") from None
            if not math.isfinite(scale) or scale < 0:
                raise ValueError(f"line {lineno}: scale of {name!r} is {scale!r}, not a finite non-negative number")
            hex_pad = hex_pad or (len(hexval) == 8 and hexval[0] == "0")
            hex_upper = hex_upper or any(c in "ABCDEF" for c in hexval)
            amax[name] = float(scale) * 127.0
        return cls(
            amax=amax,
            algorithm=f"tensorrt:{m.group(2)}",
            params={},
            num_samples=None,
            model_sha256=None,
            preprocess=None,
            source={
                "kind": "tensorrt",
                "trt_version": m.group(1),
                "trt_algorithm": m.group(2),
                "trailing_newline": trailing,
                "line_ending": "crlf" if crlf else "lf",
                "hex_style": ("08" if hex_pad else "") + ("X" if hex_upper else "x"),
            },
        )

    # ---- model check ------------------------------------------------------
    def check_against(self, model: Any, required_tensors: Iterable[str] | None = None) -> None:
        """Refuse (CacheMismatchError) a cache that does not belong to ``model``.

        ``model`` is an ONNX ModelProto or a path. A cache with a model hash
        must match the model's sha256 exactly. Tensor names in the cache must
        exist in the model (TensorRT's own ``(Unnamed Layer* …)`` names are
        ignored), and every name in ``required_tensors`` must be in the cache.
        An imported TensorRT cache has no hash, so only names are checked.
        """
        import onnx

        if isinstance(model, (str, os.PathLike)):
            sha = sha256_file(model) if self.model_sha256 is not None else None
            proto = onnx.load(os.fspath(model), load_external_data=False)
        else:
            proto = model
            sha = model_sha256(model) if self.model_sha256 is not None else None
        if self.model_sha256 is not None and sha != self.model_sha256:
            raise CacheMismatchError(
                f"calibration cache was computed on model sha256 {_short(self.model_sha256)}…, "
                f"but this model is sha256 {_short(sha)}…; recalibrate on this model "
                f"(or import the cache without a hash if you are sure it fits)"
            )
        g = proto.graph
        names = {i.name for i in g.input} | {o.name for o in g.output} | {i.name for i in g.initializer}
        for n in g.node:
            names.update(n.output)
        unknown = [n for n in self.amax if n not in names and not n.startswith(_TRT_INTERNAL_PREFIX)]
        if unknown:
            raise CacheMismatchError(
                f"{len(unknown)} tensor name(s) of the calibration cache are missing from the model: "
                f"{_list(unknown)}"
            )
        if required_tensors is not None:
            absent = [n for n in dict.fromkeys(required_tensors) if n not in self.amax]
            if absent:
                raise CacheMismatchError(
                    f"{len(absent)} tensor(s) needed for INT8 are absent from the calibration cache: "
                    f"{_list(absent)}; recalibrate or exclude them from INT8"
                )


def _is_trt_path(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in (".cache", ".calib", ".txt", ".table")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to a temp file in the same directory, fsync, rename over ``path``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        # mkstemp creates 0600; a cache is not secret and other services read it.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def _affine(spec: Mapping[str, Any], channels: int) -> list[tuple[float, float]] | None:
    """Per channel (a, b) of the normalisation y = a·x + b, whichever way the spec spells it."""

    def per_channel(key: str, default: float) -> list[float]:
        vals = spec.get(key)
        vals = [default] if vals is None else ([vals] if isinstance(vals, (int, float)) else list(vals))
        return [float(v) for v in vals] * channels if len(vals) == 1 else [float(v) for v in vals]

    try:
        if spec.get("mean") is not None or spec.get("std") is not None:
            mean, std = per_channel("mean", 0.0), per_channel("std", 1.0)
            return [(1.0 / s, -m / s) for m, s in zip(mean, std)]
        return list(zip(per_channel("scale", 1.0), per_channel("offset", 0.0)))
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _size(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (int(value[0]), int(value[1]))
    return None


def preprocess_differences(recorded: Mapping[str, Any], served: Mapping[str, Any]) -> list[str]:
    """What differs between a cache's recorded preprocessing and a served one, in the keys that
    change the value ranges a calibration measured: colour order, normalisation (mean/std and
    scale/offset compared as the affine map they define), size and resize mode. Layout, dtype and
    interpolation move no range. Each difference reads ``key: cache X, served Y``."""
    diffs = []
    color_c, color_s = recorded.get("color", "RGB"), served.get("color", "RGB")
    if color_c != color_s:
        diffs.append(f"color: cache {color_c}, served {color_s}")
    if _size(recorded.get("size")) != _size(served.get("size")):
        diffs.append(f"size: cache {list(_size(recorded.get('size')) or [])}, served {list(_size(served.get('size')) or [])}")
    resize_c, resize_s = recorded.get("resize", "stretch"), served.get("resize", "stretch")
    if resize_c != resize_s:
        diffs.append(f"resize: cache {resize_c}, served {resize_s}")
    channels = 1 if color_s == "GRAY" else 3
    a_c, a_s = _affine(recorded, channels), _affine(served, channels)
    same = (a_c is not None and a_s is not None and len(a_c) == len(a_s)
            and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7) for p, q in zip(a_c, a_s) for x, y in zip(p, q)))
    if not same:
        def shown(spec: Mapping[str, Any]) -> str:
            keys = [k for k in ("mean", "std", "scale", "offset") if spec.get(k) is not None]
            return ", ".join(f"{k}={spec[k]}" for k in keys) or "none (raw 0..255)"

        diffs.append(f"normalisation: cache {shown(recorded)}, served {shown(served)}")
    return diffs
