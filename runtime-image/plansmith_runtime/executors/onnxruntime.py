"""ONNX Runtime executor: CPU or CUDA execution provider, IO binding on the GPU.

session.run releases the GIL, so several instances (one session each) run batches concurrently
from executor threads.

On a GPU the executor binds its inputs and outputs (IO binding): host arrays are copied to the
device by ONNX Runtime, and inputs that already live on the device (`onnxruntime.OrtValue`s, e.g.
`OrtValue.ortvalue_from_numpy(array, "cuda", 0)`) are bound as they are, without a copy. Finding
the CUDA libraries and refusing a silent CPU fallback: `plansmith.onnxruntime_providers`.

On the CUDA provider every batch-size bucket has its own session and batches are padded up to the
next bucket: ONNX Runtime's CUDA convolutions re-plan whenever the input shape differs from the
previous call's, about 0.1 s for ResNet-50 on an H200 even for sizes run before (docs/benchmarks.md,
GPU), so a session must only ever see one shape. On the CPU there is no such cost and one session
runs every size as it is.

On the CUDA provider the batcher's requests are joined, and padded, in pinned host buffers
(pinned_memory.py), from which ONNX Runtime's copy to the device is about three times faster. A
batch with inputs in a client's CUDA shared memory region (DeviceTensors) is gathered on the device
instead (device_memory.py), and a lone such request that fills its bucket is bound where it is.
Outputs that every request of a batch asked for in a CUDA region are copied there device-to-device
from the session's output, and not to the host.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from plansmith.onnxruntime_providers import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    CUDA_PROVIDER_OPTIONS,
    ProviderUnavailable,
    check_providers,
    preload_cuda_libraries,
)
from plansmith_runtime.batching import concatenate
from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.executors.device_memory import (DeviceBatches, DeviceTensor, OutputDestinations, WrittenOnDevice,
                                                       has_device_inputs)
from plansmith_runtime.executors.pinned_memory import BatchStaging, PinnedMemoryPool
from plansmith_runtime.loader import LoadedEngine

log = logging.getLogger(__name__)


def providers_for(execution_provider: str | None, device_id: int = 0) -> list:
    """The provider list for a manifest's execution provider (CPU is always the fallback)."""
    if execution_provider == CUDA_PROVIDER:
        return [(CUDA_PROVIDER, {"device_id": device_id, **CUDA_PROVIDER_OPTIONS}), CPU_PROVIDER]
    return [CPU_PROVIDER]


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes that get a session of their own: powers of two below the maximum, and it."""
    if max_batch_size <= 0:
        return ()
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def session_batch_buckets(execution_provider: str | None, max_batch_size: int) -> tuple[int, ...]:
    """Buckets for an engine on this provider: CUDA re-plans convolutions per input shape, the CPU does not."""
    return batch_buckets(max_batch_size) if execution_provider == CUDA_PROVIDER else ()


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `batch` (buckets are sorted; the largest is the max batch)."""
    for size in buckets:
        if size >= batch:
            return size
    raise ExecutorError(f"batch of {batch} is larger than the largest bucket {buckets[-1]}")


def pad_batch(feeds: dict, size: int) -> dict:
    """Feeds with zero rows appended along dimension 0 up to `size` (host arrays only)."""
    padded = {}
    for name, value in feeds.items():
        array = host_array_of(value)
        missing = size - array.shape[0]
        padded[name] = array if missing == 0 else np.concatenate(
            [array, np.zeros((missing, *array.shape[1:]), array.dtype)])
    return padded


def numpy_dtype(ort_type: str) -> np.dtype | None:
    """The numpy dtype of an ONNX Runtime tensor type of fixed-size elements ('tensor(float)' ->
    float32); None for other types (strings, sequences, maps, an element type numpy does not know), which
    stay on the host path."""
    if not (ort_type.startswith("tensor(") and ort_type.endswith(")")):
        return None
    element = ort_type[len("tensor("):-1]
    try:
        return np.dtype({"float": "float32", "double": "float64"}.get(element, element))
    except TypeError:
        return None


def _provider_name(provider: str | tuple) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def uses_io_binding(providers: list) -> bool:
    """IO binding pays off when the session runs on a device other than the host."""
    return _provider_name(providers[0]) != CPU_PROVIDER


def is_device_value(value) -> bool:
    """An onnxruntime.OrtValue, one of the two feed types other than numpy arrays the executor takes
    (the other: a DeviceTensor)."""
    return hasattr(value, "device_name") and hasattr(value, "data_ptr")


def host_array_of(value) -> np.ndarray:
    """A feed's host array: itself, an OrtValue's numpy copy, a DeviceTensor's host copy."""
    return value.numpy() if is_device_value(value) else np.asarray(value)


def batch_rows(value) -> int:
    """Dimension 0 of a feed: a numpy array, a DeviceTensor or an OrtValue."""
    return (value.shape() if is_device_value(value) else value.shape)[0]


