"""Triton's system shared memory extension: a client on the same host (a sidecar in the pod, sharing
/dev/shm) registers a POSIX shared memory object under a region name, then names the region instead
of sending tensor bytes; inputs are read from it in place and outputs written into it.

The regions are the server's, shared by the HTTP and gRPC front ends (as in Triton). Each is mapped
once at registration; a request's input is a numpy view of the mapping, so a batch of one runs on
the client's memory without a copy (a larger batch is concatenated as usual).

SharedMemoryRegions holds these and the CUDA shared memory extension's regions (cuda_shared_memory)
under one set of names, as Triton's shared memory manager does: a request names a region of either
kind the same way.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plansmith_runtime.cuda_shared_memory import CudaSharedMemory
from plansmith_runtime.protocol import SharedMemoryError, SharedMemoryReference

# Where Linux keeps POSIX shared memory objects: shm_open(key) opens /dev/shm/<key without its
# leading slash>. Python has no public shm_open that leaves the object's lifetime to its creator
# (multiprocessing.shared_memory registers it with a resource tracker that unlinks it at exit).
SHM_DIRECTORY = Path("/dev/shm")


@dataclass
class Region:
    name: str
    key: str
    offset: int  # into the shared memory object
    byte_size: int
    mapping: mmap.mmap

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class SystemSharedMemory:
    """The registered regions by name."""

    def __init__(self, directory: Path = SHM_DIRECTORY) -> None:
        self.directory = directory
        self._regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise SharedMemoryError("a shared memory region needs a name")
        if name in self._regions:
            raise SharedMemoryError(f"shared memory region '{name}' is already registered")
        for label, value in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SharedMemoryError(f"shared memory region '{name}': {label} must be a non-negative integer, got {value!r}")
        if not isinstance(key, str) or not key.strip("/") or "/" in key.strip("/"):
            raise SharedMemoryError(f"shared memory region '{name}': key {key!r} is not a shared memory object name")
        path = self.directory / key.strip("/")
        try:
            descriptor = os.open(path, os.O_RDWR)
        except OSError as error:
            raise SharedMemoryError(f"unable to open shared memory region '{name}' (key {key!r}): {error.strerror}") from None
        try:
            size = os.fstat(descriptor).st_size
            if offset + byte_size > size or byte_size == 0:
                raise SharedMemoryError(f"shared memory region '{name}': {byte_size} bytes at offset {offset} do not fit "
                                        f"in the {size}-byte object {key!r}")
            mapping = mmap.mmap(descriptor, size)
        finally:
            os.close(descriptor)  # the mapping keeps the object alive
        self._regions[name] = Region(name, key, offset, byte_size, mapping)

    def holds(self, name: str) -> bool:
        return name in self._regions

    def unregister(self, name: str) -> None:
        """Forget a region (unknown names are not an error, as in Triton). A request still reading
        it keeps the mapping alive until it is done."""
        region = self._regions.pop(name, None)
        if region is not None:
            _close(region.mapping)

    def unregister_all(self) -> None:
        for name in list(self._regions):
            self.unregister(name)

    def status(self, name: str = "") -> list[dict]:
        if not name:
            return [region.status() for region in self._regions.values()]
        return [self._region(name).status()]

    def _region(self, name: str) -> Region:
        try:
            return self._regions[name]
        except KeyError:
            raise SharedMemoryError(f"unable to find system shared memory region: '{name}'") from None

    def _span(self, reference: SharedMemoryReference, tensor: str) -> tuple[Region, int]:
        region = self._region(reference.region)
        if reference.offset + reference.byte_size > region.byte_size:
            raise SharedMemoryError(f"'{tensor}': {reference.byte_size} bytes at offset {reference.offset} run past the "
                                    f"end of shared memory region '{region.name}' ({region.byte_size} bytes)")
        return region, region.offset + reference.offset

    def input_array(self, reference: SharedMemoryReference, tensor: str, dtype: np.dtype,
                    shape: tuple[int, ...]) -> np.ndarray:
        """The input as a view of the region (no copy); its size must be what its shape needs."""
        region, start = self._span(reference, tensor)
        expected = math.prod(shape) * dtype.itemsize
        if reference.byte_size != expected:
            raise SharedMemoryError(f"input '{tensor}': shared_memory_byte_size {reference.byte_size} for shape "
                                    f"{list(shape)}, expected {expected}")
        return np.frombuffer(region.mapping, dtype, expected // dtype.itemsize, start).reshape(shape)

    def write_output(self, reference: SharedMemoryReference, tensor: str, array: np.ndarray) -> int:
        """Copy an output into its region; returns the bytes written."""
        region, start = self._span(reference, tensor)
        if array.nbytes > reference.byte_size:
            raise SharedMemoryError(f"shared memory size specified with the request for output '{tensor}' "
                                    f"({reference.byte_size} bytes) should be at least {array.nbytes} bytes to hold the results")
        target = np.frombuffer(region.mapping, array.dtype, array.size, start).reshape(array.shape)
        np.copyto(target, array)
        return array.nbytes

    def close(self) -> None:
        self.unregister_all()


def _close(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:  # a request's array still views it: the mapping goes when that array does
        pass


class SharedMemoryRegions:
    """The system and the CUDA shared memory regions: one namespace of region names (registering a
    name either kind holds is refused), and a request's tensors read from and written to the region
    of whichever kind holds its name."""

    def __init__(self, system: SystemSharedMemory | None = None, cuda: CudaSharedMemory | None = None) -> None:
        self.system = system or SystemSharedMemory()
        self.cuda = cuda or CudaSharedMemory()

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_free(name)
        self.system.register(name, key, offset, byte_size)

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self._check_free(name)
        self.cuda.register(name, raw_handle, device_id, byte_size)

    def input_array(self, reference: SharedMemoryReference, tensor: str, dtype: np.dtype,
                    shape: tuple[int, ...]) -> np.ndarray:
        return self._holder(reference.region).input_array(reference, tensor, dtype, shape)

    def write_output(self, reference: SharedMemoryReference, tensor: str, array: np.ndarray) -> int:
        return self._holder(reference.region).write_output(reference, tensor, array)

    def close(self) -> None:
        self.system.close()
        self.cuda.close()

    def _check_free(self, name: str) -> None:
        if self.system.holds(name) or self.cuda.holds(name):
            raise SharedMemoryError(f"shared memory region '{name}' is already registered")

    def _holder(self, name: str) -> SystemSharedMemory | CudaSharedMemory:
        if self.system.holds(name):
            return self.system
        if self.cuda.holds(name):
            return self.cuda
        raise SharedMemoryError(f"unable to find shared memory region: '{name}'")
