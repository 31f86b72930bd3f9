"""The ``[monitor]`` section of a model's config.toml."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

METRICS = ("top1_agreement", "cosine", "f1", "max_rel_error")
# Larger is worse for this one: rollback_below treats its number as an upper bound.
UPPER_BOUND_METRICS = ("max_rel_error",)


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True  # a [monitor] section turns it on; enabled = false keeps the section but switches it off
    # Fraction of live samples also run through the FP32 reference.
    shadow_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    # CPU the reference may use, in cores (fractions duty-cycle one thread).
    shadow_max_cpu: float = Field(default=0.5, gt=0.0, le=64.0)
    # Samples in the sliding window behind every gauge.
    window: int = Field(default=500, ge=1, le=100_000)
    # Calibrated tensors watched for saturation: names or fnmatch patterns; empty = all.
    monitor_tensors: list[str] = Field(default_factory=list)
    # At most this many tensor label values on tegrad_calibration_saturation_ratio.
    max_tensors: int = Field(default=16, ge=0, le=256)
    # {metric = threshold}: roll a rollout-activated version back when the window falls below.
    rollback_below: dict[str, float] = Field(default_factory=dict)
    min_samples: int = Field(default=200, ge=1)
    # Field capture for recalibration (off unless capture_dir is set).
    capture_dir: str | None = None
    capture_max_mb: float = Field(default=64.0, gt=0.0)

    @field_validator("rollback_below")
    @classmethod
    def _known_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; use {', '.join(METRICS)}")
        return value
