"""TensorRT executor (TensorRT 10 API): deserialize_cuda_engine, an optimization profile chosen by
the batch's shapes, execute_async_v3 on the instance's own CUDA stream, pinned host buffers.

TensorRT and cuda-python are imported lazily: this module imports on machines without them, and
its pure logic (profile selection, buffer sizing) is unit-tested there, its device path against
stand-ins for the two. For real, the device code path only runs where NVIDIA's runtime image
provides TensorRT.

The dynamic batcher's requests are joined straight into the pinned host buffer the batch is copied
to the device from (`form_batch`), one copy fewer than joining them elsewhere and staging the batch.
A batch with inputs in a client's CUDA shared memory region (DeviceTensors) is gathered straight
into the engine's device input buffer instead: device-to-device from the regions, host-to-device
from the other requests, on the instance's stream ahead of the run. (Binding a region's address to
the engine would save that copy, but TensorRT wants 256-byte aligned tensor addresses, and a
region's offset is the client's.) An output every request of a batch asked for in a CUDA region
is copied there from the engine's output buffer on the same stream, and not to the host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from plansmith_runtime.batching import join_rows, join_rows_into
from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.executors.cuda import check_cuda, host_array
from plansmith_runtime.executors.device_memory import (DeviceTensor, OutputDestinations, WrittenOnDevice, copy_rows,
                                                       has_device_inputs, scatter_rows)
from plansmith_runtime.loader import LoadedEngine

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ProfileRange:
    """One optimization profile: per input name, its (min, opt, max) shapes."""

    shapes: Mapping[str, tuple[Shape, Shape, Shape]]

    def accepts(self, feeds: Mapping[str, Shape]) -> bool:
        for name, shape in feeds.items():
            if name not in self.shapes:
                return False
            low, _, high = self.shapes[name]
            if len(shape) != len(low) or any(not lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
                return False
        return True

    def max_batch(self) -> int:
        return min(high[0] for _, _, high in self.shapes.values()) if self.shapes else 0


class NoProfileFits(ExecutorError):
    pass


def select_profile(profiles: Sequence[ProfileRange], feeds: Mapping[str, Shape]) -> int:
    """The profile to run these input shapes with: among those whose ranges contain every shape, the
    one with the smallest maximum batch (a tight profile's kernels are tuned closest to the batch),
    ties broken by the opt batch nearest the actual one, then by index."""
    candidates = [i for i, profile in enumerate(profiles) if profile.accepts(feeds)]
    if not candidates:
        raise NoProfileFits(f"no optimization profile accepts input shapes {dict(feeds)}")
    batch = next(iter(feeds.values()))[0] if feeds else 0

    def rank(index: int) -> tuple[int, int, int]:
        profile = profiles[index]
        opt_batch = min(opt[0] for _, opt, _ in profile.shapes.values())
        return profile.max_batch(), abs(opt_batch - batch), index

    return min(candidates, key=rank)


def buffer_bytes(max_shape: Shape, dtype: np.dtype) -> int:
    """Bytes to allocate once so any shape up to `max_shape` fits."""
    return int(np.prod(max_shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def largest_shapes(profiles: Sequence[ProfileRange]) -> dict[str, Shape]:
    """Per input, the element-wise maximum over all profiles' max shapes (for buffer sizing)."""
    largest: dict[str, Shape] = {}
    for profile in profiles:
        for name, (_, _, high) in profile.shapes.items():
            widen(largest, name, high)
    return largest


def widen(largest: dict[str, Shape], name: str, shape: Shape) -> None:
    """Make `largest[name]` the element-wise maximum of itself and `shape`."""
    current = largest.get(name)
    largest[name] = tuple(shape) if current is None else tuple(max(a, b) for a, b in zip(current, shape))


class TensorRTExecutor:
    batch_buckets: tuple[int, ...] = ()  # profiles take any batch size in their range as it is
    device_inputs: int | None = 0  # the process's CUDA device (the pod's GPU), where the engine runs

    def __init__(self, engine: LoadedEngine) -> None:
        try:
            import tensorrt as trt  # type: ignore[import-not-found]
            from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
        except ImportError as error:
            raise ExecutorError(f"TensorRT engines need the tensorrt and cuda-python packages: {error}") from None
        self._trt, self._cudart = trt, cudart
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine.path("engine").read_bytes())
        if self._engine is None:
            raise ExecutorError("TensorRT could not deserialize the plan (built by another TensorRT version or for another GPU?)")
        self._context = self._engine.create_execution_context()
        self._stream = check_cuda(cudart.cudaStreamCreate())  # a cudaStream_t object for cuda-python calls
        self._stream_handle = int(self._stream)  # TensorRT takes the raw handle
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._dtypes = {n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))) for n in names}
        self.profiles = [
            ProfileRange({n: tuple(tuple(s) for s in self._engine.get_tensor_profile_shape(n, p)) for n in self.inputs})
            for p in range(self._engine.num_optimization_profiles)
        ]
        # Device buffers and pinned host buffers sized for the largest shapes any profile accepts.
        largest = {**largest_shapes(self.profiles), **self._largest_output_shapes()}
        self._profile = -1  # none chosen for a run yet
        self._device: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        for name in names:
            size = buffer_bytes(largest[name], self._dtypes[name])
            self._device[name] = check_cuda(cudart.cudaMalloc(size))
            host_pointer = check_cuda(cudart.cudaMallocHost(size))
            self._host[name] = host_array(host_pointer, size).view(self._dtypes[name])
            self._context.set_tensor_address(name, self._device[name])

    def _largest_output_shapes(self) -> dict[str, Shape]:
        """Per output, the element-wise maximum of its shape with each profile's largest inputs set.
        Only the context knows an output's shape, from the input shapes: a dynamic dimension other
        than the batch (a sequence length) can reach whatever the inputs' maxima allow."""
        largest: dict[str, Shape] = {}
        for index, profile in enumerate(self.profiles):
            self._context.set_optimization_profile_async(index, self._stream_handle)
            for name, (_, _, high) in profile.shapes.items():
                self._context.set_input_shape(name, high)
            for name in self.outputs:
                shape = tuple(self._context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise ExecutorError(f"output '{name}' has a shape its inputs do not determine {list(shape)} "
                                        "(data-dependent): this executor sizes its buffers up front")
                widen(largest, name, shape)
        return largest

    def form_batch(self, requests: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Joined straight into the pinned host buffers `run` copies to the device from, so `run`
        has nothing left to stage; an input that does not fit them is joined in pageable memory.
        With device inputs, gathered into the device buffers (`_gather_on_device`)."""
        if has_device_inputs(requests):
            return self._gather_on_device(requests)
        feeds: dict[str, np.ndarray] = {}
        for name, first in requests[0].items():
            parts = [request[name] for request in requests]
            host = self._host.get(name)
            joined = join_rows_into(host, parts) if host is not None and first.dtype == host.dtype else None
            feeds[name] = joined if joined is not None else join_rows(parts)
        return feeds

    def _gather_on_device(self, requests: Sequence[dict[str, np.ndarray | DeviceTensor]]) -> dict[str, DeviceTensor]:
        """The requests' inputs laid one after another in the engine's device input buffers, the
        copies queued on the instance's stream (the run follows them there)."""
        first = requests[0]
        shapes = {name: (sum(request[name].shape[0] for request in requests), *tensor.shape[1:])
                  for name, tensor in first.items()}
        # the buffers hold the profiles' largest shapes: a batch no profile takes is refused before any copy
        select_profile(self.profiles, shapes)
        for name in shapes:
            copy_rows(self._cudart, self._stream, self.device_inputs, name, self._device[name],
                      [request[name] for request in requests])
        return {name: DeviceTensor(self._device[name], first[name].dtype, shape, self.device_inputs, self._cudart, owner=self)
                for name, shape in shapes.items()}

    def run(self, feeds: dict[str, np.ndarray], destinations: OutputDestinations | None = None) -> dict[str, np.ndarray]:
        """With `destinations`, an output every request wants on the device is copied there and
        comes back as WrittenOnDevice."""
        cudart = self._cudart
        shapes = {name: tuple(array.shape) for name, array in feeds.items()}
        profile = select_profile(self.profiles, shapes)
        if profile != self._profile:
            self._context.set_optimization_profile_async(profile, self._stream_handle)
            self._profile = profile
        kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, array in feeds.items():
            if isinstance(array, DeviceTensor):
                if array.pointer != self._device[name]:  # not gathered there by form_batch
                    copy_rows(cudart, self._stream, self.device_inputs, name, self._device[name], [array])
                self._context.set_input_shape(name, array.shape)
                continue
            staged = self._host[name][: array.size]
            if array.ctypes.data != staged.ctypes.data:  # not joined there by form_batch
                staged[:] = array.reshape(-1)
            self._context.set_input_shape(name, array.shape)
            check_cuda(cudart.cudaMemcpyAsync(self._device[name], staged.ctypes.data, array.nbytes, kind_h2d, self._stream))
        if not self._context.execute_async_v3(self._stream_handle):
            # the copies queued before it may still read the pinned buffers the next batch is joined in
            check_cuda(cudart.cudaStreamSynchronize(self._stream))
            raise ExecutorError("TensorRT execute_async_v3 failed")
        results: dict[str, np.ndarray | WrittenOnDevice] = {}
        for name in self.outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            written = WrittenOnDevice(self._dtypes[name], shape)
            item_nbytes = destinations.item_nbytes(written) if destinations else 0
            targets = destinations.for_output(name, item_nbytes, self.device_inputs) if destinations else None
            if targets is not None:
                scatter_rows(cudart, self._stream, self._device[name], item_nbytes, destinations.rows, targets)
                results[name] = written
                continue
            staged = self._host[name][:int(np.prod(shape, dtype=np.int64))]
            check_cuda(cudart.cudaMemcpyAsync(staged.ctypes.data, self._device[name], staged.nbytes, kind_d2h, self._stream))
            results[name] = staged.reshape(shape)  # the pinned buffer: copied out once the stream is done
        check_cuda(cudart.cudaStreamSynchronize(self._stream))
        return {name: value.copy() if isinstance(value, np.ndarray) else value for name, value in results.items()}

    def close(self) -> None:
        cudart = self._cudart
        for pointer in self._device.values():
            cudart.cudaFree(pointer)
        for array in self._host.values():
            cudart.cudaFreeHost(array.ctypes.data)
        cudart.cudaStreamDestroy(self._stream)
