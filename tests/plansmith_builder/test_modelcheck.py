"""ONNX checks and shape resolution on generated models."""

from __future__ import annotations

import io

import numpy as np
import pytest

from plansmith import testmodels
from plansmith.spec import InputShape
from plansmith_builder.calibration import load_calibration
from plansmith_builder.errors import BuildError
from plansmith_builder.modelcheck import inspect_model, load_model


def load(path):
    return load_model(path.read_bytes())


def test_generated_models_are_deterministic_and_valid(tmp_path):
    for make in (testmodels.small_cnn, testmodels.transformer_block, testmodels.mlp):
        first, second = make(tmp_path / "a.onnx"), make(tmp_path / "b.onnx")
        assert first.path.read_bytes() == second.path.read_bytes()
        signature = inspect_model(load(first.path), list(first.input_shapes))
        assert [t.name for t in signature.inputs] == [t.name for t in first.inputs]
        assert signature.max_batch_size == testmodels.MAX_BATCH


def test_dynamic_batch_resolves_from_the_spec(tmp_path):
    info = testmodels.transformer_block(tmp_path / "t.onnx")
    signature = inspect_model(load(info.path), list(info.input_shapes))
    (tokens,) = signature.inputs
    assert (tokens.name, tokens.dtype, tokens.shape) == ("tokens", "float32", [-1, 16, 64])
    assert tokens.max_shape == [32, 16, 64]
    assert signature.outputs[0].shape == [-1, 16, 64]
    assert signature.feed_shape(tokens, 1) == [1, 16, 64]


def test_static_model_needs_no_shapes(tmp_path):
    info = testmodels.small_cnn(tmp_path / "s.onnx", batch=4)
    signature = inspect_model(load(info.path), [])
    assert signature.inputs[0].shape == [4, 3, 32, 32] and signature.max_batch_size == 0


@pytest.mark.parametrize("declared, reason, words", [
    ([], "UnsupportedModel", "dynamic dimensions (batch)"),
    ([InputShape(name="image", min_shape=[1, 3, 32, 32], opt_shape=[1, 3, 32, 32], max_shape=[1, 3, 32, 32])],
     "InvalidSpec", "no input 'image'"),
    ([InputShape(name="input", min_shape=[1, 3, 32, 32], opt_shape=[1, 3, 32, 32], max_shape=[1, 3, 64, 64])],
     "InvalidSpec", "maxShape[2]: 64"),
])
def test_shape_problems(tmp_path, declared, reason, words):
    info = testmodels.small_cnn(tmp_path / "c.onnx")
    with pytest.raises(BuildError) as caught:
        inspect_model(load(info.path), declared)
    assert caught.value.reason == reason and words in caught.value.message


def test_corrupt_and_empty_bytes_are_unsupported():
    for data in (b"garbage bytes", b""):
        with pytest.raises(BuildError) as caught:
            load_model(data)
        assert caught.value.reason == "UnsupportedModel"


def test_calibration_must_fit_the_model(tmp_path):
    info = testmodels.small_cnn(tmp_path / "c.onnx")
    signature = inspect_model(load(info.path), list(info.input_shapes))
    good = testmodels.write_calibration(tmp_path / "c.npz", info, samples=10)
    arrays = load_calibration(good.read_bytes(), signature.inputs, samples=4)
    assert arrays["input"].shape == (4, 3, 32, 32)

    wrong = io.BytesIO()
    np.savez(wrong, input=np.zeros((4, 3, 16, 16), np.float32))
    with pytest.raises(BuildError, match="dimension 2"):
        load_calibration(wrong.getvalue(), signature.inputs, samples=4)
    other = io.BytesIO()
    np.savez(other, image=np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(BuildError, match="no array for input"):
        load_calibration(other.getvalue(), signature.inputs, samples=4)
    with pytest.raises(BuildError, match="not a readable .npz"):
        load_calibration(b"nope", signature.inputs, samples=4)
