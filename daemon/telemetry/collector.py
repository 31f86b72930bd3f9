"""The device telemetry thread: reads the hardware every period and publishes one snapshot.

Scrapes only render the latest snapshot (``metrics.DEVICE``), so a Prometheus
scraping every second and a dashboard refreshing often add no sysfs reads.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Protocol

from daemon.telemetry import metrics
from daemon.telemetry.jetson import JetsonTelemetry, not_jetson_reason
from daemon.telemetry.metrics import Reading
from daemon.telemetry.nvml import NvmlTelemetry

log = logging.getLogger("tegrad.telemetry")


class Source(Protocol):
    def read(self) -> list[Reading]: ...


class DeviceTelemetry:
    def __init__(self, sources: list[Source], period: float, snapshot: metrics.DeviceSnapshot = metrics.DEVICE) -> None:
        self.sources = sources
        self.period = period
        self._snapshot = snapshot
        self._stop = threading.Event()
        self._failing: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="tegrad-telemetry", daemon=True)

    def start(self) -> DeviceTelemetry:
        self.collect()  # the first scrape already sees the device
        self._thread.start()
        return self

    def collect(self) -> None:
        readings: list[Reading] = []
        for n, source in enumerate(self.sources):
            try:
                readings.extend(source.read())
                self._failing.discard(n)
            except Exception:  # a bug in one source must not stop the others or the daemon
                if n not in self._failing:
                    log.exception("device telemetry: %s failed; its metrics are absent until it reads again",
                                  type(source).__name__)
                    self._failing.add(n)
        self._snapshot.publish(readings)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.collect()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for source in self.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        self._snapshot.clear()


def start_device_telemetry(period: float, root: Path | str = "/") -> DeviceTelemetry | None:
    """Start the collectors this machine has; None (and one INFO line each saying why) when it has none."""
    if period <= 0:
        log.info("device telemetry off (--telemetry-period 0)")
        return None
    sources: list[Source] = []
    try:
        reason = not_jetson_reason(root)
        if reason is None:
            jetson = JetsonTelemetry(root)
            sources.append(jetson)
            log.info("Jetson telemetry every %g s: %s, L4T %s (JetPack %s)", period, jetson.info.board or "unknown board",
                     jetson.info.l4t or "?", jetson.info.jetpack or "?")
        else:
            log.info("no tegrad_jetson_* metrics: %s", reason)
            # The Jetson collector covers the integrated GPU; NVML is for discrete ones.
            nvml, why = NvmlTelemetry.probe()
            if nvml is None:
                log.info("no tegrad_gpu_* metrics: %s", why)
            else:
                sources.append(nvml)
                log.info("NVML GPU telemetry every %g s: %d GPU(s)", period, nvml.gpus)
    except Exception:  # telemetry is an extra: a surprise in the hardware must not keep tegrad from serving
        log.exception("device telemetry could not start; serving without it")
        return None
    if not sources:
        return None
    return DeviceTelemetry(sources, period).start()
