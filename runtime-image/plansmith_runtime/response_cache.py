"""Triton's response cache (`--cache-config local,size=BYTES`, a model's `response_cache { enable:
true }`): a request whose inputs (names, datatypes, shapes and bytes) equal an earlier one's is
answered with that one's outputs, without queueing or running the model. Least recently used
responses go first when the cache is full; a response larger than the whole cache is not kept.

A key is a BLAKE2b digest of the inputs (Triton hashes them too), taken before the request is
queued: its cost is the hash of the request's bytes, about a millisecond per megabyte here, paid only
where the cache is on. Outputs are kept as read-only copies, so no later request or executor buffer
can change a cached response. Used from the event loop thread only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterable, Mapping

import numpy as np

CACHE_CONFIG_FORMAT = "--cache-config takes local,size=BYTES (Triton's local cache)"


class InvalidCacheConfig(ValueError):
    """A --cache-config the server cannot take."""


def parse_cache_config(entries: Iterable[str]) -> int:
    """Triton's --cache-config entries: the local cache's size in bytes (0: no cache)."""
    size = 0
    for entry in entries:
        cache, comma, setting = entry.partition(",")
        name, equals, value = setting.partition("=")
        if not comma or not equals:
            raise InvalidCacheConfig(f"{CACHE_CONFIG_FORMAT}, got {entry!r}")
        if cache != "local":
            raise InvalidCacheConfig(f"cache {cache!r} is not supported: the local (in-memory) cache is")
        if name != "size":
            raise InvalidCacheConfig(f"unknown local cache setting {name!r}: size is")
        if not value.isdigit():
            raise InvalidCacheConfig(f"local cache size must be a number of bytes, got {value!r}")
        size = int(value)
    return size


def response_key(inputs: Mapping[str, np.ndarray]) -> bytes:
    """The digest of a request's inputs: each one's name, datatype, shape and elements, by name."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        array = inputs[name]
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        if array.dtype.kind == "O":  # BYTES: each element, its length first
            for element in array.ravel():
                data = element if isinstance(element, bytes) else str(element).encode()
                digest.update(len(data).to_bytes(8, "little"))
                digest.update(data)
        else:
            digest.update(np.ascontiguousarray(array).data)
    return digest.digest()


class ResponseCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[bytes, tuple[dict[str, np.ndarray], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: bytes, outputs: Mapping[str, np.ndarray]) -> bool:
        """Keep a response (False when it is larger than the cache), evicting the least recently used."""
        size = len(key) + sum(np.asarray(array).nbytes for array in outputs.values())
        if size > self.capacity_bytes:
            return False
        if key in self._entries:  # two requests with the same inputs ran before either was cached
            self._entries.move_to_end(key)
            return True
        kept = {}
        for name, array in outputs.items():
            copy = np.array(array, copy=True)
            copy.flags.writeable = False
            kept[name] = copy
        while self.used_bytes + size > self.capacity_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.used_bytes -= evicted
        self._entries[key] = (kept, size)
        self.used_bytes += size
        return True
