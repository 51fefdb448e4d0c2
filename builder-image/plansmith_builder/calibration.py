"""Calibration data: an .npz file whose arrays are named after the model inputs, samples along
dimension 0 (spec.build.calibration). Used for INT8 calibration and, when given, as the accuracy
gate's inputs."""

from __future__ import annotations

import io
import zipfile
from typing import Iterator

import numpy as np

from plansmith.manifest import TensorSpec
from plansmith_builder.errors import BuildError


def load_calibration(data: bytes, inputs: list[TensorSpec], samples: int) -> dict[str, np.ndarray]:
    """The first `samples` items of each input's array, cast to the input's dtype and checked
    against its shape range (UnsupportedModel when the file does not fit the model)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise BuildError("UnsupportedModel", f"calibration data is not a readable .npz file: {error}") from None
    missing = [t.name for t in inputs if t.name not in arrays]
    if missing:
        raise BuildError("UnsupportedModel", f"calibration data has no array for input(s) {', '.join(missing)} "
                                             f"(arrays: {', '.join(sorted(arrays)) or 'none'})")
    result = {}
    counts = set()
    for tensor in inputs:
        array = arrays[tensor.name]
        rank = len(tensor.shape)
        if array.ndim != rank:
            raise BuildError("UnsupportedModel", f"calibration array {tensor.name!r} has shape {list(array.shape)}; "
                                                 f"the input has {rank} dimensions, samples along dimension 0")
        for axis in range(1, rank):
            low, high = (tensor.min_shape or tensor.shape)[axis], (tensor.max_shape or tensor.shape)[axis]
            if not low <= array.shape[axis] <= high:
                raise BuildError("UnsupportedModel", f"calibration array {tensor.name!r} has size {array.shape[axis]} "
                                                     f"in dimension {axis}, outside the input's range {low}..{high}")
        result[tensor.name] = np.ascontiguousarray(array[:samples]).astype(tensor.dtype, copy=False)
        counts.add(len(result[tensor.name]))
    if len(counts) != 1 or 0 in counts:
        raise BuildError("UnsupportedModel", "calibration arrays must hold the same, non-zero number of samples")
    return result


def batches(arrays: dict[str, np.ndarray], batch_size: int, exact: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Feed dicts of up to `batch_size` samples each, in order (only full ones when `exact`:
    for models whose batch dimension is fixed)."""
    count = len(next(iter(arrays.values())))
    for start in range(0, count, max(1, batch_size)):
        if exact and start + batch_size > count:
            return
        yield {name: array[start:start + batch_size] for name, array in arrays.items()}


def batch_size_for(inputs: list[TensorSpec]) -> int:
    """The batch the calibration runs at: the optimum batch when dimension 0 is dynamic, else the fixed one."""
    sizes = [t.opt_shape[0] if t.opt_shape else t.shape[0] for t in inputs]
    return max(1, min(sizes))


def ort_reader(arrays: dict[str, np.ndarray], batch_size: int, exact: bool = False):
    """An onnxruntime.quantization.CalibrationDataReader over the arrays."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = batches(arrays, batch_size, exact)

        def get_next(self):
            return next(self._feeds, None)

        def rewind(self) -> None:
            self._feeds = batches(arrays, batch_size, exact)

    return Reader()
