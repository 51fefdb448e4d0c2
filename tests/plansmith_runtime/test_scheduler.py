"""The dynamic batcher's waiting: the deadline waker, and requests that wait out the queue delay
together (the batching decisions themselves are pure: test_batching.py)."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import numpy as np
import pytest

from plansmith_runtime.batching import concatenate, signature_of
from plansmith_runtime.config import BatchingPolicy
from plansmith_runtime.metrics import Metrics
from plansmith_runtime.scheduler import DeadlineWaker, DynamicBatcher, Pending, RequestTimedOut, WakeLateness

on_session_loop = pytest.mark.asyncio(loop_scope="session")


class DoublingExecutor:
    """Executor interface over a numpy function; records the batch sizes it was given."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.formed_on: list[str] = []  # the thread that formed each batch

    def form_batch(self, requests):
        self.formed_on.append(threading.current_thread().name)
        return concatenate(requests)

    def run(self, feeds, destinations=None):
        self.batch_sizes.append(len(feeds["x"]))
        return {"y": feeds["x"] * 2}

    def close(self) -> None:
        pass


def started_batcher(delay_us: int, queue_limit: int = 16) -> tuple[DoublingExecutor, DynamicBatcher]:
    """A running batcher (max batch 8, the given queue delay) over one DoublingExecutor."""
    executor = DoublingExecutor()
    batcher = DynamicBatcher(BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=delay_us),
                             [executor], Metrics("m"), queue_limit=queue_limit)
    batcher.start()
    return executor, batcher


async def submit(batcher: DynamicBatcher, feeds: dict[str, np.ndarray], timeout_us: int = 0) -> Pending:
    """Queue a one-row request, as ServedModel.infer does, and wait for its outputs."""
    pending = batcher.enqueue(feeds, 1, signature_of(feeds, True), timeout_us)
    await pending.future
    return pending


def one_row_feeds(count: int) -> list[dict[str, np.ndarray]]:
    """`count` single-row requests whose values are their index."""
    return [{"x": np.full((1, 2), index, np.float32)} for index in range(count)]


@on_session_loop
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


@on_session_loop
async def test_requests_arriving_within_the_delay_run_as_one_batch_after_it():
    delay_us = 50_000
    executor, batcher = started_batcher(delay_us)
    inputs = one_row_feeds(3)
    start = time.monotonic()
    done = await asyncio.wait_for(asyncio.gather(*(submit(batcher, feeds) for feeds in inputs)), 5)
    assert time.monotonic() - start >= delay_us / 1e6  # the partial batch waited out the delay
    assert executor.batch_sizes == [3]
    for index, pending in enumerate(done):
        np.testing.assert_array_equal(pending.future.result()["y"], np.full((1, 2), 2 * index, np.float32))
    await batcher.close(1.0)


@on_session_loop
async def test_a_request_cancelled_while_queued_is_not_computed():
    executor, batcher = started_batcher(delay_us=50_000)
    inputs = one_row_feeds(3)
    waiting = [asyncio.ensure_future(submit(batcher, feeds)) for feeds in inputs]
    await asyncio.sleep(0)  # all three queued
    waiting[1].cancel()  # the caller gives up within the queue delay
    first, last = await asyncio.wait_for(asyncio.gather(waiting[0], waiting[2]), 5)
    assert executor.batch_sizes == [2]
    np.testing.assert_array_equal(first.future.result()["y"], np.full((1, 2), 0, np.float32))
    np.testing.assert_array_equal(last.future.result()["y"], np.full((1, 2), 4, np.float32))
    await batcher.close(1.0)


def test_wake_lateness_is_a_moving_average_of_plausible_samples():
    lateness = WakeLateness()
    for _ in range(50):
        lateness.observe(150.0)
    assert 149.0 < lateness.us <= 150.0
    lateness.observe(-5.0)  # a clock step back is no negative lateness
    assert lateness.us < 150.0
    for _ in range(50):
        lateness.observe(1e9)  # a process stall is not a wake-up cost to plan for
    assert lateness.us <= WakeLateness.LIMIT_US


