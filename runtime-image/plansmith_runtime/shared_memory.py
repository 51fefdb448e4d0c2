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

import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from plansmith_runtime.cuda_shared_memory import CudaSharedMemory
from plansmith_runtime.executors.device_memory import DeviceDestination
from plansmith_runtime.protocol import (SharedMemoryError, SharedMemoryReference, SharedMemoryRegionExists,
                                       SharedMemoryRegionNotFound)
from plansmith_runtime.region_registry import RegionRegistry

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
    descriptor: int  # the object, open while registered: its current size is checked before each use

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class SystemSharedMemory(RegionRegistry[Region]):
    """The registered regions by name."""

    kind = "system shared memory"

    def __init__(self, directory: Path = SHM_DIRECTORY) -> None:
        super().__init__()
        self.directory = directory

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_new(name)
        for label, value in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SharedMemoryError(f"shared memory region '{name}': {label} must be a non-negative integer, got {value!r}")
        if not isinstance(key, str) or not key.strip("/") or "/" in key.strip("/"):
            raise SharedMemoryError(f"shared memory region '{name}': key {key!r} is not a shared memory object name")
        path = self.directory / key.strip("/")
        try:
            # not through a symbolic link (shm_open's O_NOFOLLOW): a client sharing /dev/shm must not
            # name a link there to another file the server can write
            descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as error:
            raise SharedMemoryError(f"unable to open shared memory region '{name}' (key {key!r}): {error.strerror}") from None
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                raise SharedMemoryError(f"shared memory region '{name}': key {key!r} is not a shared memory object")
            size = status.st_size
            if offset + byte_size > size or byte_size == 0:
                raise SharedMemoryError(f"shared memory region '{name}': {byte_size} bytes at offset {offset} do not fit "
                                        f"in the {size}-byte object {key!r}")
            mapping = mmap.mmap(descriptor, size)
        except BaseException:
            os.close(descriptor)
            raise
        self._regions[name] = Region(name, key, offset, byte_size, mapping, descriptor)

    def input_array(self, reference: SharedMemoryReference, tensor: str, dtype: np.dtype,
                    shape: tuple[int, ...]) -> np.ndarray:
        """The input as a view of the region (no copy); its size must be what its shape needs."""
        region = self._input_region(reference, tensor, dtype, shape)
        _check_not_shrunk(region, reference)
        return np.frombuffer(region.mapping, dtype, reference.byte_size // dtype.itemsize,
                             region.offset + reference.offset).reshape(shape)

    def write_output(self, reference: SharedMemoryReference, tensor: str, array: np.ndarray) -> int:
        """Copy an output into its region; returns the bytes written."""
        region = self._output_region(reference, tensor, array)
        _check_not_shrunk(region, reference)
        target = np.frombuffer(region.mapping, array.dtype, array.size, region.offset + reference.offset)
        np.copyto(target.reshape(array.shape), array)
        return array.nbytes

    def _release(self, region: Region) -> None:
        """A request still reading the region keeps its mapping alive until it is done."""
        _close(region.mapping)
        os.close(region.descriptor)


def _check_not_shrunk(region: Region, reference: SharedMemoryReference) -> None:
    """Refuse a reference past the end of a region's object, which the client shrank after
    registering it: touching a mapped page past the end of its file kills the process with SIGBUS
    (Triton's server dies so). A client shrinking it between this check and the read can still do
    that; a client that shrank it before sending is answered."""
    end = region.offset + reference.offset + reference.byte_size
    size = os.fstat(region.descriptor).st_size
    if size < end:
        raise SharedMemoryError(f"shared memory region '{region.name}': its object {region.key!r} is now {size} bytes, "
                                f"too small for {reference.byte_size} bytes at offset {reference.offset}; register it again")


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

    def output_destinations(self, references: Mapping[str, SharedMemoryReference | None]) -> dict[str, DeviceDestination]:
        """The outputs the executor may write on the device (those in CUDA regions of the model's
        device), by name. The others are written from the host once the request has run."""
        destinations = {}
        for name, reference in references.items():
            if reference is not None and self.cuda.holds(reference.region):
                destination = self.cuda.output_destination(reference, name)
                if destination is not None:
                    destinations[name] = destination
        return destinations

    def close(self) -> None:
        self.system.close()
        self.cuda.close()

    def _check_free(self, name: str) -> None:
        if self.system.holds(name) or self.cuda.holds(name):
            raise SharedMemoryRegionExists(f"shared memory region '{name}' is already registered")

    def _holder(self, name: str) -> SystemSharedMemory | CudaSharedMemory:
        if self.system.holds(name):
            return self.system
        if self.cuda.holds(name):
            return self.cuda
        raise SharedMemoryRegionNotFound(f"unable to find shared memory region: '{name}'")
