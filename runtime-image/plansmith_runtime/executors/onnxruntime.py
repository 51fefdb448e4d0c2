"""ONNX Runtime executor: CPU or CUDA execution provider, IO binding on the GPU.

session.run releases the GIL, so several instances (one session each) run batches concurrently
from executor threads.
"""

from __future__ import annotations

import logging

import numpy as np

from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.loader import LoadedEngine

log = logging.getLogger(__name__)


def providers_for(execution_provider: str | None, device_id: int = 0) -> list:
    """The provider list for a manifest's execution provider (CPU is always the fallback)."""
    if execution_provider == "CUDAExecutionProvider":
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _provider_name(provider: str | tuple) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def uses_io_binding(providers: list) -> bool:
    """IO binding pays off when the session runs on a device other than the host."""
    return _provider_name(providers[0]) != "CPUExecutionProvider"


class OnnxRuntimeExecutor:
    def __init__(self, engine: LoadedEngine, *, intra_op_threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # The builder already optimized the graph; ORT_ENABLE_ALL again is cheap and keeps
        # engines written by older builders fast.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads would steal the cores the protocol handlers need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = providers_for(engine.manifest.target.execution_provider)
        try:
            self.session = ort.InferenceSession(str(engine.path("engine")), options, providers=self.providers)
        except Exception as error:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise ExecutorError(f"ONNX Runtime cannot load {engine.path('engine').name}: {error}") from None
        active = self.session.get_providers()
        wanted = _provider_name(self.providers[0])
        if wanted not in active:
            raise ExecutorError(f"execution provider {wanted} is not available (have {active})")
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.io_binding = uses_io_binding(self.providers)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.io_binding:
            return self._run_bound(feeds)
        results = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, results))

    def _run_bound(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