class LateWaker(DeadlineWaker):
    """A machine where every wake-up comes 2 ms after the deadline asked for."""

    LATE_SECONDS = 0.002

    def wake_at(self, deadline: float) -> None:
        super().wake_at(deadline + self.LATE_SECONDS)


@on_session_loop
async def test_the_batcher_learns_how_late_it_wakes_up_and_asks_that_much_early():
    executor = DoublingExecutor()
    delay_us = 20_000
    metrics = Metrics("m")
    batcher = DynamicBatcher(BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=delay_us),
                             [executor], metrics, queue_limit=16, waker=LateWaker)
    batcher.start()
    feeds = {"x": np.ones((1, 2), np.float32)}
    waits_us = []
    for _ in range(30):  # lone requests: each waits out the delay
        pending = await asyncio.wait_for(submit(batcher, feeds), 5)
        waits_us.append(pending.queue_us)
    await batcher.close(1.0)
    assert waits_us[0] >= delay_us + 2_000  # nothing learnt yet: the delay plus the late wake-up
    assert 1_500 < batcher.lateness.us < 4_000
    # once learnt, the wake-up lands on the deadline: the delay asked for, within half a wake-up
    assert delay_us - 1_500 <= statistics.median(waits_us[-10:]) < delay_us + 1_000, waits_us
    assert executor.batch_sizes == [1] * 30


@on_session_loop
async def test_a_request_timing_out_in_the_queue_leaves_the_others_to_their_batch():
    executor, batcher = started_batcher(300_000)
    feeds = one_row_feeds(3)
    timed = asyncio.ensure_future(submit(batcher, feeds[0], timeout_us=50_000))
    patient = asyncio.ensure_future(submit(batcher, feeds[1]))
    with pytest.raises(RequestTimedOut):
        await asyncio.wait_for(timed, 5)
    assert not patient.done()  # still waiting out the delay
    done = await asyncio.wait_for(patient, 5)
    np.testing.assert_array_equal(done.future.result()["y"], np.full((1, 2), 2, np.float32))
    # the queue's count of requests with a timeout went back to zero, and counts the next one again
    with pytest.raises(RequestTimedOut):
        await asyncio.wait_for(submit(batcher, feeds[2], timeout_us=50_000), 5)
    assert executor.batch_sizes == [1]
    await batcher.close(1.0)


@on_session_loop
async def test_enqueue_returns_at_once_and_a_full_queue_refuses_at_once():
    from plansmith_runtime.scheduler import QueueFull

    executor, batcher = started_batcher(50_000, queue_limit=2)
    feeds = one_row_feeds(3)
    queued = [batcher.enqueue(f, 1, signature_of(f, True)) for f in feeds[:2]]  # no await: queued, not run yet
    assert not any(pending.future.done() for pending in queued) and batcher.depth == 2
    with pytest.raises(QueueFull, match="maximum queue size 2"):
        batcher.enqueue(feeds[2], 1, signature_of(feeds[2], True))
    await asyncio.wait_for(asyncio.gather(*(pending.future for pending in queued)), 5)
    assert executor.batch_sizes == [2]
    np.testing.assert_array_equal(queued[1].future.result()["y"], np.full((1, 2), 2, np.float32))
    await batcher.close(1.0)


@on_session_loop
async def test_a_batch_for_an_executor_thread_is_formed_there_and_a_small_one_on_the_loop():
    for inline_max_items, thread in ((0, "instance"), (8, threading.current_thread().name)):
        executor = DoublingExecutor()
        batcher = DynamicBatcher(BatchingPolicy(max_batch_size=8, enabled=True, max_queue_delay_us=20_000),
                                 [executor], Metrics("m"), queue_limit=16, inline_max_items=inline_max_items)
        batcher.start()
        done = await asyncio.wait_for(asyncio.gather(*(submit(batcher, feeds) for feeds in one_row_feeds(3))), 5)
        assert executor.batch_sizes == [3] and len(executor.formed_on) == 1 and executor.formed_on[0].startswith(thread)
        assert [pending.future.result()["y"][0, 0] for pending in done] == [0, 2, 4]
        await batcher.close(1.0)


