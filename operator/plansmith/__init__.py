"""plansmith: ONNX models to per-GPU-type engines, stored content-addressed and served."""

__version__ = "0.1.0"
