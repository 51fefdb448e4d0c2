"""Pure batching decisions and the tensor plumbing around them.

`plan_batch` decides, from the queue's head, which requests form the next batch and whether to
send it now or wait; it follows Triton's dynamic batcher:

- requests join a batch in arrival order while the batch stays within `max_batch_size` and their
  non-batch dimensions agree with the first request's (a request that does not fit ends the batch);
- when a prefix of them adds up to a preferred size, the largest such prefix is sent at once
  ("If a batch of one of these sizes can be formed it will be executed immediately", Triton's
  model_config.proto);
- otherwise everything that fits is sent at once when it reaches the target size (the largest
  preferred size, else `max_batch_size`) or when the next queued request cannot join it, and else
  when the oldest request has waited `max_queue_delay_us`.

With batching off each request is its own batch. The batcher only asks for a batch when an
execution instance is free, so requests pile up while all instances are busy: that is what forms
large batches under load even with a queue delay of 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from plansmith_runtime.config import BatchingPolicy


@dataclass(frozen=True)
class QueuedShape:
    """What the planner needs to know about a queued request."""

    batch: int  # dim 0 of its inputs (1 for models without a batch dimension)
    signature: tuple  # the non-batch dimensions of every input; requests batch only when these agree


@dataclass(frozen=True)
class BatchDecision:
    take: int  # how many requests from the head of the queue form the batch now; 0 means wait
    wait_us: float | None = None  # when take == 0: how long to wait at most before deciding again


def plan_batch(queue: Sequence[QueuedShape], oldest_wait_us: float, policy: BatchingPolicy) -> BatchDecision:
    if not queue:
        return BatchDecision(0, None)
    if not policy.batching:
        return BatchDecision(1)
    first = queue[0]
    total = 0
    count = 0
    prefix_sizes: list[int] = []  # batch size after taking 1, 2, ... requests
    blocked = False  # the next request cannot join (too big or another shape)
    for item in queue:
        if item.signature != first.signature or total + item.batch > policy.max_batch_size:
            blocked = True
            break
        total += item.batch
        count += 1
        prefix_sizes.append(total)
    if count == 0:  # a single request larger than max_batch_size is rejected before queueing
        return BatchDecision(1)
    preferred = _preferred_prefix(prefix_sizes, policy)
    if preferred:
        return BatchDecision(preferred)
    if blocked or total >= policy.target_batch_size or oldest_wait_us >= policy.max_queue_delay_us:
        return BatchDecision(count)
    return BatchDecision(0, policy.max_queue_delay_us - oldest_wait_us)


def _preferred_prefix(prefix_sizes: list[int], policy: BatchingPolicy) -> int:
    """The number of requests whose total is the largest preferred size reachable, 0 if none is."""
    if not policy.preferred_batch_sizes:
        return 0
    preferred = set(policy.preferred_batch_sizes)
    for index in range(len(prefix_sizes) - 1, -1, -1):
        if prefix_sizes[index] in preferred:
            return index + 1
    return 0


def signature_of(arrays: dict[str, np.ndarray], has_batch_dim: bool) -> tuple:
    if not has_batch_dim:
        return tuple(sorted((name, array.shape) for name, array in arrays.items()))
    return tuple(sorted((name, array.shape[1:]) for name, array in arrays.items()))


def concatenate(requests: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One feed dict from several requests, along dim 0 (no copy for a single request)."""
    if len(requests) == 1:
        return requests[0]
    return {name: join_rows([r[name] for r in requests]) for name in requests[0]}


def join_rows(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Arrays joined along dim 0 (no copy for a single one)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def join_rows_into(buffer: np.ndarray, parts: Sequence[np.ndarray]) -> np.ndarray | None:
    """Arrays joined along dim 0 at the start of `buffer` (its bytes; a single one is copied too),
    or None where they do not fit."""
    rows = sum(part.shape[0] for part in parts)
    if rows * row_bytes(parts[0]) > buffer.nbytes:
        return None
    return np.concatenate(parts, axis=0, out=rows_view(buffer, parts[0], rows))


def rows_view(buffer: np.ndarray, like: np.ndarray, rows: int) -> np.ndarray:
    """The first `rows` rows of a batch of `like`'s row shape and dtype, laid out from the start of
    `buffer`'s bytes."""
    return buffer.view(np.uint8)[:rows * row_bytes(like)].view(like.dtype).reshape(rows, *like.shape[1:])


def row_bytes(array: np.ndarray) -> int:
    """Bytes of one row (dim 0 item) of `array`, or of anything else with its dtype and shape (a
    DeviceTensor, a WrittenOnDevice)."""
    return array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))


def split(outputs: dict[str, np.ndarray], sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Cut batched outputs back into per-request outputs, in order (views, no copies)."""
    if len(sizes) == 1:
        return [outputs]
    results: list[dict[str, np.ndarray]] = [{} for _ in sizes]
    for name, array in outputs.items():
        start = 0
        for index, size in enumerate(sizes):
            results[index][name] = array[start:start + size]
            start += size
    return results
