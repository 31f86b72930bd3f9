"""Declarative pre- and post-processing for served models (the ``[preprocess]`` and
``[postprocess]`` tables of a model config).

- :mod:`.spec`: the config schema and the client-visible tensors of each kind;
- :mod:`.images`: encoded/raw client images to BGR arrays, with per-item errors;
- :mod:`.cpu`: the OpenCV/NumPy implementation, the reference for correctness;
- :mod:`.gpu` (and :mod:`.gpu_post`, :mod:`.device`, ``kernels/*.cu``): the same on the GPU with
  pycuda, compiled at first use; importing them needs no GPU.
"""

from daemon.processing.cpu import CpuPostprocessor, CpuPreprocessor
from daemon.processing.spec import PostprocessConfig, PreprocessConfig, bind_input, bind_output

__all__ = [
    "CpuPostprocessor",
    "CpuPreprocessor",
    "PostprocessConfig",
    "PreprocessConfig",
    "bind_input",
    "bind_output",
]
