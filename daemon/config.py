"""Model configuration: one ``config.toml`` per model directory.

Validated with pydantic; every error names the file, the key path and what is
wrong, so a person can fix the file without reading code. Dims exclude the
batch dimension when ``max_batch > 0`` (as in Triton).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daemon.engines.base import DATATYPE_TO_NUMPY
from daemon.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

CONFIG_FILENAME = "config.toml"


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorConfig(_Strict):
    name: str = Field(min_length=1)
    datatype: str
    dims: list[int]
    format: Literal["NONE", "NCHW", "NHWC"] = "NONE"
    labels: str | None = None  # outputs only: file of one label per line, next to config.toml

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        value = value.upper()
        if value not in DATATYPE_TO_NUMPY:
            raise ValueError(f"unknown datatype {value!r}; use one of {', '.join(DATATYPE_TO_NUMPY)}")
        return value

    @field_validator("dims")
    @classmethod
    def _valid_dims(cls, dims: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in dims):
            raise ValueError("dims must be positive, or -1 for a variable dimension")
        return dims


class VersionPolicy(_Strict):
    """Exactly one of: serve the latest N versions, all versions, or the listed ones."""

    latest: int | None = Field(default=None, ge=1)
    all: bool = False
    specific: list[int] | None = None

    @model_validator(mode="after")
    def _one_choice(self) -> VersionPolicy:
        chosen = [self.latest is not None, self.all, self.specific is not None]
        if sum(chosen) > 1:
            raise ValueError("set only one of latest, all, specific")
        if self.specific is not None and (not self.specific or min(self.specific) < 1):
            raise ValueError("specific must list version numbers >= 1")
        return self

    def select(self, available: list[int]) -> list[int]:
        available = sorted(available)
        if self.all:
            return available
        if self.specific is not None:
            return [v for v in available if v in set(self.specific)]
        return available[-(self.latest or 1) :]


class DynamicBatching(_Strict):
    max_queue_delay_us: int = Field(default=0, ge=0, le=10_000_000)
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    # Requests waiting beyond this are refused at once with RESOURCE_EXHAUSTED.
    max_queue_size: int = Field(default=256, ge=1)
    # Applied when a request carries no deadline of its own (0 = none).
    default_timeout_us: int = Field(default=0, ge=0)

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if any(s < 1 for s in sizes):
            raise ValueError("preferred batch sizes must be >= 1")
        return sorted(set(sizes))


class OnnxRuntimeOptions(_Strict):
    # 0 = choose so that instances x intra-op threads does not exceed the usable cores.
    intra_op_threads: int = Field(default=0, ge=0)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # Busy-waiting worker threads cut latency but steal cores from the gRPC threads on small boards.
    allow_spinning: bool = False


class ModelConfig(_Strict):
    name: str | None = None
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    precision: Literal["fp32", "fp16", "int8", "mixed"] = "fp32"
    max_batch: int = Field(default=0, ge=0, le=4096)
    instances: int = Field(default=1, ge=1, le=64)
    default_model_filename: str = "model.onnx"
    # Models whose recent executions took less than this run on the event loop thread,
    # skipping two thread hand-offs (0 disables).
    inline_below_us: int = Field(default=300, ge=0, le=100_000)
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    dynamic_batching: DynamicBatching = Field(default_factory=DynamicBatching)
    input: list[TensorConfig] = Field(default_factory=list)
    output: list[TensorConfig] = Field(default_factory=list)
    onnxruntime: OnnxRuntimeOptions = Field(default_factory=OnnxRuntimeOptions)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        for kind, tensors in (("input", self.input), ("output", self.output)):
            names = [t.name for t in tensors]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {kind} names: {', '.join(dupes)}")
        if any(t.labels for t in self.input):
            raise ValueError("labels are only allowed on outputs")
        if self.max_batch == 0 and self.dynamic_batching.preferred_batch_sizes:
            raise ValueError("dynamic_batching.preferred_batch_sizes needs max_batch > 0")
        too_big = [s for s in self.dynamic_batching.preferred_batch_sizes if s > self.max_batch]
        if too_big:
            raise ValueError(f"preferred batch sizes {too_big} exceed max_batch {self.max_batch}")
        return self


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {key}: {msg}")
    return "; ".join(lines)


def parse_model_config(text: str, path: Path, model_name: str) -> ModelConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None
    if config.name is not None and config.name != model_name:
        raise ConfigError(f"{path}: name: {config.name!r} does not match the directory name {model_name!r}")
    return config.model_copy(update={"name": model_name})


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read ``<model_dir>/config.toml``; a missing file means all defaults."""
    path = model_dir / CONFIG_FILENAME
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return parse_model_config(text, path, model_dir.name)
