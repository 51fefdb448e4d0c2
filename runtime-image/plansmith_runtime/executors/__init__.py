"""Executors run one batch on one engine; all share this small interface so the batcher does not
care which backend it drives. Each execution instance owns one executor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from plansmith_runtime.loader import LoadedEngine

if TYPE_CHECKING:
    from plansmith_runtime.executors.device_memory import OutputDestinations
    from plansmith_runtime.executors.pinned_memory import PinnedMemoryPool


class Executor(Protocol):
    def form_batch(self, requests: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The requests' inputs joined along dimension 0 into the feeds of one run, in the memory
        this executor runs from best (pinned host memory for a GPU executor that has it)."""
        ...

    def run(self, feeds: dict[str, np.ndarray], destinations: OutputDestinations | None = None) -> dict[str, np.ndarray]:
        """Run one batch; outputs by name, in numpy arrays the caller may keep. With `destinations`
        (the batch's requests' CUDA regions by output), an output that every request wants in a
        region of the executor's device is copied there on the device and is WrittenOnDevice."""
        ...

    def close(self) -> None: ...

    # Batch sizes the executor pads batches up to, each with a fixed shape to warm up; () when it
    # runs every batch size as it is.
    batch_buckets: tuple[int, ...]
    # The CUDA device whose memory the executor takes inputs in (device_memory.DeviceTensor: a
    # client's CUDA shared memory region read in place); None: host arrays only.
    device_inputs: int | None


class ExecutorError(RuntimeError):
    """The engine could not be loaded or failed to run a batch."""


def create_executor(engine: LoadedEngine, *, intra_op_threads: int = 0, max_batch_size: int = 0,
                    pinned_pool: PinnedMemoryPool | None = None) -> Executor:
    """`max_batch_size`: the largest batch the server will run (0: no batch dimension).
    `pinned_pool`: where an executor running its engine on a GPU gets the pinned memory it joins batches in."""
    if engine.manifest.backend == "onnxruntime":
        from plansmith_runtime.executors.onnxruntime import OnnxRuntimeExecutor, session_batch_buckets

        buckets = session_batch_buckets(engine.manifest.target.execution_provider, max_batch_size)
        return OnnxRuntimeExecutor(engine, intra_op_threads=intra_op_threads, buckets=buckets, pinned_pool=pinned_pool)
    if engine.manifest.backend == "tensorrt":
        from plansmith_runtime.executors.tensorrt import TensorRTExecutor

        return TensorRTExecutor(engine)
    raise ExecutorError(f"no executor for backend {engine.manifest.backend}")
