"""The dynamic batcher's waiting: the deadline waker, and requests that wait out the queue delay
together (the batching decisions themselves are pure: test_batching.py)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from plansmith_runtime.batching import signature_of
from plansmith_runtime.config import BatchingPolicy
from plansmith_runtime.metrics import Metrics
from plansmith_runtime.scheduler import DeadlineWaker, DynamicBatcher

pytestmark = pytest.mark.asyncio(loop_scope="session")


class DoublingExecutor:
    """Executor interface over a numpy function; records the batch sizes it was given."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    def run(self, feeds):
        self.batch_sizes.append(len(feeds["x"]))
        return {"y": feeds["x"] * 2}

    def close(self) -> None:
        pass


async def test_deadline_waker_sets_the_event_at_the_latest_deadline_asked():
    event = asyncio.Event()
    waker = DeadlineWaker(asyncio.get_running_loop(), event)
    try:
        start = time.monotonic()
        waker.wake_at(start + 30)
        waker.wake_at(start + 0.05)  # a new deadline replaces the one before
        await asyncio.wait_for(event.wait(), 5)
        assert time.monotonic() - start >= 0.05
    finally:
        waker.stop()
    waker._thread.join(2)
    assert not waker._thread.is_alive()


async def test_requests_arriving_within_the_delay_run_as_one_batch_after_it():
    executor = DoublingExecutor()
    delay_us = 50_000
    batcher = DynamicBatcher(BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=delay_us),
                             [executor], Metrics("m"), queue_limit=16)
    batcher.start()
    inputs = [{"x": np.full((1, 2), index, np.float32)} for index in range(3)]
    start = time.monotonic()
    done = await asyncio.wait_for(asyncio.gather(*(batcher.submit(feeds, 1, signature_of(feeds, True))
                                                   for feeds in inputs)), 5)
    assert time.monotonic() - start >= delay_us / 1e6  # the partial batch waited out the delay
    assert executor.batch_sizes == [3]
    for index, pending in enumerate(done):
        np.testing.assert_array_equal(pending.future.result()["y"], np.full((1, 2), 2 * index, np.float32))
    await batcher.close(1.0)
