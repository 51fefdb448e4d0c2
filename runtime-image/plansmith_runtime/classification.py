"""Triton's classification extension: an output a request asks for with a "classification" count of
N (tritonclient's `InferRequestedOutput(name, class_count=N)`) comes back as the N highest-valued
entries of each batch item instead of the raw tensor.

The result is a BYTES tensor of shape [batch, min(N, entries)] ([min(N, entries)] for a model without
a batch dimension), highest first, each element "<value>:<index>" with the number as Triton's
C++ std::to_string writes it (six decimals for floating point). Triton appends ":<label>" when the
model configuration names a label file; plansmith's engines carry no labels. Pure functions: the
HTTP and gRPC front ends apply them to a request's outputs before encoding.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from plansmith_runtime.protocol import InvalidRequest, datatype_of


def top_classes(name: str, array: np.ndarray, count: int, has_batch_dim: bool) -> np.ndarray:
    """The `count` highest entries of each batch item of output `name`, as byte strings. Equal
    values keep the lower index first; NaN ranks below every number."""
    if array.dtype.kind not in "iuf":  # what Triton classifies too, and FP16 (Triton refuses that one)
        raise InvalidRequest(f"class result not available for output '{name}' due to unsupported type "
                             f"'{datatype_of(array.dtype)}'")
    items = array.reshape(array.shape[0], -1) if has_batch_dim and array.ndim else array.reshape(1, -1)
    entries = items.shape[1]
    ranked = np.where(np.isnan(items), -np.inf, items) if array.dtype.kind == "f" else items
    # A stable ascending sort of each item reversed, read backwards, is a descending order in which
    # equal values keep their original order.
    descending = entries - 1 - np.argsort(ranked[:, ::-1], axis=1, kind="stable")[:, ::-1]
    indices = descending[:, :min(count, entries)]
    values = np.take_along_axis(items, indices, axis=1)
    as_text = (lambda value: f"{value:f}") if array.dtype.kind == "f" else str
    classes = np.array([[f"{as_text(value.item())}:{index}".encode() for value, index in zip(row, index_row)]
                        for row, index_row in zip(values, indices)], dtype=object).reshape(indices.shape)
    return classes if has_batch_dim and array.ndim else classes.reshape(-1)


def classify_outputs(outputs: Mapping[str, np.ndarray], classifications: Mapping[str, int],
                     has_batch_dim: bool) -> dict[str, np.ndarray]:
    """A request's outputs with each one it asked classes of replaced by its top classes."""
    return {name: top_classes(name, array, classifications[name], has_batch_dim) if name in classifications else array
            for name, array in outputs.items()}
