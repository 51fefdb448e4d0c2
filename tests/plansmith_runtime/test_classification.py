"""Triton's classification extension as a pure function on output tensors."""

import numpy as np
import pytest

from plansmith_runtime.classification import classify_outputs, top_classes
from plansmith_runtime.protocol import InvalidRequest


def test_each_batch_item_gets_its_highest_entries_first_as_value_colon_index():
    logits = np.array([[0.5, 2.25, -1.0, 7.125], [3.0, 1.0, 2.0, 0.0]], np.float32)
    classes = top_classes("logits", logits, 2, has_batch_dim=True)
    assert classes.dtype == object and classes.shape == (2, 2)
    # std::to_string's six decimals, as Triton writes them
    assert classes.tolist() == [[b"7.125000:3", b"2.250000:1"], [b"3.000000:0", b"2.000000:2"]]


def test_the_count_is_capped_at_the_entries_and_the_entries_of_an_item_are_all_its_dimensions():
    scores = np.arange(12, dtype=np.float64).reshape(2, 3, 2)  # 6 entries an item, flattened in C order
    classes = top_classes("scores", scores, 10, has_batch_dim=True)
    assert classes.shape == (2, 6)
    assert classes[1].tolist() == [f"{value:.6f}:{index}".encode() for index, value in reversed(list(enumerate(range(6, 12))))]


def test_without_a_batch_dimension_the_whole_tensor_is_one_item():
    classes = top_classes("scores", np.array([[1, 9], [4, 3]], np.int32), 3, has_batch_dim=False)
    assert classes.shape == (3,)
    assert classes.tolist() == [b"9:1", b"4:2", b"3:3"]  # integers as integers


def test_equal_values_keep_the_lower_index_first_and_nan_ranks_last():
    classes = top_classes("logits", np.array([[1.0, np.nan, 5.0, 5.0, 1.0]], np.float32), 5, has_batch_dim=True)
    assert classes.tolist() == [[b"5.000000:2", b"5.000000:3", b"1.000000:0", b"1.000000:4", b"nan:1"]]
    many = np.array([[1.0] * 20 + [2.0] * 20], np.float32)  # numpy's default sort is not stable past 16 entries
    indices = [int(element.split(b":")[1]) for element in top_classes("logits", many, 40, has_batch_dim=True)[0]]
    assert indices == [*range(20, 40), *range(20)]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint64, np.int8, np.int64, np.float16])
def test_every_numeric_type_is_ranked_by_its_own_values(dtype):
    values = np.array([[3, 250 if np.dtype(dtype).kind == "u" else -5, 7]], dtype)
    first = top_classes("out", values, 1, has_batch_dim=True)[0, 0].decode()
    expected = max(range(3), key=lambda index: values[0, index])
    assert first.split(":")[1] == str(expected)


def test_a_bool_output_has_no_classes_like_in_triton():
    with pytest.raises(InvalidRequest, match="class result not available for output 'mask' due to unsupported type 'BOOL'"):
        top_classes("mask", np.zeros((1, 3), bool), 1, has_batch_dim=True)


def test_only_the_outputs_asked_for_are_classified():
    logits, embedding = np.array([[1.0, 3.0]], np.float32), np.ones((1, 4), np.float32)
    outputs = classify_outputs({"logits": logits, "embedding": embedding}, {"logits": 1}, has_batch_dim=True)
    assert outputs["logits"].tolist() == [[b"3.000000:1"]]
    assert outputs["embedding"] is embedding
