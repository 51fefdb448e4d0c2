"""Latency and throughput of a runner: warmup, then timed runs until a time or count budget is spent."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from plansmith.manifest import BenchmarkResult, LatencyFigures
from plansmith.onnxruntime_providers import CPU_PROVIDER, CUDA_PROVIDER
from plansmith_builder.accuracy import Feeds, Runner, random_feeds
from plansmith_builder.modelcheck import ModelSignature


@dataclass(frozen=True)
class BenchmarkBudget:
    warmup: int = 5
    min_iterations: int = 10
    max_iterations: int = 200
    seconds: float = 2.0


def percentiles(latencies_s: list[float], batch: int) -> LatencyFigures:
    """p50/p95/p99 in milliseconds; throughput in items per second over the whole timed run."""
    values = np.asarray(latencies_s, dtype=np.float64)
    p50, p95, p99 = np.percentile(values, [50, 95, 99]) * 1000.0
    return LatencyFigures(batch_size=batch, p50_ms=round(float(p50), 4), p95_ms=round(float(p95), 4),
                          p99_ms=round(float(p99), 4), throughput=round(batch * len(values) / float(values.sum()), 2))


def time_runner(run: Runner, feeds: Feeds, batch: int, budget: BenchmarkBudget,
                clock: Callable[[], float] = time.perf_counter) -> LatencyFigures:
    for _ in range(budget.warmup):
        run(feeds)
    latencies: list[float] = []
    deadline = clock() + budget.seconds
    while len(latencies) < budget.max_iterations and (len(latencies) < budget.min_iterations or clock() < deadline):
        start = clock()
        run(feeds)
        latencies.append(clock() - start)
    return percentiles(latencies, batch)


def batch_feeds(signature: ModelSignature, batch: int | None, seed: int = 7) -> Feeds:
    """One random input batch at `batch` (None: the optimum shape)."""
    shaped = ModelSignature(
        inputs=[t.model_copy(update={"opt_shape": signature.feed_shape(t, batch)}) for t in signature.inputs],
        outputs=signature.outputs, opset=signature.opset, max_batch_size=signature.max_batch_size,
    )
    return random_feeds(shaped, 1, seed)[0]


def benchmark(engine: Runner, reference: Runner | None, signature: ModelSignature,
              budget: BenchmarkBudget) -> BenchmarkResult:
    """Engine (and reference) at batch 1 and at the max batch; fixed-batch models run their one shape."""
    batched = signature.max_batch_size > 0
    small = batch_feeds(signature, 1 if batched else None)
    small_batch = 1 if batched else signature.feed_shape(signature.inputs[0])[0]
    large = batch_feeds(signature, signature.max_batch_size) if batched and signature.max_batch_size > 1 else None
    result = {"batch1": time_runner(engine, small, small_batch, budget)}
    if large is not None:
        result["max_batch"] = time_runner(engine, large, signature.max_batch_size, budget)
    if reference is not None:
        result["reference_batch1"] = time_runner(reference, small, small_batch, budget)
        if large is not None:
            result["reference_max_batch"] = time_runner(reference, large, signature.max_batch_size, budget)
    return BenchmarkResult(**result)


def reference_timing_provider(execution_provider: str | None, available: list[str]) -> str | None:
    """Where the FP32 reference model is timed: on the engine's own device, so the manifest's engine
    and reference figures compare like with like (a GPU engine against the same model in FP32 on that
    GPU, not against a CPU run at the max batch). ONNX Runtime engines name their provider; TensorRT
    engines (no provider) are compared with ONNX Runtime's CUDA provider when it is installed, else
    the reference is not timed. The accuracy gate's reference stays on the CPU: FP32, no TF32."""
    if execution_provider in (CPU_PROVIDER, CUDA_PROVIDER):
        return execution_provider
    return CUDA_PROVIDER if CUDA_PROVIDER in available else None
