"""Staging a verified bundle: build its engine the way serving will, then check the golden samples.

The bundle's files are extracted (atomically) into a model directory; the engine is built through
the same path a load takes (calib lowering with the shipped calibration cache, build worker,
engine cache), so the engine that passes validation is the one that would serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon.engines.factory import EngineFactory, Prepared
from daemon.rollout.bundle import VerifiedBundle
from daemon.rollout.manifest import MODEL
from daemon.rollout.validate import ValidationReport, validate_bundle


@dataclass(frozen=True)
class Staged:
    model_dir: Path
    prepared: Prepared
    report: ValidationReport


async def stage(bundle: VerifiedBundle, model_dir: Path, factory: EngineFactory) -> Staged:
    """Extract into the new directory ``model_dir``, build, warm up and validate. The engine stays open
    (the caller serves it or closes it)."""
    bundle.extract_to(model_dir)
    config = bundle.config.model_copy(update={"name": bundle.manifest.model})
    prepared = await factory.prepare(config, model_dir, bundle.manifest.version, model_dir / MODEL)
    report = await validate_bundle(bundle, prepared.engine)
    return Staged(model_dir, prepared, report)
