"""The system shared memory registry against real POSIX shared memory objects, made the way
clients make them (tritonclient.utils.shared_memory)."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
import tritonclient.utils.shared_memory as client_shm

from plansmith_runtime.protocol import SharedMemoryError, SharedMemoryReference
from plansmith_runtime.shared_memory import SystemSharedMemory


@pytest.fixture
def shared_object():
    key = f"/plansmith-unit-{os.getpid()}"
    handle = client_shm.create_shared_memory_region("unit", key, 4096)
    yield key, handle
    client_shm.destroy_shared_memory_region(handle)


def test_inputs_are_views_of_the_clients_memory_and_outputs_land_in_it(shared_object):
    key, handle = shared_object
    registry = SystemSharedMemory()
    registry.register("tensors", key, offset=1024, byte_size=2048)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    client_shm.set_shared_memory_region(handle, [x], offset=1024 + 16)

    array = registry.input_array(SharedMemoryReference("tensors", x.nbytes, 16), "input", np.dtype(np.float32), (2, 3))
    np.testing.assert_array_equal(array, x)
    client_shm.set_shared_memory_region(handle, [x + 100], offset=1024 + 16)
    np.testing.assert_array_equal(array, x + 100)  # no copy: the client's later write shows through

    assert registry.write_output(SharedMemoryReference("tensors", 64, 512), "logits", x * 2) == x.nbytes
    np.testing.assert_array_equal(client_shm.get_contents_as_numpy(handle, np.float32, [2, 3], offset=1024 + 512), x * 2)
    assert registry.status() == [{"name": "tensors", "key": key, "offset": 1024, "byte_size": 2048}]

    registry.unregister("tensors")  # while `array` still views the mapping
    np.testing.assert_array_equal(array, x + 100)
    assert registry.status() == []
    with pytest.raises(SharedMemoryError, match="unable to find"):
        registry.status("tensors")


def test_bad_registrations_and_references_are_the_clients_errors(shared_object):
    key, _ = shared_object
    registry = SystemSharedMemory()
    with pytest.raises(SharedMemoryError, match="unable to open"):
        registry.register("ghost", "/plansmith-no-such-object", 0, 16)
    with pytest.raises(SharedMemoryError, match="do not fit"):
        registry.register("big", key, 4000, 200)
    with pytest.raises(SharedMemoryError, match="not a shared memory object name"):
        registry.register("escape", "/../etc/passwd", 0, 16)
    registry.register("small", key, 0, 64)
    with pytest.raises(SharedMemoryError, match="already registered"):
        registry.register("small", key, 0, 64)
    float32 = np.dtype(np.float32)
    with pytest.raises(SharedMemoryError, match="run past the end"):
        registry.input_array(SharedMemoryReference("small", 64, 8), "input", float32, (16,))
    with pytest.raises(SharedMemoryError, match="expected 64"):
        registry.input_array(SharedMemoryReference("small", 32, 0), "input", float32, (16,))
    with pytest.raises(SharedMemoryError, match="should be at least 64 bytes"):
        registry.write_output(SharedMemoryReference("small", 32, 0), "logits", np.zeros(16, np.float32))
    with pytest.raises(SharedMemoryError, match="unable to find"):
        registry.input_array(SharedMemoryReference("other", 64, 0), "input", float32, (16,))
    registry.unregister("never-registered")  # as in Triton: not an error
    registry.close()
    assert registry.status() == []


def test_a_key_that_is_a_link_to_another_file_is_refused_and_the_file_untouched(tmp_path):
    """shm_open does not follow a symbolic link: a client sharing /dev/shm cannot point a region at
    a file of the server's (the engine cache, /etc) and have outputs written into it."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"the server's own file")
    link = f"plansmith-link-{os.getpid()}"
    os.symlink(victim, f"/dev/shm/{link}")
    try:
        with pytest.raises(SharedMemoryError, match="unable to open"):
            SystemSharedMemory().register("link", link, 0, 16)
    finally:
        os.unlink(f"/dev/shm/{link}")
    assert victim.read_bytes() == b"the server's own file"
    fifo = f"plansmith-fifo-{os.getpid()}"
    os.mkfifo(f"/dev/shm/{fifo}")
    try:
        with pytest.raises(SharedMemoryError, match="(not a shared memory object|unable to open)"):
            SystemSharedMemory().register("fifo", fifo, 0, 16)
    finally:
        os.unlink(f"/dev/shm/{fifo}")


def test_a_region_whose_object_the_client_shrank_is_refused_instead_of_crashing_the_server():
    """Touching a mapped page past the end of its object is SIGBUS, the server's death: a reference
    past the object's current end is the client's error, and the region works again once the
    object has its size back."""
    key, pages = f"/plansmith-shrunk-{os.getpid()}", 3 * mmap.PAGESIZE
    handle = client_shm.create_shared_memory_region("shrunk", key, pages)
    registry = SystemSharedMemory()
    descriptor = os.open(f"/dev/shm/{key.lstrip('/')}", os.O_RDWR)
    try:
        registry.register("tensors", key, 0, pages)
        os.ftruncate(descriptor, 1024)
        past_the_end = SharedMemoryReference("tensors", 4096, 2 * mmap.PAGESIZE)
        float32 = np.dtype(np.float32)
        with pytest.raises(SharedMemoryError, match=f"is now 1024 bytes, too small for 4096 bytes at offset {2 * mmap.PAGESIZE}"):
            registry.write_output(past_the_end, "logits", np.ones(1024, np.float32))
        with pytest.raises(SharedMemoryError, match="is now 1024 bytes"):
            registry.input_array(SharedMemoryReference("tensors", 64, 1000), "input", float32, (16,))
        # what still lies inside the object is served
        np.testing.assert_array_equal(registry.input_array(SharedMemoryReference("tensors", 64, 0), "input", float32,
                                                           (16,)), np.zeros(16, np.float32))
        os.ftruncate(descriptor, pages)
        assert registry.write_output(past_the_end, "logits", np.ones(1024, np.float32)) == 4096
    finally:
        os.close(descriptor)
        registry.close()
        client_shm.destroy_shared_memory_region(handle)


def test_a_region_keeps_its_object_open_until_it_is_unregistered(shared_object):
    key, _ = shared_object
    opened = len(os.listdir("/proc/self/fd"))
    registry = SystemSharedMemory()
    registry.register("a", key, 0, 64)
    registry.register("b", key, 64, 64)
    with pytest.raises(SharedMemoryError, match="do not fit"):
        registry.register("c", key, 4096, 64)
    registry.unregister_all()
    assert len(os.listdir("/proc/self/fd")) == opened
