"""ONNX Runtime engines: what makes one non-portable, and how the build worker makes one.

The "engine" is the lowered ONNX after ONNX Runtime's graph optimizations, saved to a
file; loading it with optimizations disabled skips that work on a warm start. Level
``all`` adds layout transforms specific to the CPU it ran on, so the CPU model is part
of the fingerprint.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path
from typing import Any

from calib.ort_exact import keep_exact
from daemon.config import ModelConfig

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_slot(config: ModelConfig) -> int:
    if config.onnxruntime.intra_op_threads:
        return config.onnxruntime.intra_op_threads
    return max(1, usable_cores() // config.instances)


def providers() -> list[str]:
    """CUDA when onnxruntime-gpu and a GPU are there, else the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if "CUDAExecutionProvider" in available else ["CPUExecutionProvider"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu part")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_options(config: ModelConfig) -> dict[str, Any]:
    return {"graph_optimization": config.onnxruntime.graph_optimization, "providers": providers()}


def fingerprint(options: dict[str, Any]) -> dict[str, str]:
    import onnxruntime as ort

    return {
        "backend": "onnxruntime",
        "version": ort.__version__,
        "device": f"{platform.machine()} {_cpu_name()}",
        "dla_core": "-1",
        "options": f"graph_optimization={options['graph_optimization']};providers={','.join(options['providers'])}",
    }


def target(options: dict[str, Any]) -> str:
    """Q/DQ flavour: U8 activations for the CPU kernels, TensorRT's S8 form for the CUDA provider."""
    return "cpu" if options["providers"][0] == "CPUExecutionProvider" else "tensorrt"


def build_artifact(lowered: Path, artifact: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Runs in the build worker: optimize ``lowered`` with ONNX Runtime and save the result."""
    import onnxruntime as ort

    level = options["graph_optimization"]
    if level == "disable":
        shutil.copyfile(lowered, artifact)
    else:
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[level])
        so.optimized_model_filepath = str(artifact)
        so.intra_op_num_threads = 1
        keep_exact(so, lowered)
        ort.InferenceSession(str(lowered), so, providers=options["providers"])
    return {"onnxruntime": ort.__version__, "graph_optimization": level}
