"""Pinned (page-locked) host memory for the batches a GPU executor runs, budgeted as Triton budgets it
(`--pinned-memory-pool-byte-size`, 256 MB by default; 0 turns it off).

Why: before a run, ONNX Runtime copies a CPU input to the GPU. From ordinary (pageable) memory the
CUDA driver copies it in chunks through a staging buffer of its own; from pinned memory the GPU reads
it directly. Measured on an H200 with a ResNet-50 batch of 32 224x224 images (19 MB): the run took
7.3 ms from a freshly joined pageable batch and 4.9 ms from a pinned one, and joining the batch into a
buffer kept from batch to batch also saved the page faults of a new 19 MB array (docs/benchmarks.md).
ONNX Runtime's Python API cannot allocate pinned memory for its built-in CUDA provider (1.31: only
plugin execution providers offer HOST_ACCESSIBLE memory), so the buffers come from cudaHostAlloc
through cuda-python, and ONNX Runtime gets plain numpy views of them: the driver knows the pages are
pinned whoever passes them.

Where pinned memory cannot be had (no cuda-python, the budget spent, a CUDA error), batches are
joined in ordinary memory as before, with one warning: serving goes on, only slower.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from plansmith_runtime.batching import join_rows, join_rows_into, row_bytes, rows_view
from plansmith_runtime.executors import ExecutorError
from plansmith_runtime.executors.cuda import check_cuda, cuda_runtime, host_array

log = logging.getLogger(__name__)

# Triton's default for --pinned-memory-pool-byte-size.
DEFAULT_POOL_BYTES = 256 << 20


class PinnedMemoryUnavailable(Exception):
    """The pool cannot give this buffer: the reason says why (budget, cuda-python, CUDA)."""


class HostAllocator(Protocol):
    def allocate(self, nbytes: int) -> int:
        """The address of `nbytes` of pinned host memory."""
        ...

    def free(self, pointer: int) -> None: ...


class CudaHostAllocator:
    """cudaHostAlloc / cudaFreeHost. Portable: the pages count as pinned in every CUDA context of the
    process, ONNX Runtime's included."""

    def __init__(self) -> None:
        self._cudart = cuda_runtime()

    def allocate(self, nbytes: int) -> int:
        return int(check_cuda(self._cudart.cudaHostAlloc(nbytes, self._cudart.cudaHostAllocPortable)))

    def free(self, pointer: int) -> None:
        check_cuda(self._cudart.cudaFreeHost(pointer))


class PinnedMemoryPool:
    """Pinned host buffers up to `byte_size` bytes in all, shared by a server's execution instances
    (which allocate from their own threads)."""

    def __init__(self, byte_size: int, allocator_factory: Callable[[], HostAllocator] = CudaHostAllocator) -> None:
        self.byte_size = byte_size
        self.used_bytes = 0
        self._allocator_factory = allocator_factory
        self._allocator: HostAllocator | None = None
        self._unavailable = ""  # why no pinned memory can be had in this process, once found
        self._owned: dict[int, int] = {}  # address -> bytes
        self._lock = threading.Lock()

    def allocate(self, nbytes: int) -> np.ndarray:
        """A uint8 array of `nbytes` pinned bytes, until `release`d (or the pool is closed)."""
        with self._lock:
            if self._unavailable:
                raise PinnedMemoryUnavailable(self._unavailable)
            if self.used_bytes + nbytes > self.byte_size:
                raise PinnedMemoryUnavailable(
                    f"the pinned memory pool ({self.byte_size} bytes, {self.used_bytes} in use) has no room for "
                    f"{nbytes} bytes more (--pinned-memory-pool-byte-size)")
            try:
                if self._allocator is None:
                    self._allocator = self._allocator_factory()
                pointer = self._allocator.allocate(nbytes)
            except ExecutorError as error:  # no cuda-python, no GPU, no driver: none will come later
                self._unavailable = f"pinned memory is unavailable: {error}"
                raise PinnedMemoryUnavailable(self._unavailable) from None
            self._owned[pointer] = nbytes
            self.used_bytes += nbytes
        return host_array(pointer, nbytes)

    def release(self, buffer: np.ndarray) -> None:
        """Free a buffer `allocate` gave; no view of it may be used afterwards."""
        with self._lock:
            pointer = buffer.ctypes.data
            self.used_bytes -= self._owned.pop(pointer)
            assert self._allocator is not None
            self._allocator.free(pointer)

    def close(self) -> None:
        """Free every buffer still allocated (the executors using them are closed)."""
        with self._lock:
            for pointer in self._owned:
                assert self._allocator is not None
                self._allocator.free(pointer)
            self._owned.clear()
            self.used_bytes = 0


class BatchStaging:
    """Where one executor joins a batch's requests: a pinned buffer per input, with room for
    `max_rows` rows (the largest batch the executor runs), kept from batch to batch. An executor runs
    one batch at a time, so its buffers are free again when the next batch is joined."""

    def __init__(self, pool: PinnedMemoryPool, max_rows: int) -> None:
        self.pool = pool
        self.max_rows = max_rows
        self._buffers: dict[str, np.ndarray] = {}
        self._refused: set[str] = set()  # inputs whose refusal was logged

    def join(self, requests: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The requests' inputs joined along dimension 0: in the pinned buffers, or in ordinary
        memory for an input that has none. A lone request is left where it is: copying it into
        pinned memory would add a copy (the driver's own copy from pageable memory overlaps the
        transfer), where joining several copies them once anyway. Its buffers are still allocated,
        so that warmup allocates them, not the first batch."""
        feeds: dict[str, np.ndarray] = {}
        for name, first in requests[0].items():
            parts = [request[name] for request in requests]
            buffer = self._buffer(name, first, sum(part.shape[0] for part in parts))
            joined = join_rows_into(buffer, parts) if buffer is not None and len(parts) > 1 else None
            feeds[name] = joined if joined is not None else join_rows(parts)
        return feeds

    def pad(self, feeds: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray] | None:
        """Feeds `join` placed in the pinned buffers, extended to `rows` rows with zero rows in place
        (no copy); None when any feed was not joined here or does not fit."""
        padded: dict[str, np.ndarray] = {}
        for name, feed in feeds.items():
            buffer = self._buffers.get(name)
            if buffer is None or feed.ctypes.data != buffer.ctypes.data or rows * row_bytes(feed) > buffer.nbytes:
                return None
            view = rows_view(buffer, feed, rows)
            view[feed.shape[0]:] = 0
            padded[name] = view
        return padded

    def _buffer(self, name: str, like: np.ndarray, rows: int) -> np.ndarray | None:
        """The input's buffer, allocated (or grown for larger rows) on first need; None when the pool
        refuses it."""
        needed = max(rows, self.max_rows) * row_bytes(like)
        buffer = self._buffers.get(name)
        if buffer is not None and buffer.nbytes >= needed:
            return buffer
        if buffer is not None:
            self.pool.release(self._buffers.pop(name))
        try:
            buffer = self._buffers[name] = self.pool.allocate(needed)
        except PinnedMemoryUnavailable as refusal:
            if name not in self._refused:
                self._refused.add(name)
                log.warning("batches of input '%s' are joined in pageable memory: %s", name, refusal)
            return None
        return buffer

    def close(self) -> None:
        for buffer in self._buffers.values():
            self.pool.release(buffer)
        self._buffers.clear()
