"""Is this a usable ONNX model, and what shapes will the engine accept?

`inspect_model` checks the graph (onnx.checker, opset), reads its declared inputs and outputs
with their dtypes, and resolves every dynamic dimension from `spec.model.inputs`:
a dynamic dimension without a shape range is `UnsupportedModel`; a range that contradicts the
graph (wrong rank, a fixed dimension changed, an unknown input name) is `InvalidSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from plansmith.manifest import TensorSpec
from plansmith.spec import InputShape
from plansmith_builder.errors import BuildError

MIN_OPSET = 7


@dataclass(frozen=True)
class ModelSignature:
    """The checked graph's interface. Input TensorSpecs carry min/opt/max shapes (equal for static inputs)."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int
    max_batch_size: int

    def feed_shape(self, tensor: TensorSpec, batch: int | None = None) -> list[int]:
        """A concrete shape for `tensor`: the optimum shape, with dimension 0 set to `batch` when the
        batch dimension is dynamic."""
        shape = list(tensor.opt_shape or tensor.shape)
        if batch is not None and tensor.shape and tensor.shape[0] == -1:
            shape[0] = batch
        return shape


def _dtype_name(elem_type: int) -> str:
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        raise BuildError("UnsupportedModel", f"unsupported tensor element type {elem_type}") from None


def _tensor(value_info, what: str) -> tuple[str, list[int], list[str]]:
    """(dtype, shape with -1 for dynamic dims, names of the dynamic dims)."""
    if not value_info.type.HasField("tensor_type"):
        raise BuildError("UnsupportedModel", f"{what} {value_info.name!r} is not a tensor")
    tensor_type = value_info.type.tensor_type
    dtype = _dtype_name(tensor_type.elem_type)
    if not tensor_type.HasField("shape"):
        raise BuildError("UnsupportedModel", f"{what} {value_info.name!r} has no declared shape (not even its rank)")
    shape, dynamic = [], []
    for index, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(int(dim.dim_value))
        else:
            shape.append(-1)
            dynamic.append(dim.dim_param or f"dim{index}")
    return dtype, shape, dynamic


def load_model(data: bytes):
    """Parse and check ONNX bytes; UnsupportedModel when they are not a valid ONNX graph."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)
    except Exception as error:  # google.protobuf.message.DecodeError and friends
        raise BuildError("UnsupportedModel", f"not an ONNX model: {error}") from None
    if not model.graph.node:
        raise BuildError("UnsupportedModel", "not an ONNX model: the graph has no nodes")
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # onnx.checker.ValidationError
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BuildError("UnsupportedModel", f"invalid ONNX graph: {first_line}") from None
    return model


def model_opset(model) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise BuildError("UnsupportedModel", "the model imports no default-domain (ai.onnx) opset")


def inspect_model(model, declared: list[InputShape]) -> ModelSignature:
    """Resolve the model's interface against the spec's shape ranges."""
    import onnx

    opset = model_opset(model)
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise BuildError("UnsupportedModel", f"opset {opset} is outside the supported range {MIN_OPSET}-"
                                             f"{onnx.defs.onnx_opset_version()}")
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [vi for vi in model.graph.input if vi.name not in initializers]
    if not graph_inputs:
        raise BuildError("UnsupportedModel", "the model has no inputs")
    by_name = {shape.name: (index, shape) for index, shape in enumerate(declared)}
    unknown = sorted(set(by_name) - {vi.name for vi in graph_inputs})
    if unknown:
        index = by_name[unknown[0]][0]
        raise BuildError("InvalidSpec", f"spec.model.inputs[{index}].name: the model has no input {unknown[0]!r} "
                                        f"(inputs: {', '.join(vi.name for vi in graph_inputs)})")

    inputs: list[TensorSpec] = []
    for vi in graph_inputs:
        dtype, shape, dynamic = _tensor(vi, "input")
        entry = by_name.get(vi.name)
        if entry is None:
            if dynamic:
                raise BuildError(
                    "UnsupportedModel",
                    f"input {vi.name!r} has dynamic dimensions ({', '.join(dynamic)}) in shape "
                    f"{_show(shape)}: give their ranges in spec.model.inputs (name {vi.name!r} with "
                    "minShape, optShape and maxShape)",
                )
            inputs.append(TensorSpec(name=vi.name, dtype=dtype, shape=shape,
                                     min_shape=shape, opt_shape=shape, max_shape=shape))
            continue
        index, ranges = entry
        _check_ranges(index, vi.name, shape, ranges)
        inputs.append(TensorSpec(name=vi.name, dtype=dtype, shape=shape, min_shape=list(ranges.min_shape),
                                 opt_shape=list(ranges.opt_shape), max_shape=list(ranges.max_shape)))

    outputs = []
    for vi in model.graph.output:
        dtype, shape, _ = _tensor(vi, "output")
        outputs.append(TensorSpec(name=vi.name, dtype=dtype, shape=shape))
    batched = all(t.shape and t.shape[0] == -1 for t in inputs)
    max_batch = min((t.max_shape or t.shape)[0] for t in inputs) if batched else 0
    return ModelSignature(inputs=inputs, outputs=outputs, opset=opset, max_batch_size=max_batch)


def _show(shape: list[int]) -> str:
    return "[" + ", ".join("?" if d == -1 else str(d) for d in shape) + "]"


def _check_ranges(index: int, name: str, shape: list[int], ranges: InputShape) -> None:
    for field, values in (("minShape", ranges.min_shape), ("optShape", ranges.opt_shape), ("maxShape", ranges.max_shape)):
        where = f"spec.model.inputs[{index}].{field}"
        if len(values) != len(shape):
            raise BuildError("InvalidSpec", f"{where}: {len(values)} dimensions, but input {name!r} has "
                                            f"{len(shape)}: {_show(shape)}")
        for axis, (declared, fixed) in enumerate(zip(values, shape)):
            if fixed != -1 and declared != fixed:
                raise BuildError("InvalidSpec", f"{where}[{axis}]: {declared}, but input {name!r} has the fixed "
                                                f"size {fixed} there: {_show(shape)}")
    for axis, (low, mid, high) in enumerate(zip(ranges.min_shape, ranges.opt_shape, ranges.max_shape)):
        if not low <= mid <= high:
            raise BuildError("InvalidSpec", f"spec.model.inputs[{index}]: dimension {axis} needs "
                                            f"minShape <= optShape <= maxShape, got {low}, {mid}, {high}")
