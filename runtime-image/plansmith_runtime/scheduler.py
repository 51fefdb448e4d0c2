"""The dynamic batcher: a bounded queue in the event loop, `instances` executors, and one dispatch
loop that forms the next batch (plan_batch) whenever an executor is free. Executors run in a
thread pool (ONNX Runtime and TensorRT release the GIL while they compute)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from plansmith_runtime import tracing
from plansmith_runtime.batching import plan_batch, split
from plansmith_runtime.config import BatchingPolicy
from plansmith_runtime.executors import Executor
from plansmith_runtime.executors.device_memory import (DeviceDestination, OutputDestinations, batch_destinations,
                                                       outputs_in_place)
from plansmith_runtime.metrics import Metrics
from plansmith_runtime.tracing import Trace

log = logging.getLogger(__name__)

# A batch whose measured compute is shorter than this runs in the event loop thread: handing it to
# an executor thread and back costs more (~150-200 us of thread wake-ups measured on 2 shared
# cores) than the computation, which releases the GIL but blocks the loop only this long.
INLINE_MAX_US = 150


class DeadlineWaker:
    """Sets an asyncio.Event at a deadline with sub-millisecond precision, without spinning.

    The event loop's own timers have millisecond resolution (epoll_wait and libuv take
    milliseconds), ten times the usual queue delay of 100 us. Spinning the loop instead burns the
    CPU the requests the batcher waits for need to arrive (measured when gRPC ran on grpc.aio,
    whose poller thread needed the GIL: batches of 1.0 over gRPC with a 100 us delay against 2.6
    with none). A thread sleeping on a condition variable (a futex with a nanosecond timeout)
    wakes the loop through call_soon_threadsafe instead, and the loop sleeps in epoll meanwhile.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self._loop, self._event = loop, event
        self._condition = threading.Condition()
        self._deadline: float | None = None  # time.monotonic() seconds
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="batcher-waker", daemon=True)
        self._thread.start()

    def wake_at(self, deadline: float) -> None:
        with self._condition:
            self._deadline = deadline
            self._condition.notify()

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify()

    def _run(self) -> None:
        with self._condition:
            while not self._stopped:
                if self._deadline is None:
                    self._condition.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._condition.wait(remaining)
                    continue
                self._deadline = None
                try:
                    self._loop.call_soon_threadsafe(self._event.set)
                except RuntimeError:  # the loop is closed: nothing left to wake
                    return


class WakeLateness:
    """How late the batcher resumes after a waker deadline (thread wake-up, then the hop into the
    event loop: 100-200 us on a shared 2-core machine), as a moving average. The batcher asks to be
    woken that much early, so that the configured queue delay is what requests wait, not the delay
    plus the wake-up."""

    WEIGHT = 0.2  # of each new sample
    LIMIT_US = 5000.0  # a stall of the whole process is not a wake-up cost to plan for

    def __init__(self) -> None:
        self.us = 0.0

    def observe(self, late_us: float) -> None:
        self.us += self.WEIGHT * (min(max(late_us, 0.0), self.LIMIT_US) - self.us)


class QueueFull(Exception):
    """The batcher's queue is at maxQueueSize: HTTP 503 / gRPC UNAVAILABLE."""


class RequestTimedOut(Exception):
    """The request waited in the queue longer than its timeout."""


class ShuttingDown(Exception):
    """The server stopped accepting requests."""


class ExecutionFailed(Exception):
    """The executor raised while running the batch holding this request."""


@dataclass
class Pending:
    inputs: dict[str, np.ndarray]
    batch: int
    signature: tuple
    future: asyncio.Future
    enqueued_ns: int
    deadline_ns: int | None = None
    queue_us: float = field(default=0.0)
    trace: Trace | None = None  # a sampled request's: stamped QUEUE_START and COMPUTE_*
    # outputs the request asked for in CUDA regions on the model's device, written there by the executor
    output_destinations: dict[str, DeviceDestination] | None = None


def form_and_run(executor: Executor, inputs: list[dict[str, np.ndarray]],
                 destinations: OutputDestinations | None = None) -> tuple[int, dict[str, np.ndarray]]:
    """Join the requests' inputs into one batch and run it: when the batch was formed, and its
    outputs. Joining copies every request's tensors (19 MB for 32 224x224 images), and numpy makes
    that copy without holding the GIL, so on an executor thread it leaves the event loop free to
    receive the next requests: serving large inputs, the loop thread is the bound."""
    feeds = executor.form_batch(inputs)
    return time.monotonic_ns(), executor.run(feeds, destinations)


def stamp_compute(trace: Trace, start: int, formed: int, ran: int, split_done: int) -> None:
    """A traced request's share of its batch's run: the batch's start, inputs joined, outputs
    computed, outputs split back (Triton's COMPUTE_START ... COMPUTE_END)."""
    trace.stamp(tracing.COMPUTE_START, start)
    trace.stamp(tracing.COMPUTE_INPUT_END, formed)
    trace.stamp(tracing.COMPUTE_OUTPUT_START, ran)
    trace.stamp(tracing.COMPUTE_END, split_done)