class OnnxRuntimeExecutor:
    def __init__(self, engine: LoadedEngine, *, intra_op_threads: int = 0, device_id: int = 0,
                 buckets: tuple[int, ...] = (), pinned_pool: PinnedMemoryPool | None = None) -> None:
        """`buckets`: batch sizes that each get a session, batches padded up to the next one; () for
        one session running every size. `pinned_pool`: a session on a GPU joins (and pads) its
        batches in pinned buffers from it, sized for the largest bucket."""
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
        self.batch_buckets = buckets
        self.sessions = {size: self._create_session(ort, engine, options) for size in buckets}
        self.session = self.sessions[buckets[-1]] if buckets else self._create_session(ort, engine, options)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.output_dtypes = {output.name: numpy_dtype(output.type) for output in self.session.get_outputs()}
        self.io_binding = uses_io_binding(self.providers)
        # where bound outputs are allocated: on the session's device, copied back once per run
        self.output_device = "cuda" if _provider_name(self.providers[0]) == CUDA_PROVIDER else "cpu"
        self.staging = (BatchStaging(pinned_pool, buckets[-1]) if pinned_pool is not None and self.io_binding and buckets
                        else None)
        # the CUDA device whose memory this executor takes inputs in (DeviceTensors); None: host arrays only
        self.device_inputs = device_id if self.output_device == "cuda" else None
        self.device_batches = (DeviceBatches(device_id, buckets[-1] if buckets else 0) if self.device_inputs is not None
                               else None)

    def _create_session(self, ort, engine: LoadedEngine, options):
        try:
            session = ort.InferenceSession(str(engine.path("engine")), options, providers=self.providers)
        except Exception as error:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise ExecutorError(f"ONNX Runtime cannot load {engine.path('engine').name}: {error}") from None
        try:
            check_providers(_provider_name(self.providers[0]), session.get_providers())
        except ProviderUnavailable as error:
            raise ExecutorError(str(error)) from None
        return session

    def form_batch(self, requests: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if self.device_batches is not None and has_device_inputs(requests):
            rows = sum(batch_rows(next(iter(request.values()))) for request in requests)
            return self.device_batches.gather(requests, self._session_rows(rows))
        return self.staging.join(requests) if self.staging else concatenate(requests)

    def run(self, feeds: dict, destinations: OutputDestinations | None = None) -> dict[str, np.ndarray]:
        """Feeds are numpy arrays, DeviceTensors, or OrtValues already on the device (the last two
        with IO binding only). With `destinations`, an output every request wants on the device is
        written there and comes back as WrittenOnDevice."""
        if not self.batch_buckets:
            return self._run(self.session, feeds, destinations)
        batch = batch_rows(next(iter(feeds.values())))
        size = self._session_rows(batch)
        if size == batch:
            return self._run(self.sessions[size], feeds, destinations)
        # in place when form_batch joined them: in its device buffers, or its pinned ones
        if all(isinstance(feed, DeviceTensor) for feed in feeds.values()):
            padded = {name: feed.with_rows(size) for name, feed in feeds.items()}
            if any(feed is None for feed in padded.values()):
                raise ExecutorError(f"device inputs of {batch} rows have no room for the padding to {size}")
        else:
            padded = self.staging.pad(feeds, size) if self.staging else None
        outputs = self._run(self.sessions[size], padded or pad_batch(feeds, size), destinations)
        return {name: array[:batch] for name, array in outputs.items()}

    def _session_rows(self, batch: int) -> int:
        """The rows the session that runs a batch of `batch` takes: its bucket, or the batch as it is."""
        return bucket_for(batch, self.batch_buckets) if self.batch_buckets else batch

    def _run(self, session, feeds: dict, destinations: OutputDestinations | None = None) -> dict[str, np.ndarray]:
        if self.io_binding:
            return self._run_bound(session, feeds, destinations)
        if not all(isinstance(value, np.ndarray) for value in feeds.values()):  # a CPU session reads host memory
            feeds = {name: host_array_of(value) for name, value in feeds.items()}
        return dict(zip(self.output_names, session.run(self.output_names, feeds)))

    def _run_bound(self, session, feeds: dict, destinations: OutputDestinations | None) -> dict[str, np.ndarray]:
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, DeviceTensor):  # in a client's region, or gathered on the device: no copy
                binding.bind_input(name, self.output_device, value.device_id, value.dtype, list(value.shape), value.pointer)
            elif is_device_value(value):
                binding.bind_ortvalue_input(name, value)  # already on the device: no copy
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            # ONNX Runtime allocates them from the device's arena; after the run each is copied to the
            # host once, or into the requests' regions on the device (destinations)
            binding.bind_output(name, self.output_device, self.device_id)
        session.run_with_iobinding(binding)  # returns once the device's work is done (ONNX Runtime synchronizes)
        if destinations is None or self.device_batches is None:
            return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
        outputs: dict[str, np.ndarray] = {}
        for name, value in zip(self.output_names, binding.get_outputs()):
            dtype = self.output_dtypes[name]
            written = WrittenOnDevice(dtype, tuple(value.shape())) if dtype is not None else None
            if written is not None and self.device_batches.scatter(name, value.data_ptr(), written, destinations):
                outputs[name] = written  # type: ignore[assignment]
            else:
                outputs[name] = value.numpy()
        return outputs

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
        self.sessions = {}
        if self.staging:
            self.staging.close()
        if self.device_batches:
            self.device_batches.close()
