"""Serving settings from the spec, and their checks against the engine."""

import pytest

from plansmith.spec import ServingSpec
from plansmith_runtime.config import ConfigError, ServingConfig, check_against_engine, policy_from_spec


def test_spec_without_dynamic_batching_turns_batching_off():
    policy = policy_from_spec(ServingSpec(max_batch_size=8))
    assert policy.max_batch_size == 8 and not policy.batching


def test_spec_dynamic_batching_is_carried_over():
    serving = ServingSpec.model_validate({"maxBatchSize": 16, "dynamicBatching": {
        "preferredBatchSizes": [8, 4, 8], "maxQueueDelayMicroseconds": 500, "maxQueueSize": 10, "timeoutMicroseconds": 7}})
    policy = policy_from_spec(serving)
    assert policy.batching
    assert policy.preferred_batch_sizes == (4, 8)
    assert (policy.max_queue_delay_us, policy.max_queue_size, policy.timeout_us) == (500, 10, 7)
    assert policy.target_batch_size == 8


def test_warmup_covers_every_batch_size_the_batcher_forms():
    serving = ServingSpec.model_validate({"maxBatchSize": 16, "dynamicBatching": {"preferredBatchSizes": [4, 8]}})
    config = ServingConfig("m", policy_from_spec(serving))
    assert config.warmup_batch_sizes() == [1, 4, 8, 16]
    assert ServingConfig("m", policy_from_spec(ServingSpec(max_batch_size=8))).warmup_batch_sizes() == [1]


def test_batch_larger_than_the_engine_is_refused():
    policy = policy_from_spec(ServingSpec(max_batch_size=64))
    with pytest.raises(ConfigError, match="larger than the engine accepts"):
        check_against_engine(policy, 32)
    check_against_engine(policy_from_spec(ServingSpec(max_batch_size=32)), 32)


def test_batch_size_from_the_engine_when_nobody_chose_one():
    serving = ServingSpec.model_validate({"maxBatchSize": 8, "dynamicBatching": {"preferredBatchSizes": [4, 8]}})
    config = ServingConfig("m", policy_from_spec(serving), max_batch_from_engine=True)
    assert config.for_engine(32).policy.max_batch_size == 32
    assert config.for_engine(4).policy.preferred_batch_sizes == (4,)
    assert config.for_engine(0).policy.batching is False
    chosen = ServingConfig("m", policy_from_spec(serving))
    assert chosen.for_engine(32).policy.max_batch_size == 8


def test_only_batches_measured_faster_than_a_thread_hop_run_inline():
    from plansmith_runtime.model import inline_max_items

    assert inline_max_items({1: 20.0, 8: 60.0, 32: 400.0}, limit_us=150) == 8
    assert inline_max_items({1: 200.0, 8: 90.0}, limit_us=150) == 0  # batch 1 already too slow
    assert inline_max_items({}, limit_us=150) == 0  # no warmup: always an executor thread
