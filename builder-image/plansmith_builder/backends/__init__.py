"""Engine backends behind one interface (`base.EngineBackend`): TensorRT and ONNX Runtime.

`resolve_backend` picks one for the requested name and target; the heavy libraries are imported
only when a backend is used."""

from plansmith_builder.backends.base import BuildContext, BuiltEngine, EngineBackend, resolve_backend

__all__ = ["BuildContext", "BuiltEngine", "EngineBackend", "resolve_backend"]
