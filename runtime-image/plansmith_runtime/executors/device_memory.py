"""Tensors that stay in GPU memory between a client's CUDA shared memory regions and the engine's
run, as Triton's GPU backends read a cudashm input in place and write a cudashm output from the
device.

A `DeviceTensor` is an input in device memory: a region's bytes (cuda_shared_memory) or a batch
gathered here. It has the shape and dtype the request checks read, and becomes a host array only
where host bytes are needed (`np.asarray`: the response cache's key, a TENSORS trace, a CPU
session).

`DeviceBatches` is where a CUDA executor gathers a batch that has device inputs: one device buffer
per input, kept from batch to batch (grown when a larger batch needs it), filled on the executor's
own stream by device-to-device copies from the regions and host-to-device copies of the requests
that sent their bytes, with the padding rows of the executor's batch bucket zeroed. A lone request
whose rows already fill its bucket is not copied at all: the session reads the client's region.

cuda-python gives the allocations, copies and the stream: ONNX Runtime's Python API cannot copy into
part of a device OrtValue, and a request in a CUDA region means cuda-python is here (it opened the
region's handle).

Outputs go the other way: a request that names a CUDA region on the model's device for an output
gives the batcher a `DeviceDestination`. When every request of a batch has one for an output, with
room for its rows, the executor copies each request's rows device-to-device into its region after
the run (`scatter_rows`; without a batch dimension a request runs alone and its rows are the whole
output) and copies nothing of that output to the host; the batch's output is then
`WrittenOnDevice`, and each request's a DeviceTensor over its region (`outputs_in_place`), which the
region's write_output recognizes as already written. Any other batch takes the host path: the
outputs come to the host once a batch and are written to the regions from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from plansmith_runtime.batching import row_bytes
from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.executors.cuda import check_cuda, cuda_runtime


@dataclass(frozen=True, eq=False)
class DeviceTensor:
    """An input tensor in the memory of CUDA device `device_id`, `pointer` its first byte."""

    pointer: int
    dtype: np.dtype
    shape: tuple[int, ...]
    device_id: int
    runtime: object  # cuda.bindings.runtime (or a stand-in with its calls)
    owner: object = None  # keeps the memory valid while the tensor lives (a region's opened handle)
    # rows the memory at `pointer` holds, those past shape[0] zero (a gathered batch's padding); 0: shape[0]
    capacity_rows: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def with_rows(self, rows: int) -> DeviceTensor | None:
        """The same memory seen as `rows` rows (padding included), or None where it holds fewer."""
        if rows == self.shape[0]:
            return self
        if rows > max(self.capacity_rows, self.shape[0]):
            return None
        return replace(self, shape=(rows, *self.shape[1:]))

    def to_host(self) -> np.ndarray:
        """A host copy (one device-to-host copy)."""
        array = np.empty(self.shape, self.dtype)
        cudart = self.runtime
        check_cuda(cudart.cudaSetDevice(self.device_id))
        check_cuda(cudart.cudaMemcpy(array.ctypes.data, self.pointer, array.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return array

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.to_host()
        return array if dtype is None else array.astype(dtype, copy=False)


@dataclass(frozen=True, eq=False)
class DeviceDestination:
    """Where a request asked for an output in device memory (a CUDA shared memory region on the
    model's device): `capacity` bytes from `pointer`."""

    pointer: int
    capacity: int
    device_id: int
    runtime: object  # cuda.bindings.runtime (or a stand-in with its calls)
    owner: object = None  # keeps the memory valid while the request lives (its region's opened handle)

    def tensor(self, dtype: np.dtype, shape: tuple[int, ...]) -> DeviceTensor:
        """The output as written there."""
        return DeviceTensor(self.pointer, dtype, shape, self.device_id, self.runtime, owner=self.owner)


@dataclass(frozen=True)
class WrittenOnDevice:
    """A batch's output that the executor wrote into its requests' destinations, with no host copy.
    It is cut along dimension 0 like an array (batching.split, a padded batch's rows)."""

    dtype: np.dtype
    shape: tuple[int, ...]

    def __getitem__(self, rows: slice) -> WrittenOnDevice:
        start, stop, _ = rows.indices(self.shape[0])
        return WrittenOnDevice(self.dtype, (max(stop - start, 0), *self.shape[1:]))


@dataclass(frozen=True)
class OutputDestinations:
    """A batch's requests in order: the rows of each, and where each asked for outputs on the device.
    Without a batch dimension (`batch_dim` False) a request runs alone and its item is the whole
    output."""

    rows: tuple[int, ...]
    by_request: tuple[Mapping[str, DeviceDestination], ...]
    batch_dim: bool = True

    def item_nbytes(self, output: WrittenOnDevice) -> int:
        """Bytes of one of `rows`' items of a run's output: a row (dimension 0), or the whole output."""
        return row_bytes(output) if self.batch_dim else math.prod(output.shape) * output.dtype.itemsize

    def for_output(self, name: str, row_nbytes: int, device_id: int) -> tuple[DeviceDestination, ...] | None:
        """Each request's destination for output `name`, when every request has one in the memory
        of `device_id` with room for its rows; None sends the output the host way."""
        destinations = []
        for rows, wanted in zip(self.rows, self.by_request):
            destination = wanted.get(name)
            if destination is None or destination.device_id != device_id or destination.capacity < rows * row_nbytes:
                return None  # a request too small for its output gets the region's own error from the host path
            destinations.append(destination)
        return tuple(destinations)


def batch_destinations(rows: Sequence[int], by_request: Sequence[Mapping[str, DeviceDestination] | None],
                       batch_dim: bool = True) -> OutputDestinations | None:
    """A batch's destinations, None when no request has any (the executor's usual path)."""
    if not any(by_request):
        return None
    return OutputDestinations(tuple(rows), tuple(wanted or {} for wanted in by_request), batch_dim)


def outputs_in_place(outputs: Mapping[str, object], destinations: Mapping[str, DeviceDestination] | None) -> dict:
    """A request's share of its batch's outputs with each output written on the device replaced by
    a DeviceTensor over the request's region (where the response finds it written)."""
    if not destinations:
        return dict(outputs)
    return {name: destinations[name].tensor(value.dtype, value.shape) if isinstance(value, WrittenOnDevice) else value
            for name, value in outputs.items()}


def scatter_rows(cudart, stream, source: int, row_nbytes: int, rows: Sequence[int],
                 destinations: Sequence[DeviceDestination]) -> None:
    """Queue on `stream` the device-to-device copies of a batch's output rows from `source`, each
    request's rows to its destination, in order."""
    offset = 0
    for count, destination in zip(rows, destinations):
        nbytes = count * row_nbytes
        check_cuda(cudart.cudaMemcpyAsync(destination.pointer, source + offset, nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))
        offset += nbytes


def has_device_inputs(requests: Sequence[Mapping[str, object]]) -> bool:
    return any(isinstance(value, DeviceTensor) for request in requests for value in request.values())


def check_device(name: str, tensor: DeviceTensor, device_id: int) -> None:
    if tensor.device_id != device_id:  # the regions hand out tensors of the model's device only
        raise ExecutorError(f"input '{name}' is in the memory of CUDA device {tensor.device_id}, the engine runs on "
                            f"device {device_id}")


def copy_rows(cudart, stream, device_id: int, name: str, destination: int,
              parts: Sequence[np.ndarray | DeviceTensor]) -> int:
    """Queue on `stream` the copies that lay `parts` one after another from device address
    `destination`: device-to-device from DeviceTensors, host-to-device from host arrays (CUDA has
    taken a pageable source's bytes when cudaMemcpyAsync returns). Returns the bytes laid."""
    kinds = cudart.cudaMemcpyKind
    offset = 0
    for part in parts:
        if isinstance(part, DeviceTensor):
            check_device(name, part, device_id)
            check_cuda(cudart.cudaMemcpyAsync(destination + offset, part.pointer, part.nbytes,
                                              kinds.cudaMemcpyDeviceToDevice, stream))
            offset += part.nbytes
        else:
            source = np.ascontiguousarray(part)
            check_cuda(cudart.cudaMemcpyAsync(destination + offset, source.ctypes.data, source.nbytes,
                                              kinds.cudaMemcpyHostToDevice, stream))
            offset += source.nbytes
    return offset


class DeviceBatches:
    """Device buffers one executor gathers its batches in. An executor runs one batch at a time, so
    its buffers are free again when the next batch is gathered."""

    def __init__(self, device_id: int, max_rows: int = 0, runtime=None) -> None:
        """`max_rows`: the largest batch the executor runs, which each buffer gets room for at once."""
        self.device_id = device_id
        self.max_rows = max_rows
        self._runtime = runtime
        self._stream = None
        self._buffers: dict[str, tuple[int, int]] = {}  # input name -> (device address, bytes)

    def gather(self, requests: Sequence[Mapping[str, np.ndarray | DeviceTensor]], rows_to: int) -> dict[str, DeviceTensor]:
        """The requests' inputs joined along dimension 0 on the device, with room for `rows_to` rows
        (the rows past theirs zero): the session binds them where they are."""
        cudart = self._cuda()
        check_cuda(cudart.cudaSetDevice(self.device_id))
        feeds: dict[str, DeviceTensor] = {}
        for name, first in requests[0].items():
            parts = [request[name] for request in requests]
            rows = sum(part.shape[0] for part in parts)
            if len(parts) == 1 and isinstance(first, DeviceTensor) and first.with_rows(rows_to) is not None:
                check_device(name, first, self.device_id)
                feeds[name] = first  # the client's region, read in place
                continue
            row_nbytes = row_bytes(first)
            address = self._buffer(name, max(rows_to, self.max_rows) * row_nbytes)
            offset = copy_rows(cudart, self._stream, self.device_id, name, address, parts)
            if rows_to > rows:
                check_cuda(cudart.cudaMemsetAsync(address + offset, 0, (rows_to - rows) * row_nbytes, self._stream))
            feeds[name] = DeviceTensor(address, first.dtype, (rows, *first.shape[1:]), self.device_id, cudart,
                                       owner=self, capacity_rows=rows_to)
        check_cuda(cudart.cudaStreamSynchronize(self._stream))
        return feeds

    def scatter(self, name: str, source: int, output: WrittenOnDevice, destinations: OutputDestinations) -> bool:
        """Output `name` of a run (`output`'s dtype and shape, at device address `source`) copied
        into its requests' destinations, when they all have one (OutputDestinations.for_output);
        False otherwise, having copied nothing."""
        item_nbytes = destinations.item_nbytes(output)
        targets = destinations.for_output(name, item_nbytes, self.device_id)
        if targets is None:
            return False
        cudart = self._cuda()
        check_cuda(cudart.cudaSetDevice(self.device_id))
        scatter_rows(cudart, self._stream, source, item_nbytes, destinations.rows, targets)
        check_cuda(cudart.cudaStreamSynchronize(self._stream))
        return True

    def close(self) -> None:
        if self._runtime is None:
            return
        cudart = self._runtime
        for address, _ in self._buffers.values():
            check_cuda(cudart.cudaFree(address))
        self._buffers.clear()
        if self._stream is not None:
            check_cuda(cudart.cudaStreamDestroy(self._stream))
            self._stream = None

    def _buffer(self, name: str, nbytes: int) -> int:
        """The input's device buffer, allocated (or grown) on first need."""
        address, size = self._buffers.get(name, (0, 0))
        if size >= nbytes:
            return address
        cudart = self._runtime
        if address:
            check_cuda(cudart.cudaFree(address))
            del self._buffers[name]
        address = int(check_cuda(cudart.cudaMalloc(nbytes)))
        self._buffers[name] = (address, nbytes)
        return address

    def _cuda(self):
        if self._runtime is None:
            self._runtime = cuda_runtime()
        if self._stream is None:
            self._stream = check_cuda(self._runtime.cudaStreamCreateWithFlags(self._runtime.cudaStreamNonBlocking))
        return self._runtime
