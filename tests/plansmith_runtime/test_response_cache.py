"""Triton's response cache: the --cache-config flag, the key of a request's inputs, and the
least-recently-used store with its byte budget."""

from __future__ import annotations

import numpy as np
import pytest

from plansmith_runtime.response_cache import InvalidCacheConfig, ResponseCache, parse_cache_config, response_key


def test_the_flag_is_tritons_local_cache_size():
    assert parse_cache_config([]) == 0
    assert parse_cache_config(["local,size=1048576"]) == 1 << 20
    assert parse_cache_config(["local,size=64", "local,size=0"]) == 0  # the last one given, as flags override
    for entry, message in [("size=10", "takes local,size=BYTES"), ("redis,host=r", "cache 'redis' is not supported"),
                           ("local,bytes=10", "unknown local cache setting 'bytes'"),
                           ("local,size=1MB", "size must be a number of bytes, got '1MB'")]:
        with pytest.raises(InvalidCacheConfig, match=message):
            parse_cache_config([entry])


def test_the_key_is_every_inputs_name_datatype_shape_and_bytes_in_any_order():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = np.array([b"a", b"bc"], dtype=object)
    key = response_key({"x": x, "y": y})
    assert key == response_key({"y": y.copy(), "x": x.copy()}) and len(key) == 16
    assert key == response_key({"x": np.asfortranarray(x), "y": y})  # the same elements, another layout
    different = [{"x": x.reshape(3, 2), "y": y}, {"x": x.view(np.int32), "y": y}, {"z": x, "y": y},
                 {"x": x + 1, "y": y}, {"x": x, "y": np.array([b"ab", b"c"], dtype=object)}, {"x": x}]
    assert len({key, *(response_key(inputs) for inputs in different)}) == len(different) + 1


def test_least_recently_used_responses_go_first_within_the_byte_budget():
    def outputs(value: float) -> dict[str, np.ndarray]:
        return {"y": np.full(6, value, np.float32)}  # 24 bytes, 40 with its 16-byte key

    cache = ResponseCache(capacity_bytes=100)
    keys = [bytes([n]) * 16 for n in range(4)]
    assert cache.put(keys[0], outputs(0)) and cache.put(keys[1], outputs(1))
    assert cache.used_bytes == 80 and len(cache) == 2
    assert cache.get(keys[0])["y"][0] == 0  # keys[0] is now the most recently used
    assert cache.put(keys[2], outputs(2))  # 120 bytes would not fit: keys[1] goes
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None and cache.used_bytes == 80
    assert not cache.put(keys[3], {"y": np.zeros(100, np.float32)})  # larger than the whole cache: not kept
    assert len(cache) == 2 and cache.used_bytes == 80
    assert cache.put(keys[2], outputs(9)) and cache.get(keys[2])["y"][0] == 2  # already there: kept as it was


def test_cached_outputs_are_read_only_copies():
    produced = {"y": np.arange(4, dtype=np.int64)}
    cache = ResponseCache(capacity_bytes=1 << 10)
    cache.put(b"k" * 16, produced)
    produced["y"][:] = -1  # the executor reuses its buffer for the next batch
    kept = cache.get(b"k" * 16)["y"]
    np.testing.assert_array_equal(kept, np.arange(4))
    with pytest.raises(ValueError, match="read-only"):
        kept[0] = 7