class DynamicBatcher:
    def __init__(self, policy: BatchingPolicy, executors: Sequence[Executor], metrics: Metrics,
                 queue_limit: int, inline_max_items: int = 0, waker: type[DeadlineWaker] = DeadlineWaker) -> None:
        self.policy = policy
        self.inline_max_items = inline_max_items  # batches up to this many items run in the loop thread
        self.metrics = metrics
        self.queue_limit = queue_limit
        self._queue: deque[Pending] = deque()
        self._queued_with_timeout = 0  # so that a queue without timeouts is never scanned for them
        self._executors = list(executors)
        self._pool = ThreadPoolExecutor(max_workers=len(self._executors), thread_name_prefix="instance")
        self._idle: asyncio.Queue[Executor] = asyncio.Queue()
        for executor in self._executors:
            self._idle.put_nowait(executor)
        self._arrived = asyncio.Event()  # set by a new request, or by the waker at a batching deadline
        self._waker_type = waker
        self._waker: DeadlineWaker | None = None
        self.lateness = WakeLateness()
        self._running: dict[asyncio.Task, list[Pending]] = {}  # batches being executed
        self._expiry_timer: asyncio.TimerHandle | None = None  # at the first queued request's timeout
        self._expiry_at_ns = 0
        self._closing = False
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._waker = self._waker_type(loop, self._arrived)
        self._loop_task = loop.create_task(self._dispatch_loop(), name="batcher")

    @property
    def depth(self) -> int:
        return len(self._queue)

    def enqueue(self, inputs: dict[str, np.ndarray], batch: int, signature: tuple, timeout_us: int = 0,
                trace: Trace | None = None, output_destinations: dict[str, DeviceDestination] | None = None) -> Pending:
        """Queue a request; its outputs, or the error that failed it, come on the Pending's future.
        `output_destinations`: where it wants outputs on the device (its CUDA regions); an output
        written there comes back as a DeviceTensor over the region."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        now = time.monotonic_ns()
        if len(self._queue) >= self.queue_limit:
            self._expire(now)  # requests past their timeout hold no place in the queue
            if len(self._queue) >= self.queue_limit:
                self.metrics.rejected.inc()
                raise QueueFull(f"exceeds maximum queue size {self.queue_limit}")
        timeout_us = timeout_us or self.policy.timeout_us
        pending = Pending(inputs, batch, signature, asyncio.get_running_loop().create_future(), now,
                          now + timeout_us * 1000 if timeout_us else None, trace=trace,
                          output_destinations=output_destinations)
        if trace is not None:
            trace.stamp(tracing.QUEUE_START, now)
        self._queue.append(pending)
        if pending.deadline_ns is not None:
            self._queued_with_timeout += 1
            if self._expiry_timer is None or pending.deadline_ns < self._expiry_at_ns:
                self._arm_expiry(pending.deadline_ns)
        self.metrics.set_queue_depth(len(self._queue))
        self._arrived.set()
        return pending

    async def _dispatch_loop(self) -> None:
        while True:
            executor = await self._idle.get()
            batch = await self._next_batch()
            if batch is None:
                self._idle.put_nowait(executor)
                return
            task = asyncio.get_running_loop().create_task(self._execute(executor, batch))
            self._running[task] = batch
            task.add_done_callback(self._forget_batch)

    def _forget_batch(self, task: asyncio.Task) -> None:
        self._running.pop(task, None)

    def _expire(self, now: int) -> None:
        """Reject the queued requests whose timeout has passed (503 / DEADLINE_EXCEEDED)."""
        if not self._queued_with_timeout:
            return
        kept: deque[Pending] = deque()
        for pending in self._queue:
            if pending.deadline_ns is not None and now >= pending.deadline_ns:
                if not pending.future.done():
                    pending.future.set_exception(RequestTimedOut("request timeout expired while queued"))
            else:
                kept.append(pending)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._queued_with_timeout = sum(1 for p in kept if p.deadline_ns is not None)
            self.metrics.set_queue_depth(len(kept))

    def _arm_expiry(self, deadline_ns: int) -> None:
        """Expire queued requests at `deadline_ns` even while every instance is busy (the dispatch
        loop, which expires them as it forms a batch, waits for a free instance first). The event
        loop's timer is good to a millisecond; a batch formed in between expires them exactly."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._expiry_at_ns = deadline_ns
        delay = max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9)
        self._expiry_timer = asyncio.get_running_loop().call_later(delay, self._expire_on_timer)

    def _expire_on_timer(self) -> None:
        self._expiry_timer = None
        self._expire(time.monotonic_ns())
        if self._queued_with_timeout:
            self._arm_expiry(min(p.deadline_ns for p in self._queue if p.deadline_ns is not None))

    async def _next_batch(self) -> list[Pending] | None:
        while True:
            now = time.monotonic_ns()
            self._expire(now)
            if not self._queue:
                if self._closing:
                    return None
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # While shutting down nothing new arrives: send what is queued without waiting out the delay.
            # A remaining wait under half a wake-up is closer to the delay sent now than waited out.
            waited_us = float("inf") if self._closing else (now - self._queue[0].enqueued_ns) / 1000
            decision = plan_batch(self._queue, waited_us + self.lateness.us / 2, self.policy)
            if decision.take:
                batch = [self._queue.popleft() for _ in range(decision.take)]
                if self._queued_with_timeout:
                    self._queued_with_timeout -= sum(1 for p in batch if p.deadline_ns is not None)
                self.metrics.set_queue_depth(len(self._queue))
                # a request whose caller gave up (its call cancelled: the client reset the stream or
                # went away) is not computed
                batch = [pending for pending in batch if not pending.future.done()]
                if batch:
                    return batch
                continue
            # the decision counted half a wake-up as waited; asking the other half early too makes
            # a usual wake-up land on the deadline
            wait_us = max(0.0, (decision.wait_us or 0) - self.lateness.us / 2)
            if self._queued_with_timeout:  # wake up in time to reject a request whose timeout comes first
                first_timeout = min(p.deadline_ns for p in self._queue if p.deadline_ns is not None)
                wait_us = min(wait_us, max(0.0, (first_timeout - now) / 1000))
            self._arrived.clear()
            assert self._waker is not None
            wake_ns = now + int(wait_us * 1000)
            self._waker.wake_at(wake_ns / 1e9)  # time.monotonic_ns and time.monotonic share a clock
            await self._arrived.wait()
            resumed = time.monotonic_ns()
            if resumed >= wake_ns:  # woken by the deadline, not by a request arriving before it
                self.lateness.observe((resumed - wake_ns) / 1000)

    async def _execute(self, executor: Executor, batch: list[Pending]) -> None:
        start = time.monotonic_ns()
        items = sum(p.batch for p in batch)
        try:
            inputs = [p.inputs for p in batch]
            destinations = batch_destinations([p.batch for p in batch], [p.output_destinations for p in batch],
                                              batch_dim=self.policy.max_batch_size > 0)
            if items <= self.inline_max_items:
                formed, outputs = form_and_run(executor, inputs, destinations)
            else:  # the batch is formed in the executor thread too: see form_and_run
                formed, outputs = await asyncio.get_running_loop().run_in_executor(self._pool, form_and_run, executor,
                                                                                   inputs, destinations)
            ran = time.monotonic_ns()
            parts = split(outputs, [p.batch for p in batch])
        except Exception as error:  # any backend failure fails this batch's requests, not the server
            log.exception("batch execution failed")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(ExecutionFailed(str(error)))
            return
        finally:
            self._idle.put_nowait(executor)
        answered = 0
        split_done = time.monotonic_ns()
        for pending, part in zip(batch, parts):
            pending.queue_us = (start - pending.enqueued_ns) / 1000
            if pending.trace is not None:
                stamp_compute(pending.trace, start, formed, ran, split_done)
            if not pending.future.done():
                pending.future.set_result(part if destinations is None else outputs_in_place(part, pending.output_destinations))
                answered += 1
        self.metrics.record_execution(items, answered, (formed - start) / 1000,
                                      (ran - formed) / 1000, (split_done - ran) / 1000)
        if log.isEnabledFor(logging.DEBUG):  # Triton's verbose log (log_verbose_level 1 and up)
            log.debug("batch executed", extra={"requests": len(batch), "items": items, "answered": answered,
                                               "queued_us": round((start - batch[0].enqueued_ns) / 1000),
                                               "compute_us": round((ran - formed) / 1000)})

    async def close(self, grace_seconds: float) -> bool:
        """Stop taking requests, finish the queued and running ones within the grace period. Past it,
        every request not answered yet fails with ShuttingDown, queued or running. Returns whether
        every batch finished: if not, an executor thread may still be running one."""
        self._closing = True
        self._arrived.set()
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + grace_seconds
        if self._loop_task:  # it ends once the queue is empty (asyncio.wait cancels nothing)
            await asyncio.wait([self._loop_task], timeout=grace_seconds)
        if self._running:
            await asyncio.wait(list(self._running), timeout=max(0.0, ends_at - loop.time()))
        running = [batch for task, batch in self._running.items() if not task.done()]
        if self._queue or running:
            log.warning("grace period over with requests still queued or running",
                        extra={"queued": len(self._queue), "running_batches": len(running)})
            stopped = ShuttingDown("the server shut down before this request was answered")
            for pending in [*self._queue, *(pending for batch in running for pending in batch)]:
                if not pending.future.done():
                    pending.future.set_exception(stopped)
            self._queue.clear()
            self.metrics.set_queue_depth(0)
        if self._loop_task and not self._loop_task.done():
            self._loop_task.cancel()  # waiting for an instance that is still busy
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._pool.shutdown(wait=False)
        if self._waker is not None:
            self._waker.stop()
        return not running
