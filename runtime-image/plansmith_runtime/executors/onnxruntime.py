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


def cuda_library_dirs(nvidia_roots: Iterable[Path]) -> list[tuple[Path, bool, bool]]:
    """(folder, has CUDA libraries, has cuDNN) for each `lib` folder of NVIDIA's wheels under the
    given `nvidia` package folders: CUDA 13's consolidated `nvidia/cu13/lib`, CUDA 12's
    `nvidia/cublas/lib`, ..., and `nvidia/cudnn/lib`. Folders with neither are left out."""
    found: list[tuple[Path, bool, bool]] = []
    seen: set[Path] = set()
    for root in nvidia_roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for lib in sorted(root.glob("*/lib")):
            if lib in seen or not lib.is_dir():
                continue
            seen.add(lib)
            names = [entry.name for entry in lib.iterdir()]
            cuda = any(name.startswith(CUDA_LIBRARY_PREFIXES) for name in names)
            cudnn = any(name.startswith(CUDNN_LIBRARY_PREFIX) for name in names)
            if cuda or cudnn:
                found.append((lib, cuda, cudnn))
    return found


def nvidia_package_roots() -> list[Path]:
    """Every `nvidia` package folder on sys.path (a namespace package may have several)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


_preloaded = False


def preload_cuda_libraries() -> list[Path]:
    """Load the CUDA and cuDNN libraries the CUDA provider needs, once per process; the folders
    used. Without NVIDIA's wheels on sys.path, ONNX Runtime's default search (its own site-packages,
    then the system's library path) is used. Never raises: a provider that still cannot load is
    reported by the session (see `check_providers`)."""
    global _preloaded
    if _preloaded:
        return []
    _preloaded = True
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is None or CUDA_PROVIDER not in ort.get_available_providers():
        return []
    folders = cuda_library_dirs(nvidia_package_roots())
    # preload_dlls reports failures with print(); stdout is reserved for results (plansmith build)
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if not folders:
                preload()
            for folder, cuda, cudnn in folders:
                preload(cuda=cuda, cudnn=cudnn, msvc=False, directory=str(folder))
        except Exception as error:  # a broken or unexpected layout: the session will say what is missing
            log.warning("could not preload the CUDA libraries: %s", error)
    return [folder for folder, _, _ in folders]


def check_providers(wanted: str, active: list[str]) -> None:
    """ONNX Runtime falls back to the CPU, with only a log line, when a provider cannot load
    (missing CUDA libraries, no GPU): a session meant for `wanted` that does not run on it is an error."""
    if not active or active[0] != wanted:
        raise ExecutorError(f"execution provider {wanted} is not active (the session has {active}); "
                            "for CUDAExecutionProvider: onnxruntime-gpu with the CUDA and cuDNN libraries of its "
                            "CUDA version, and a visible GPU")


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
