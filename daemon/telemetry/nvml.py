"""Discrete-GPU telemetry through NVML (``nvidia-ml-py``, optional, imported only when asked for).

The families mirror the Jetson GPU ones (load ratio, clock in hertz, temperature
in celsius, power in watts) under ``tegrad_gpu_*``, with memory in bytes, since
a discrete GPU has memory of its own.
"""

from __future__ import annotations

import logging

from daemon.telemetry import metrics as m
from daemon.telemetry.metrics import Reading

log = logging.getLogger("tegrad.telemetry")


class NvmlTelemetry:
    def __init__(self, nvml, handles: list) -> None:
        self._nvml = nvml
        self._handles = handles
        self._info = []
        for index, handle in enumerate(handles):
            name = self._call(nvml.nvmlDeviceGetName, handle) or ""
            driver = self._call(nvml.nvmlSystemGetDriverVersion) or ""
            self._info.append((str(index), name.decode() if isinstance(name, bytes) else name,
                               driver.decode() if isinstance(driver, bytes) else driver))

    @classmethod
    def probe(cls) -> tuple[NvmlTelemetry | None, str]:
        """The collector, or None and the reason there is none."""
        try:
            import pynvml
        except ImportError:
            return None, "nvidia-ml-py is not installed (pip install 'tegrad[nvml]')"
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            return None, f"NVML did not initialise ({exc}): no NVIDIA driver or GPU here"
        try:
            count = pynvml.nvmlDeviceGetCount()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            return None, f"NVML lists no GPU ({exc})"
        if not handles:
            pynvml.nvmlShutdown()
            return None, "NVML lists no GPU"
        return cls(pynvml, handles), ""

    @property
    def gpus(self) -> int:
        return len(self._handles)

    def _call(self, fn, *args):
        # One unsupported query (power on many consumer boards) costs that value only.
        try:
            return fn(*args)
        except self._nvml.NVMLError:
            return None

    def read(self) -> list[Reading]:
        nvml, out = self._nvml, []
        for (gpu, name, driver), handle in zip(self._info, self._handles):
            labels = (gpu,)
            out.append((m.GPU_INFO, (gpu, name, driver), 1))
            util = self._call(nvml.nvmlDeviceGetUtilizationRates, handle)
            if util is not None:
                out.append((m.GPU_LOAD, labels, util.gpu / 100))
            memory = self._call(nvml.nvmlDeviceGetMemoryInfo, handle)
            if memory is not None:
                out.append((m.GPU_MEM_USED, labels, memory.used))
                out.append((m.GPU_MEM_TOTAL, labels, memory.total))
            for metric, value, times in (
                (m.GPU_FREQ, self._call(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_GRAPHICS), 1e6),  # MHz
                (m.GPU_FREQ_MAX, self._call(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_GRAPHICS), 1e6),
                (m.GPU_TEMPERATURE, self._call(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU), 1),
                (m.GPU_POWER, self._call(nvml.nvmlDeviceGetPowerUsage, handle), 1e-3),  # mW
            ):
                if value is not None:
                    out.append((metric, labels, value * times))
        return out

    def close(self) -> None:
        self._call(self._nvml.nvmlShutdown)
