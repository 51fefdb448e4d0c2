"""The TensorRT executor's pure logic (the device path needs TensorRT and a GPU)."""

import numpy as np
import pytest

from plansmith_runtime.executors.tensorrt import NoProfileFits, ProfileRange, buffer_bytes, largest_shapes, select_profile

SMALL = ProfileRange({"input": ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))})
LARGE = ProfileRange({"input": ((1, 3, 32, 32), (32, 3, 32, 32), (64, 3, 32, 32))})


def test_smallest_profile_that_accepts_the_batch_is_chosen():
    assert select_profile([LARGE, SMALL], {"input": (4, 3, 32, 32)}) == 1
    assert select_profile([LARGE, SMALL], {"input": (16, 3, 32, 32)}) == 0


def test_no_profile_accepts_the_shape():
    with pytest.raises(NoProfileFits, match="no optimization profile"):
        select_profile([SMALL], {"input": (9, 3, 32, 32)})
    with pytest.raises(NoProfileFits):
        select_profile([SMALL], {"input": (2, 3, 16, 16)})


def test_buffers_fit_the_largest_shape_of_every_profile():
    assert largest_shapes([SMALL, LARGE]) == {"input": (64, 3, 32, 32)}
    assert buffer_bytes((64, 3, 32, 32), np.float16) == 64 * 3 * 32 * 32 * 2
