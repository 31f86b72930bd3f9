"""ONNX Runtime backend: the CPU default, and the reference for every other backend."""
