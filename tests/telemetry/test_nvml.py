"""NVML telemetry for discrete GPUs: real NVML where nvidia-ml-py and a GPU exist, else the reason why not."""

from __future__ import annotations

import importlib.util

import pytest

from daemon.telemetry import metrics as m
from daemon.telemetry.nvml import NvmlTelemetry

HAVE_PYNVML = importlib.util.find_spec("pynvml") is not None


def test_without_nvidia_ml_py_the_reason_names_the_package():
    if HAVE_PYNVML:
        pytest.skip("nvidia-ml-py is installed here, so its absence cannot be observed")
    telemetry, why = NvmlTelemetry.probe()
    assert telemetry is None and "nvidia-ml-py" in why


def test_readings_on_a_gpu():
    if not HAVE_PYNVML:
        pytest.skip("nvidia-ml-py is not installed (pip install 'tegrad[nvml]')")
    telemetry, why = NvmlTelemetry.probe()
    if telemetry is None:
        pytest.skip(f"no GPU through NVML: {why}")
    try:
        got = {(x, labels): v for x, labels, v in telemetry.read()}
    finally:
        telemetry.close()
    assert (m.GPU_LOAD, ("0",)) in got and 0 <= got[m.GPU_LOAD, ("0",)] <= 1
    assert 0 < got[m.GPU_MEM_USED, ("0",)] <= got[m.GPU_MEM_TOTAL, ("0",)]
    assert 10 < got[m.GPU_TEMPERATURE, ("0",)] < 110
    assert 1e8 < got[m.GPU_FREQ_MAX, ("0",)] < 5e9
    assert not any(x.name.startswith("tegrad_jetson_") for x, _ in got)
