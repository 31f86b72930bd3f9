"""The engine wrapper that feeds a precision monitor, and where one is attached."""


from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from calib import input_stats
from daemon.monitor.compare import task_of
from daemon.monitor.monitor import PrecisionMonitor

log = logging.getLogger("tegrad.monitor")

MONITORED_PRECISIONS = ("int8", "mixed", "fp16")

class MonitoredEngine:
    """An engine whose executions are offered to a precision monitor; everything else passes through."""

    def __init__(self, engine, monitor: PrecisionMonitor) -> None:
        self._engine = engine
        self.monitor = monitor

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def infer(self, feeds, slot: int = 0):
        outputs = self._engine.infer(feeds, slot)
        self.monitor.offer(feeds, outputs)
        return outputs

    def close(self) -> None:
        self.monitor.close()
        self._engine.close()


def attach(engine, config, *, model: str, version: int, model_file: Path, config_dir: Path,
           on_breach: Callable[[str, int, str], None] | None = None):
    """``engine`` wrapped with a monitor when ``config.monitor`` asks for one, else ``engine``."""
    settings = getattr(config, "monitor", None)
    if settings is None or not settings.enabled:
        return engine
    if engine.precision not in MONITORED_PRECISIONS:
        log.info("model %s/%d: [monitor] has nothing to compare: it already runs %s", model, version, engine.precision)
        return engine
    amax, stats = None, None
    if config.calibration_cache:
        from calib.cache import CalibrationCache

        cache = CalibrationCache.load(Path(config_dir) / config.calibration_cache)
        amax = cache.amax
        recorded = cache.source.get("input_stats")
        stats = {k: v for k, v in recorded.items() if input_stats.usable(v)} if isinstance(recorded, dict) else None
        if not stats:
            stats = None
            log.info("model %s/%d: calibration cache %s has no input statistics (made before tegrad recorded "
                     "them): no input drift score; recalibrate to get one", model, version, config.calibration_cache)
    task = task_of(config, [o.name for o in engine.outputs])
    monitor = PrecisionMonitor(model=model, version=version, settings=settings, source_onnx=model_file, task=task,
                               amax=amax, input_stats=stats, batched=config.max_batch > 0, on_breach=on_breach)
    log.info("model %s/%d: precision monitor on (%s, shadow_rate %g, %g core(s), window %d)", model, version,
             task.kind, settings.shadow_rate, settings.shadow_max_cpu, settings.window)
    return MonitoredEngine(engine, monitor)
