"""TensorRT backend (Jetson). Imports of ``tensorrt`` and ``pycuda`` stay inside functions."""
