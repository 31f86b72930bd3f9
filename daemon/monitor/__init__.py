"""Live precision monitoring: does an INT8/FP16 engine still agree with its FP32 model in the field?

:func:`daemon.monitor.engine.attach` wraps a model version's engine when its config has a ``[monitor]`` section and
it runs in int8, mixed or fp16: the wrapper samples executions (the preprocessed tensors the
engine saw and its raw outputs) for a :class:`~daemon.monitor.monitor.PrecisionMonitor`,
which runs the source ONNX in FP32 beside serving and exports agreement, calibration
saturation and input drift. Breaches go to the callback the repository passes in; this
package imports neither ``daemon.repository`` nor ``daemon.server``.
"""
