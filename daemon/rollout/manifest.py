"""The schema of ``manifest.json``, a bundle's description of itself, and the rules it enforces.

The pydantic models are strict and closed because tegrad writes manifests and
a person never does; :func:`parse_manifest` turns each refusal into a
:class:`BundleError` that names the key. The fixed member names, the
member-name check (shared with the tar headers) and the tegrad-version check
live here as well.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daemon import __version__
from daemon.config import format_errors
from daemon.rollout import BundleError

FORMAT = "tegrad-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODEL = "model.onnx"
CONFIG = "config.toml"
GOLDEN = "golden.npz"
DEFAULT_LABELS = "labels.txt"
RESERVED = frozenset({MANIFEST, SIGNATURE})

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
        raise BundleError(format_errors("validation", exc)) from None


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
            check_member_name(name)
            if name in RESERVED:
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


def parse_manifest(data: bytes) -> Manifest:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: [[[[…
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
        raise BundleError(format_errors(MANIFEST, exc)) from None


def version_tuple(text: str) -> tuple[int, int, int]:
    m = re.match(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if not m:
        return (0, 0, 0)
    a, b, c = (int(g or 0) for g in m.groups())
    return (a, b, c)


def check_version(manifest: Manifest) -> None:
    if version_tuple(manifest.min_tegrad_version) > version_tuple(__version__):
        raise BundleError(f"bundle {manifest.model} v{manifest.version} needs tegrad >= "
                          f"{manifest.min_tegrad_version}, this is {__version__}; upgrade tegrad first")


def check_member_name(name: str) -> None:
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise BundleError(f"member {name!r} has an absolute path; bundle members are plain file names")
    if ".." in re.split(r"[/\\]", name):
        raise BundleError(f"member {name!r} points outside the bundle ('..'); refusing it")
    if "/" in name or "\\" in name:
        raise BundleError(f"member {name!r} has a directory part; bundle members are plain file names")
    if not _MEMBER_RE.fullmatch(name):
        raise BundleError(f"member {name!r} is not a plain file name (letters, digits, '_', '.', '+', '-'; "
                          "not starting with '.'; at most 100 characters)")
