"""Executors run one batch on one engine; all share this small interface so the batcher does not
care which backend it drives. Each execution instance owns one executor."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from plansmith_runtime.loader import LoadedEngine


class Executor(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; outputs by name, in numpy arrays the caller may keep."""
        ...

    def close(self) -> None: ...

    # Batch sizes the executor pads batches up to, each with a fixed shape to warm up; () when it
    # runs every batch size as it is.
    batch_buckets: tuple[int, ...]


class ExecutorError(RuntimeError):
    """The engine could not be loaded or failed to run a batch."""


def create_executor(engine: LoadedEngine, *, intra_op_threads: int = 0, max_batch_size: int = 0) -> Executor:
    """`max_batch_size`: the largest batch the server will run (0: no batch dimension)."""
    if engine.manifest.backend == "onnxruntime":
        from plansmith_runtime.executors.onnxruntime import OnnxRuntimeExecutor, session_batch_buckets

        buckets = session_batch_buckets(engine.manifest.target.execution_provider, max_batch_size)
        return OnnxRuntimeExecutor(engine, intra_op_threads=intra_op_threads, buckets=buckets)
    if engine.manifest.backend == "tensorrt":
        from plansmith_runtime.executors.tensorrt import TensorRTExecutor

        return TensorRTExecutor(engine)
    raise ExecutorError(f"no executor for backend {engine.manifest.backend}")