class BlockedExecutor(DoublingExecutor):
    """Runs a batch once `release` is set (or after 10 s)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.started = threading.Event()

    def run(self, feeds, destinations=None):
        self.started.set()
        self.release.wait(10)
        return super().run(feeds, destinations)


async def running_one_batch(queue_limit: int = 16) -> tuple[BlockedExecutor, DynamicBatcher, Metrics, Pending]:
    """A batcher whose only instance is busy with a first request, until its executor is released."""
    executor, metrics = BlockedExecutor(), Metrics("m")
    batcher = DynamicBatcher(BatchingPolicy(max_batch_size=1, enabled=True), [executor], metrics,
                             queue_limit=queue_limit)
    batcher.start()
    feeds = one_row_feeds(1)[0]
    first = batcher.enqueue(feeds, 1, signature_of(feeds, True))
    assert await asyncio.get_running_loop().run_in_executor(None, executor.started.wait, 5)
    return executor, batcher, metrics, first


@on_session_loop
async def test_a_timeout_passing_while_every_instance_is_busy_rejects_the_request_then_and_frees_its_place():
    executor, batcher, metrics, first = await running_one_batch(queue_limit=2)
    feeds = one_row_feeds(3)
    timed = [batcher.enqueue(f, 1, signature_of(f, True), timeout_us=timeout_us)
             for f, timeout_us in zip(feeds, (20_000, 60_000))]
    assert metrics.stats.pending == 2
    started = time.monotonic()
    for pending in timed:
        with pytest.raises(RequestTimedOut):
            await asyncio.wait_for(pending.future, 5)
        assert time.monotonic() - started < 0.5  # not when the busy instance is done (10 s)
        if pending is timed[0]:
            assert batcher.depth == 1 and metrics.stats.pending == 1
    assert batcher.depth == 0 and metrics.stats.pending == 0
    later = batcher.enqueue(feeds[2], 1, signature_of(feeds[2], True))  # the queue has room again
    executor.release.set()
    await asyncio.wait_for(asyncio.gather(first.future, later.future), 5)
    assert executor.batch_sizes == [1, 1]
    assert await batcher.close(1.0)


@on_session_loop
async def test_past_the_grace_period_queued_and_running_requests_fail_and_close_says_a_batch_still_runs():
    from plansmith_runtime.scheduler import ShuttingDown

    executor, batcher, metrics, first = await running_one_batch()
    feeds = one_row_feeds(2)[1]
    queued = batcher.enqueue(feeds, 1, signature_of(feeds, True))
    assert not await batcher.close(0.05)
    for pending in (first, queued):
        with pytest.raises(ShuttingDown):
            pending.future.result()
    assert batcher.depth == 0 and metrics.stats.pending == 0
    executor.release.set()


@on_session_loop
async def test_a_full_queue_first_drops_requests_past_their_timeout():
    executor, batcher, _, first = await running_one_batch(queue_limit=1)
    feeds = one_row_feeds(3)
    expired = batcher.enqueue(feeds[1], 1, signature_of(feeds[1], True), timeout_us=1)
    time.sleep(0.002)  # past its timeout, before the event loop could run its expiry timer
    accepted = batcher.enqueue(feeds[2], 1, signature_of(feeds[2], True))
    with pytest.raises(RequestTimedOut):
        expired.future.result()
    executor.release.set()
    await asyncio.wait_for(asyncio.gather(first.future, accepted.future), 5)
    assert await batcher.close(1.0)
