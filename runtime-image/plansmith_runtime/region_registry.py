"""What Triton's two shared memory extensions have in common: regions registered by name, read back
in their status, and the checks on a request's reference to one (within the region, the size its
tensor needs). shared_memory (system) and cuda_shared_memory (CUDA) differ in how a region is
opened, read and written."""

from __future__ import annotations

import math
from typing import Generic, Protocol, TypeVar

import numpy as np

from plansmith_runtime.protocol import SharedMemoryError, SharedMemoryReference, SharedMemoryRegionExists, SharedMemoryRegionNotFound


class NamedRegion(Protocol):
    name: str
    byte_size: int

    def status(self) -> dict: ...


R = TypeVar("R", bound=NamedRegion)


class RegionRegistry(Generic[R]):
    """Regions by name. `kind` names them in errors ("system shared memory", "CUDA shared memory")."""

    kind = "shared memory"

    def __init__(self) -> None:
        self._regions: dict[str, R] = {}

    def holds(self, name: str) -> bool:
        return name in self._regions

    def unregister(self, name: str) -> None:
        """Forget a region (unknown names are not an error, as in Triton)."""
        region = self._regions.pop(name, None)
        if region is not None:
            self._release(region)

    def unregister_all(self) -> None:
        for name in list(self._regions):
            self.unregister(name)

    def status(self, name: str = "") -> list[dict]:
        if not name:
            return [region.status() for region in self._regions.values()]
        return [self._region(name).status()]

    def close(self) -> None:
        self.unregister_all()

    def _release(self, region: R) -> None:
        """Give back what registering `region` took (its mapping, its opened handle)."""

    def _check_new(self, name: str) -> None:
        if not name:
            raise SharedMemoryError("a shared memory region needs a name")
        if name in self._regions:
            raise SharedMemoryRegionExists(f"shared memory region '{name}' is already registered")

    def _region(self, name: str) -> R:
        try:
            return self._regions[name]
        except KeyError:
            raise SharedMemoryRegionNotFound(f"unable to find {self.kind} region: '{name}'") from None

    def _input_region(self, reference: SharedMemoryReference, tensor: str, dtype: np.dtype,
                      shape: tuple[int, ...]) -> R:
        """The region an input's reference names, checked: inside it, and the size its shape needs."""
        region = self._span(reference, tensor)
        expected = math.prod(shape) * dtype.itemsize
        if reference.byte_size != expected:
            raise SharedMemoryError(f"input '{tensor}': shared_memory_byte_size {reference.byte_size} for shape "
                                    f"{list(shape)}, expected {expected}")
        return region

    def _output_region(self, reference: SharedMemoryReference, tensor: str, array: np.ndarray) -> R:
        """The region an output's reference names, checked: inside it, and large enough for `array`."""
        region = self._span(reference, tensor)
        if array.nbytes > reference.byte_size:
            raise SharedMemoryError(f"shared memory size specified with the request for output '{tensor}' "
                                    f"({reference.byte_size} bytes) should be at least {array.nbytes} bytes to hold "
                                    "the results")
        return region

    def _span(self, reference: SharedMemoryReference, tensor: str) -> R:
        region = self._region(reference.region)
        if reference.offset + reference.byte_size > region.byte_size:
            raise SharedMemoryError(f"'{tensor}': {reference.byte_size} bytes at offset {reference.offset} run past "
                                    f"the end of {self.kind} region '{region.name}' ({region.byte_size} bytes)")
        return region
