"""Which requests form the next batch, and how batches are cut back into per-request results."""

import numpy as np
import pytest

from plansmith_runtime.batching import QueuedShape, concatenate, join_rows_into, plan_batch, signature_of, split
from plansmith_runtime.config import BatchingPolicy

SIG = (("input", (4,)),)


def queue(*batches, signature=SIG):
    return [QueuedShape(batch, signature) for batch in batches]


def policy(**kwargs):
    return BatchingPolicy(**{"max_batch_size": 8, "enabled": True, "max_queue_delay_us": 100, **kwargs})


def test_empty_queue_waits_for_requests():
    assert plan_batch([], 0, policy()).take == 0


def test_batching_off_runs_each_request_alone():
    assert plan_batch(queue(1, 1, 1), 0, BatchingPolicy(max_batch_size=8, enabled=False)).take == 1
    assert plan_batch(queue(1, 1), 0, BatchingPolicy(max_batch_size=0, enabled=True)).take == 1


def test_full_batch_is_sent_without_waiting():
    assert plan_batch(queue(4, 4, 1), 0, policy()).take == 2


def test_partial_batch_waits_for_the_rest_of_the_delay():
    decision = plan_batch(queue(1, 2), 30, policy())
    assert decision.take == 0 and decision.wait_us == pytest.approx(70)


def test_delay_over_sends_what_is_there():
    assert plan_batch(queue(1, 2), 100, policy()).take == 2


def test_zero_delay_sends_at_once():
    assert plan_batch(queue(1), 0, policy(max_queue_delay_us=0)).take == 1


def test_request_that_would_overflow_ends_the_batch():
    assert plan_batch(queue(3, 6), 0, policy()).take == 1


def test_other_shapes_are_not_mixed_into_a_batch():
    q = queue(1, 1) + queue(1, signature=(("input", (5,)),))
    assert plan_batch(q, 0, policy()).take == 2


def test_preferred_size_reached_is_sent_at_once():
    assert plan_batch(queue(2, 2), 0, policy(preferred_batch_sizes=(4,))).take == 2


def test_a_smaller_preferred_size_reached_is_sent_at_once_too():
    # Triton: "If a batch of one of these sizes can be formed it will be executed immediately"
    assert plan_batch(queue(1, 1), 0, policy(preferred_batch_sizes=(2, 4))).take == 2
    assert plan_batch(queue(1, 1, 1), 0, policy(preferred_batch_sizes=(2, 4))).take == 2


def test_a_preferred_prefix_is_sent_when_the_next_request_cannot_join():
    # 2+2 = 4 is preferred; 2+2+3 = 7 fits in 8 but is not, and the fourth request would overflow
    assert plan_batch(queue(2, 2, 3, 3), 0, policy(preferred_batch_sizes=(4,))).take == 2


def test_preferred_prefix_is_chosen_when_the_delay_is_over():
    # 2+2 = 4 is preferred, 2+2+1 = 5 is not: the batcher sends the first two
    assert plan_batch(queue(2, 2, 1), 100, policy(preferred_batch_sizes=(4, 8))).take == 2


def test_without_a_preferred_prefix_everything_that_fits_goes():
    assert plan_batch(queue(1, 1, 1), 100, policy(preferred_batch_sizes=(4,))).take == 3


def test_concatenate_and_split_round_trip_in_order():
    a = {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
    b = {"x": np.arange(8, 16, dtype=np.float32).reshape(2, 4)}
    batched = concatenate([a, b])
    assert batched["x"].shape == (3, 4)
    parts = split({"y": batched["x"] * 2}, [1, 2])
    np.testing.assert_array_equal(parts[0]["y"], a["x"] * 2)
    np.testing.assert_array_equal(parts[1]["y"], b["x"] * 2)


def test_single_request_is_not_copied():
    a = {"x": np.zeros((2, 4), np.float32)}
    assert concatenate([a]) is a


def test_signature_ignores_batch_dimension_only_when_there_is_one():
    assert signature_of({"x": np.zeros((2, 4))}, True) == signature_of({"x": np.zeros((5, 4))}, True)
    assert signature_of({"x": np.zeros((2, 4))}, False) != signature_of({"x": np.zeros((5, 4))}, False)


def test_rows_are_joined_at_the_start_of_a_buffer_of_any_dtype_when_they_fit():
    buffer = np.full(10, -1.0, np.float64)  # 80 bytes
    parts = [np.arange(4, dtype=np.int32).reshape(2, 2), np.arange(4, 10, dtype=np.int32).reshape(3, 2)]
    joined = join_rows_into(buffer, parts)
    np.testing.assert_array_equal(joined, np.arange(10).reshape(5, 2))
    assert joined.dtype == np.int32 and joined.ctypes.data == buffer.ctypes.data
    assert join_rows_into(np.zeros(9, np.float32), parts) is None  # 36 bytes for 40
