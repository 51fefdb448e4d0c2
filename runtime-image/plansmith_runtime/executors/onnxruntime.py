"""ONNX Runtime executor: CPU or CUDA execution provider, IO binding on the GPU.

session.run releases the GIL, so several instances (one session each) run batches concurrently
from executor threads.

On a GPU the executor binds its inputs and outputs (IO binding): host arrays are copied to the
device by ONNX Runtime, and inputs that already live on the device (`onnxruntime.OrtValue`s, e.g.
`OrtValue.ortvalue_from_numpy(array, "cuda", 0)`) are bound as they are, without a copy. Finding
the CUDA libraries and refusing a silent CPU fallback: `plansmith.onnxruntime_providers`.
"""

from __future__ import annotations

import logging

import numpy as np

from plansmith.onnxruntime_providers import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    CUDA_PROVIDER_OPTIONS,
    ProviderUnavailable,
    check_providers,
    preload_cuda_libraries,
)
from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.loader import LoadedEngine

log = logging.getLogger(__name__)


def providers_for(execution_provider: str | None, device_id: int = 0) -> list:
    """The provider list for a manifest's execution provider (CPU is always the fallback)."""
    if execution_provider == CUDA_PROVIDER:
        return [(CUDA_PROVIDER, {"device_id": device_id, **CUDA_PROVIDER_OPTIONS}), CPU_PROVIDER]
    return [CPU_PROVIDER]


def _provider_name(provider: str | tuple) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def uses_io_binding(providers: list) -> bool:
    """IO binding pays off when the session runs on a device other than the host."""
    return _provider_name(providers[0]) != CPU_PROVIDER


def is_device_value(value) -> bool:
    """An onnxruntime.OrtValue (the only feed type other than numpy arrays the executor takes)."""
    return hasattr(value, "device_name") and hasattr(value, "data_ptr")


class OnnxRuntimeExecutor:
    def __init__(self, engine: LoadedEngine, *, intra_op_threads: int = 0, device_id: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # The builder already optimized the graph; ORT_ENABLE_ALL again is cheap and keeps
        # engines written by older builders fast.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads would steal the cores the protocol handlers need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = providers_for(engine.manifest.target.execution_provider, device_id)
        self.device_id = device_id
        if _provider_name(self.providers[0]) == CUDA_PROVIDER:
            preload_cuda_libraries()
        try:
            self.session = ort.InferenceSession(str(engine.path("engine")), options, providers=self.providers)
        except Exception as error:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise ExecutorError(f"ONNX Runtime cannot load {engine.path('engine').name}: {error}") from None
        try:
            check_providers(_provider_name(self.providers[0]), self.session.get_providers())
        except ProviderUnavailable as error:
            raise ExecutorError(str(error)) from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.io_binding = uses_io_binding(self.providers)
        # where bound outputs are allocated: on the session's device, copied back once per run
        self.output_device = "cuda" if _provider_name(self.providers[0]) == CUDA_PROVIDER else "cpu"

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        """Feeds are numpy arrays, or OrtValues already on the device (IO binding only)."""
        if self.io_binding:
            return self._run_bound(feeds)
        if any(is_device_value(value) for value in feeds.values()):
            feeds = {name: value.numpy() if is_device_value(value) else value for name, value in feeds.items()}
        results = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, results))

    def _run_bound(self, feeds: dict) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if is_device_value(value):
                binding.bind_ortvalue_input(name, value)  # already on the device: no copy
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            # ONNX Runtime allocates them from the device's arena; one copy to the host after the run
            binding.bind_output(name, self.output_device, self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
