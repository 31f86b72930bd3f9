"""From a model version on disk to a ready engine: recipe → engine cache → build worker → load → warm-up.

The precision in config.toml is what runs: a model whose precision needs a calibration
cache it does not have fails to load with a message saying so (DeepStream would fall back
to FP32 silently), and a cache computed on another model is refused by the build.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calib.cache import CalibrationCache, preprocess_differences, sha256_file
from daemon.config import ModelConfig
from daemon.engines import specs
from daemon.engines.cache import EngineCache, engine_key, is_no_space, no_space, recipe_key
from daemon.engines.worker import BuildFailed, BuildJob, BuildPool
from daemon.errors import ConfigError, FailedPrecondition, TegradError
from daemon.telemetry import metrics
from daemon.telemetry.jetson import ClockState, clock_record, clock_warning

log = logging.getLogger("tegrad.engines")

# What an entry needs besides its artifact (meta.json, recipe, directories): said in a full-disk message.
_METADATA_BYTES = 64 << 10


@dataclass(frozen=True)
class Prepared:
    engine: Any
    key: str
    calibration_cache_id: str
    layers: dict[str, int]
    cache_hit: bool
    build_seconds: float | None


@dataclass(frozen=True)
class _Backend:
    options: dict[str, Any]
    fingerprint: dict[str, str]
    target: str


def _backend(config: ModelConfig) -> _Backend:
    if config.backend == "tensorrt":
        from daemon.engines.tensorrt import builder as trt_builder

        # The optimization profile spans max_batch, so a plan serves only the max_batch it was built for.
        fingerprint = {**trt_builder.fingerprint(config.tensorrt), "max_batch": str(config.max_batch)}
        return _Backend(config.tensorrt.model_dump(), fingerprint, "tensorrt")
    from daemon.engines.onnxruntime import builder as ort_builder

    options = ort_builder.build_options(config)
    return _Backend(options, ort_builder.fingerprint(options), ort_builder.target(options))


def _load(config: ModelConfig, model_dir: Path, model_file: Path, artifact: Path, key: str):
    if config.backend == "tensorrt":
        from daemon.engines.tensorrt import runner as trt_runner

        inputs, outputs = specs.resolve(*specs.from_onnx(model_file, config.name), config, model_dir)
        return trt_runner.load(artifact, inputs=inputs, outputs=outputs, instances=config.instances,
                               max_batch=config.max_batch, precision=config.precision, engine_id=key[:16],
                               dla_core=config.tensorrt.dla_core,
                               share_memory=config.tensorrt.share_activation_memory)
    from daemon.engines.onnxruntime import runner as ort_runner

    return ort_runner.load(artifact, config, model_dir, engine_id=key[:16])


def calibration_path(config: ModelConfig, model_dir: Path) -> Path | None:
    if not config.calibration_cache:
        return None
    path = Path(config.calibration_cache)
    path = path if path.is_absolute() else model_dir / path
    if not path.is_file():
        raise ConfigError(
            f"{model_dir / 'config.toml'}: calibration_cache: precision {config.precision!r} needs the calibration "
            f"cache {path}, which does not exist (make one with `tegrad calibrate`)"
        )
    return path


def check_preprocess(config: ModelConfig, model_dir: Path, calib: Path) -> None:
    """Refuse a cache calibrated with other preprocessing than the model is served with, in what moves
    value ranges (DeepStream's model-color-format mistake: an RGB-served, BGR-calibrated model loads and
    silently loses accuracy). ``allow_preprocess_mismatch = true`` serves it anyway, with a WARNING."""
    if config.preprocess is None:
        return  # clients send tensors: there is no served preprocessing to compare
    try:
        recorded = CalibrationCache.load(calib).preprocess
    except Exception:  # an unreadable cache fails the build with its own message
        return
    where = f"model {config.name}"
    if recorded is None:
        log.info("%s: calibration cache %s records no preprocessing (calibrated from tensors?); "
                 "its match with [preprocess] is not checked", where, calib.name)
        return
    diffs = preprocess_differences(recorded, config.preprocess.to_spec().to_dict())
    if not diffs:
        return
    what = "; ".join(diffs)
    if config.allow_preprocess_mismatch:
        log.warning("%s: calibration cache %s was calibrated with other preprocessing than [preprocess] (%s); "
                    "serving anyway because allow_preprocess_mismatch = true: INT8 ranges may not fit the inputs",
                    where, calib.name, what)
        return
    raise ConfigError(
        f"{model_dir / 'config.toml'}: calibration cache {calib.name} was calibrated with other preprocessing than "
        f"[preprocess] serves ({what}); the INT8 ranges would not fit the inputs. Recalibrate with "
        f"`tegrad calibrate --config {model_dir}`, fix [preprocess], or set allow_preprocess_mismatch = true"
    )


def warm_up(engine, runs: int) -> None:
    """Run every slot ``runs`` times on zeros so first-use allocations happen before traffic."""
    if runs == 0 or any(t.datatype == "BYTES" or -1 in t.shape[1:] for t in engine.inputs):
        return  # no shape or content to invent for these inputs
    feeds = {t.name: np.zeros([1 if d < 0 else d for d in t.shape], t.dtype) for t in engine.inputs}
    for slot in range(getattr(engine, "slots", 1)):
        for _ in range(runs):
            engine.infer(feeds, slot)


class EngineFactory:
    def __init__(self, cache: EngineCache, pool: BuildPool) -> None:
        self.cache = cache
        self.pool = pool

    async def prepare(self, config: ModelConfig, model_dir: Path, version: int, model_file: Path,
                      report: Callable[[str], None] = lambda s: None, source_sha: str | None = None) -> Prepared:
        """``source_sha``: the model file's sha256 when the caller has already read it."""
        if model_file.suffix in (".plan", ".engine"):
            return await self._prebuilt(config, model_dir, version, model_file, report, source_sha)
        name = config.name
        calib = calibration_path(config, model_dir)
        if calib is not None and config.precision in ("int8", "mixed"):
            await asyncio.to_thread(check_preprocess, config, model_dir, calib)
        backend = await asyncio.to_thread(_backend, config)
        source_sha = source_sha or await asyncio.to_thread(sha256_file, model_file)
        calib_sha = await asyncio.to_thread(sha256_file, calib) if calib else None
        glue = backend.options.get("glue")  # TensorRT's [tensorrt] glue changes the lowered graph
        recipe = recipe_key(source_sha, calib_sha, config.precision, config.exclude, config.exclude_precision,
                            f"{backend.target}:glue={glue}" if glue else backend.target)
        lowered = self.cache.lowered_sha(recipe)
        entry = await asyncio.to_thread(self.cache.lookup, engine_key(lowered, backend.fingerprint)) if lowered else None
        build_seconds = None
        if entry is None:
            if not lowered:
                metrics.ENGINE_CACHE_LOOKUPS.labels("miss").inc()
            entry, build_seconds = await self._build(config, version, model_file, calib, backend, recipe, report)
        else:
            log.info("model %s version %d: engine %s from the cache", name, version, entry.key[:16])
        report("loading")
        engine = await asyncio.to_thread(_load, config, model_dir, model_file, entry.artifact, entry.key)
        try:
            report("warming up")
            await asyncio.to_thread(warm_up, engine, config.build.warmup_runs)
        except Exception as exc:
            engine.close()
            if isinstance(exc, TegradError):  # the progress report could not be recorded (a full disk)
                raise
            raise ConfigError(f"model {name} version {version}: the engine fails its warm-up run: {exc}") from None
        return Prepared(engine, entry.key, calib_sha[:16] if calib_sha else "", dict(entry.meta.get("layers", {})),
                        build_seconds is None, build_seconds)

    async def _prebuilt(self, config: ModelConfig, model_dir: Path, version: int, plan: Path,
                        report: Callable[[str], None], source_sha: str | None) -> Prepared:
        """A TensorRT engine built elsewhere (trtexec, DeepStream): loaded as it is, if this TensorRT
        on this GPU can run it; calibration and lowering do not apply."""
        if config.backend != "tensorrt":
            raise ConfigError(f"{plan}: a prebuilt TensorRT engine is served by backend = \"tensorrt\"; "
                              f"config.toml says {config.backend!r}")
        ignored = [k for k, v in (("calibration_cache", config.calibration_cache), ("exclude", config.exclude)) if v]
        if ignored or config.precision != "fp32":
            log.warning("model %s version %d: %s is a prebuilt engine; calibration and lowering do not apply, "
                        "so %s in config.toml changes nothing (the engine runs in what it was built in)",
                        config.name, version, plan.name, ", ".join(ignored + ["precision"]))
        from daemon.engines.tensorrt import runner as trt_runner

        key = source_sha or await asyncio.to_thread(sha256_file, plan)
        report("loading")
        engine = await asyncio.to_thread(
            trt_runner.load, plan, inputs=None, outputs=None, instances=config.instances,
            max_batch=config.max_batch, precision=config.precision, engine_id=key[:16],
            dla_core=config.tensorrt.dla_core, share_memory=config.tensorrt.share_activation_memory,
            resolve=lambda i, o: specs.resolve(i, o, config, model_dir), prebuilt=True)
        try:
            report("warming up")
            await asyncio.to_thread(warm_up, engine, config.build.warmup_runs)
        except Exception as exc:
            engine.close()
            raise ConfigError(f"model {config.name} version {version}: the engine fails its warm-up run: {exc}") from None
        return Prepared(engine, key, "", dict(engine.layer_counts), True, None)

    async def _build(self, config: ModelConfig, version: int, model_file: Path, calib: Path | None,
                     backend: _Backend, recipe: str, report: Callable[[str], None]):
        try:
            return await self._build_in_scratch(config, version, model_file, calib, backend, recipe, report)
        except OSError as exc:  # the scratch directory, the entry's metadata, the recipe
            if is_no_space(exc):
                raise no_space(self.cache.root, _METADATA_BYTES) from None
            raise FailedPrecondition(f"the engine cache cannot be written ({exc.strerror or exc}): make "
                                     "--engine-cache-dir writable for tegrad's user") from None

    async def _build_in_scratch(self, config: ModelConfig, version: int, model_file: Path, calib: Path | None,
                                backend: _Backend, recipe: str, report: Callable[[str], None]):
        scratch = await asyncio.to_thread(self.cache.scratch)
        job = BuildJob(
            model=config.name, version=version, backend=config.backend, precision=config.precision,
            source=str(model_file), work_dir=str(scratch), target=backend.target,
            calibration_cache=str(calib) if calib else None, exclude=tuple(config.exclude),
            exclude_precision=config.exclude_precision, max_batch=config.max_batch, options=backend.options,
            timing_cache=str(self.cache.timing_cache(backend.fingerprint)) if config.backend == "tensorrt" else None,
        )
        labels = (config.backend, config.precision)
        # TensorRT times tactics on the clocks of the moment: record them with the engine, and say
        # when they were not at their maximum (its timing cache and tactic choice depend on them).
        clocks = await asyncio.to_thread(clock_record)
        if clocks is not None and config.backend == "tensorrt":
            warning = clock_warning(ClockState(clocks["nvpmodel_mode"], clocks["nvpmodel_name"], clocks["jetson_clocks"]))
            if warning:
                log.warning("model %s version %d: building the engine while %s", config.name, version, warning)
        start = time.monotonic()
        try:
            try:
                result = await self.pool.build(job, timeout=config.build.timeout_s,
                                               progress=lambda s: report(f"building: {s}"))
            except BuildFailed as exc:
                metrics.ENGINE_BUILDS.labels(*labels, exc.result).inc()
                raise
            except asyncio.CancelledError:
                metrics.ENGINE_BUILDS.labels(*labels, "cancelled").inc()
                raise
            finally:
                metrics.ENGINE_BUILD_DURATION.labels(*labels).observe(time.monotonic() - start)
            metrics.ENGINE_BUILDS.labels(*labels, "success").inc()
            key = engine_key(result.lowered_sha256, backend.fingerprint)
            meta = {"backend": config.backend, "precision": config.precision, "fingerprint": backend.fingerprint,
                    # TensorRT: the built engine's layers by precision@device (its inspector); else the ONNX count.
                    "lowered_sha256": result.lowered_sha256, "layers": result.info.get("layer_counts") or result.layers,
                    "model": config.name,
                    "version": version, "build_seconds": round(result.seconds, 3),
                    "peak_rss_mb": round(result.peak_rss_mb, 1), "build_info": result.info}
            if clocks is not None:
                meta["clocks"] = clocks
            entry = await asyncio.to_thread(self.cache.store, key, result.artifact, meta)
            await asyncio.to_thread(self.cache.remember_recipe, recipe, result.lowered_sha256)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        return entry, result.seconds

