"""Staging a verified bundle: build its engine the way serving will, then check the golden samples.

The bundle's files are extracted (atomically) into a model directory; the engine is built through
the same path a load takes (calib lowering with the shipped calibration cache, build worker,
engine cache), so the engine that passes validation is the one that would serve.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from daemon import crashpoints
from daemon.engines.factory import EngineFactory, Prepared
from daemon.rollout.bundle import VerifiedBundle
from daemon.rollout.manifest import MODEL
from daemon.rollout.validate import ValidationReport, validate_bundle


@dataclass(frozen=True)
class Staged:
    model_dir: Path
    prepared: Prepared
    report: ValidationReport
    seconds: dict[str, float] = field(default_factory=dict)  # extract, build, validate


async def stage(bundle: VerifiedBundle, model_dir: Path, factory: EngineFactory,
                progress: Callable[[str, str], None] = lambda stage, text: None) -> Staged:
    """Extract into the new directory ``model_dir``, build, warm up and validate. The engine stays open
    (the caller serves it or closes it). ``progress(stage, text)`` hears of each step; ``stage`` is
    extract, build or validate."""
    seconds: dict[str, float] = {}
    start = time.monotonic()
    progress("extract", "extracting")
    await asyncio.to_thread(bundle.extract_to, model_dir)
    seconds["extract"] = time.monotonic() - start

    def building(text: str) -> None:
        progress("build", text)
        if text.startswith("building"):
            crashpoints.reached("build")

    start = time.monotonic()
    progress("build", "building")
    config = bundle.config.model_copy(update={"name": bundle.manifest.model})
    prepared = await factory.prepare(config, model_dir, bundle.manifest.version, model_dir / MODEL, building)
    seconds["build"] = time.monotonic() - start
    try:
        crashpoints.reached("validate")
        start = time.monotonic()
        progress("validate", f"validating {bundle.manifest.golden.count} golden samples")
        report = await validate_bundle(bundle, prepared.engine)
        seconds["validate"] = time.monotonic() - start
    except BaseException:
        prepared.engine.close()
        raise
    return Staged(model_dir, prepared, report, seconds)
