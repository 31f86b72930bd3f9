"""Model configuration: one ``config.toml`` per model directory.

Validated with pydantic; every error names the file, the key path and what is
wrong, so a person can fix the file without reading code. Dims exclude the
batch dimension when ``max_batch > 0`` (as in Triton).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daemon.errors import ConfigError
from daemon.monitor.settings import MonitorConfig
from daemon.processing.spec import PostprocessConfig, PreprocessConfig
from daemon.tensor_spec import DATATYPE_TO_NUMPY

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


class TensorRTProfile(_Strict):
    """Shapes of one input for the TensorRT optimization profile (full shapes, batch included)."""

    input: str = Field(min_length=1)
    min: list[int]
    opt: list[int]
    max: list[int]

    @model_validator(mode="after")
    def _ordered(self) -> TensorRTProfile:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError(f"profile for {self.input!r}: min, opt and max must have the same rank")
        if any(d < 1 for d in self.min) or any(not (a <= b <= c) for a, b, c in zip(self.min, self.opt, self.max)):
            raise ValueError(f"profile for {self.input!r}: need 1 <= min <= opt <= max in every dimension")
        return self


class TensorRTOptions(_Strict):
    # Memory pool limit for tactics; Jetson boards share 4-64 GB between CPU and GPU.
    workspace_mb: int = Field(default=1024, ge=16)
    # Builder optimization level 0-5 (TensorRT's default is 3); higher builds longer for faster engines.
    optimization_level: int = Field(default=3, ge=0, le=5)
    # -1 = GPU; 0 or 1 = a DLA core (Orin), with layers DLA cannot run falling back to the GPU when allowed.
    dla_core: int = Field(default=-1, ge=-1, le=1)
    gpu_fallback: bool = True
    # INT8 / mixed / explicit graphs: type of everything outside Q/DQ (fp16 = trtexec --int8 --fp16).
    glue: Literal["fp16", "fp32"] = "fp16"
    # TF32 tensor-core math for the layers that stay FP32 (Ampere/Orin and newer).
    tf32: bool = True
    # Batch sizes of the optimization profile for the batch dimension (0 = max_batch for opt).
    min_batch: int = Field(default=1, ge=1)
    opt_batch: int = Field(default=0, ge=0)
    # Inputs with variable non-batch dimensions need explicit shapes.
    profile: list[TensorRTProfile] = Field(default_factory=list)
    # DLA needs one static shape (min = opt = max): the batch it is built for (0 = opt_batch, else max_batch).
    dla_batch: int = Field(default=0, ge=0)
    # Instance slots share one block of activation memory (executions take turns on the GPU, while
    # copies and pre/post-processing of other slots overlap): 1 copy instead of `instances`.
    share_activation_memory: bool = True


class BuildOptions(_Strict):
    # A build that runs longer is killed and the version marked UNAVAILABLE.
    timeout_s: float = Field(default=3600.0, gt=0)
    # Runs on random inputs before a new version takes traffic (first-run allocations, lazy init).
    warmup_runs: int = Field(default=1, ge=0, le=1000)


class ModelConfig(_Strict):
    name: str | None = None
    backend: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    precision: Literal["fp32", "fp16", "int8", "mixed", "explicit"] = "fp32"
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
    tensorrt: TensorRTOptions = Field(default_factory=TensorRTOptions)
    build: BuildOptions = Field(default_factory=BuildOptions)
    # int8 / mixed: calibration cache (tegrad JSON or TensorRT text), relative to the model directory.
    calibration_cache: str | None = None
    # mixed: layers (node names or fnmatch patterns) kept out of INT8, run in exclude_precision.
    exclude: list[str] = Field(default_factory=list)
    exclude_precision: Literal["fp16", "fp32"] = "fp16"
    # Clients send images (encoded or raw frames) instead of the model's tensor; see daemon.processing.spec.
    preprocess: PreprocessConfig | None = None
    postprocess: PostprocessConfig | None = None
    # Where pre/post-processing runs: "auto" = the GPU when the backend is tensorrt and CUDA is usable.
    processing_device: Literal["auto", "cpu", "gpu"] = "auto"
    # Live precision monitoring (daemon/monitor): off without a [monitor] section.
    monitor: MonitorConfig | None = None

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
        if self.precision in ("int8", "mixed") and not self.calibration_cache:
            raise ValueError(
                f"precision {self.precision!r} needs calibration_cache (make one with `tegrad calibrate`); "
                "tegrad never falls back to fp32 silently"
            )
        if self.precision == "mixed" and not self.exclude:
            raise ValueError("precision 'mixed' needs exclude: the layers kept out of INT8 (see `tegrad sensitivity`)")
        if self.exclude and self.precision not in ("mixed", "fp16", "explicit"):
            raise ValueError(f"exclude applies to precision 'mixed' (or 'fp16', 'explicit'), not {self.precision!r}")
        if self.tensorrt.opt_batch and self.max_batch and not (self.tensorrt.min_batch <= self.tensorrt.opt_batch <= self.max_batch):
            raise ValueError("tensorrt.opt_batch must lie between tensorrt.min_batch and max_batch")
        too_big = [s for s in self.dynamic_batching.preferred_batch_sizes if s > self.max_batch]
        if too_big:
            raise ValueError(f"preferred batch sizes {too_big} exceed max_batch {self.max_batch}")
        return self


def format_errors(where: str | Path, exc: ValidationError) -> str:
    """pydantic's errors as '<where>: <key path>: <problem>' sentences (also used for bundle manifests)."""
    lines = []
    errs = exc.errors()
    for err in errs[:_MAX_ERRORS]:
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{where}: {key}: {msg}")
    if len(errs) > _MAX_ERRORS:
        lines.append(f"and {len(errs) - _MAX_ERRORS} more problems")
    return "; ".join(lines)


# A model's config is a few KB; a bigger file is a mistake (or an attack on the parser).
MAX_CONFIG_BYTES = 1 << 20
_MAX_ERRORS = 10  # listed in one message


def parse_model_config(text: str, path: Path, model_name: str) -> ModelConfig:
    """``path`` is only for messages (clients see them: relative to the repository)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: more than {MAX_CONFIG_BYTES} bytes; a model config is a few KB")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # the parser recurses per level of [ or {
        raise ConfigError(f"{path}: not valid TOML: arrays or inline tables nested too deeply") from None
    try:
        config = ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(path, exc)) from None
    except RecursionError:
        raise ConfigError(f"{path}: values nested too deeply") from None
    if config.name is not None and config.name != model_name:
        raise ConfigError(f"{path}: name: {config.name!r} does not match the directory name {model_name!r}")
    return config.model_copy(update={"name": model_name})


def load_model_config(config_dir: Path, name: str | None = None, *, shown_as: str | None = None) -> ModelConfig:
    """Read ``<config_dir>/config.toml`` of model ``name`` (default: the directory's name);
    a missing file means all defaults. ``shown_as``: the file's name in messages (default: its path).
    A file that cannot be read raises OSError (the caller knows how to name its place)."""
    path = config_dir / CONFIG_FILENAME
    shown = Path(shown_as) if shown_as else path
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
            raise ConfigError(f"{shown}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        data = b""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{shown}: more than {MAX_CONFIG_BYTES} bytes; a model config is a few KB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{shown}: not valid UTF-8 (byte {exc.start}, line {line}): TOML files are UTF-8 text"
                          ) from None
    return parse_model_config(text, shown, name or config_dir.name)
