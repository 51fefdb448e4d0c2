"""KServe v2 / Triton protocol pieces that do not depend on HTTP or gRPC: datatypes, request
validation against the model's signature, and the HTTP body format (JSON plus Triton's binary
tensor extension). All pure; the servers are thin adapters around these.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import orjson
from tritonclient.utils import serialize_byte_tensor

from plansmith.manifest import TensorSpec
from plansmith_runtime.batching import signature_of

# KServe v2 datatype <-> numpy dtype name (BYTES is not supported: engines take numeric tensors)
DATATYPE_TO_NUMPY = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
_DTYPE_TO_DATATYPE = {np.dtype(value): key for key, value in DATATYPE_TO_NUMPY.items()}
# outputs only: a classification result (the classification extension) is a tensor of byte strings
_DTYPE_TO_DATATYPE[np.dtype(object)] = "BYTES"
# Triton's model config enum names (model_config.proto DataType)
DATATYPE_TO_CONFIG = {
    "BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
}

HEADER_CONTENT_LENGTH = "Inference-Header-Content-Length"


class InvalidRequest(ValueError):
    """A request the model cannot run: HTTP 400 / gRPC INVALID_ARGUMENT."""


class NotFound(InvalidRequest):
    """Something a request names does not exist: HTTP 404 / gRPC NOT_FOUND, as Triton answers its
    TRITONSERVER_ERROR_NOT_FOUND (HttpCodeFromError in its http_server.cc)."""


class ModelNotFound(NotFound):
    """No model (or version) of that name is served."""


class SharedMemoryError(InvalidRequest):
    """A shared memory region that cannot be registered, found or used: HTTP 400 / gRPC INVALID_ARGUMENT."""


class SharedMemoryRegionExists(SharedMemoryError):
    """A region name already registered: gRPC ALREADY_EXISTS (HTTP 400), as Triton's shared memory manager says."""


class SharedMemoryRegionNotFound(SharedMemoryError, NotFound):
    """No region of that name: HTTP 404 / gRPC NOT_FOUND, as Triton's shared memory manager says."""


@dataclass(frozen=True)
class SharedMemoryReference:
    """Where a request's tensor lives: `byte_size` bytes at `offset` into a registered region."""

    region: str
    byte_size: int
    offset: int = 0


def reference_from_parameters(tensor: str, parameters: dict) -> SharedMemoryReference | None:
    """The shared memory a tensor's parameters name (shared_memory_region, _byte_size, _offset), if any."""
    region = parameters.get("shared_memory_region")
    if region is None:
        return None
    byte_size = parameters.get("shared_memory_byte_size")
    offset = parameters.get("shared_memory_offset", 0)
    if not isinstance(region, str) or not region:
        raise SharedMemoryError(f"'{tensor}': shared_memory_region must be a region name, got {region!r}")
    for label, value in (("shared_memory_byte_size", byte_size), ("shared_memory_offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SharedMemoryError(f"'{tensor}': {label} must be a non-negative integer, got {value!r}")
    return SharedMemoryReference(region, byte_size, offset)  # type: ignore[arg-type]


def requested_classes(tensor: str, parameters: Mapping[str, Any]) -> int:
    """How many classes an output's parameters ask for (Triton's classification extension: the
    "classification" parameter tritonclient's `InferRequestedOutput(name, class_count=N)` sets);
    0 when the output is wanted as it is."""
    count = parameters.get("classification", 0)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise InvalidRequest(f"output '{tensor}': classification must be a non-negative integer, got {count!r}")
    if count and "shared_memory_region" in parameters:
        raise InvalidRequest(f"output '{tensor}': a classification result is not written to shared memory")
    return count


def datatype_of(dtype: str | np.dtype) -> str:
    try:  # keyed by dtype objects: dtype.name is a Python-level property, slow on the request path
        return _DTYPE_TO_DATATYPE[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise ValueError(f"dtype {dtype} has no KServe v2 datatype") from None


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs as the protocol shows them. With a batch dimension the shapes
    are the engine's shapes with dim 0 as -1."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int

    @property
    def has_batch_dim(self) -> bool:
        return self.max_batch_size > 0

    @functools.cached_property
    def inputs_by_name(self) -> dict[str, tuple[TensorSpec, np.dtype]]:
        """Each input by name, with its numpy dtype (made once: np.dtype() is not free per request)."""
        return {tensor.name: (tensor, np.dtype(tensor.dtype)) for tensor in self.inputs}

    @functools.cached_property
    def output_names(self) -> frozenset[str]:
        return frozenset(tensor.name for tensor in self.outputs)

    def input(self, name: str) -> TensorSpec:
        try:
            return self.inputs_by_name[name][0]
        except KeyError:
            raise InvalidRequest(
                f"unexpected inference input '{name}', the model expects {[t.name for t in self.inputs]}") from None

    @functools.cached_property
    def _checked_layouts(self) -> dict[tuple, CheckedInputs]:
        return {}

    def check(self, arrays: dict[str, np.ndarray]) -> CheckedInputs:
        """`check_inputs`, and the key requests batch together by, for these inputs' names, dtypes and
        shapes. Clients repeat a handful of those, so each is checked once (the checks took ~3 us of
        the event loop a request, a tenth of the request path for a small model); a request that fails
        them raises every time and is not remembered."""
        layout = tuple([(name, array.dtype, array.shape) for name, array in arrays.items()])
        checked = self._checked_layouts.get(layout)
        if checked is None:
            checked = CheckedInputs(check_inputs(self, arrays), signature_of(arrays, self.has_batch_dim))
            if len(self._checked_layouts) >= MEMO_LAYOUTS:  # many distinct shapes: start over, stay bounded
                self._checked_layouts.clear()
            self._checked_layouts[layout] = checked
        return checked


# distinct input layouts (names, dtypes, shapes) a Signature remembers as checked
MEMO_LAYOUTS = 1024


@dataclass(frozen=True, slots=True)
class CheckedInputs:
    """What the checks of a request's inputs found."""

    batch: int  # dim 0 (1 for a model without a batch dimension)
    batch_key: tuple  # the non-batch dimensions of every input: requests batch together only when these agree


@dataclass(slots=True)
class InferRequest:
    """A decoded request: numpy inputs by name, the outputs wanted, and how to return them. The
    outputs and their binary flags may be shared with other requests of the same header: read-only."""

    id: str
    inputs: dict[str, np.ndarray]
    outputs: Sequence[str]  # empty: all
    binary_outputs: Mapping[str, bool] = field(default_factory=dict)
    binary_default: bool = False
    shared_memory_outputs: Mapping[str, SharedMemoryReference] = field(default_factory=dict)  # written there, not sent
    classifications: Mapping[str, int] = field(default_factory=dict)  # outputs returned as their top classes


def check_inputs(signature: Signature, arrays: dict[str, np.ndarray]) -> int:
    """Check names, dtypes and shapes against the model; return the request's batch size."""
    for name in arrays:
        signature.input(name)  # raises for a name the model does not have
    if len(arrays) != len(signature.inputs):
        missing = [t.name for t in signature.inputs if t.name not in arrays]
        raise InvalidRequest(f"expected {len(signature.inputs)} inputs but got {len(arrays)}; missing {missing}")
    batch = None
    has_batch_dim = signature.has_batch_dim
    for name, array in arrays.items():
        spec, dtype = signature.inputs_by_name[name]
        if array.dtype != dtype:
            raise InvalidRequest(
                f"input '{name}' has datatype {datatype_of(array.dtype)}, the model expects {datatype_of(spec.dtype)}")
        if len(array.shape) != len(spec.shape):
            raise InvalidRequest(f"input '{name}' has shape {list(array.shape)}, the model expects {spec.shape}")
        for index, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if index == 0 and has_batch_dim:
                continue
            if want >= 0 and got != want:
                raise InvalidRequest(f"input '{name}' has shape {list(array.shape)}, the model expects {spec.shape}")
            if want < 0 and spec.min_shape and spec.max_shape and not spec.min_shape[index] <= got <= spec.max_shape[index]:
                raise InvalidRequest(f"input '{name}' dimension {index} is {got}, the engine accepts "
                                     f"{spec.min_shape[index]} to {spec.max_shape[index]}")
        if has_batch_dim:
            if batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise InvalidRequest("all inputs must have the same batch size (dimension 0)")
    if not signature.has_batch_dim:
        return 1
    if batch is None or batch < 1:
        raise InvalidRequest("batch size (dimension 0) must be at least 1")
    if batch > signature.max_batch_size:
        raise InvalidRequest(
            f"inference request batch-size must be <= {signature.max_batch_size} for this model, got {batch}")
    return batch


def tensor_layout(name: str, datatype: str, shape: Sequence[int]) -> tuple[np.dtype, tuple[int, ...]]:
    """A request tensor's numpy dtype and shape, checked."""
    return _numpy_dtype(name, datatype), _shape(name, shape)


def array_from_bytes(name: str, datatype: str, shape: Sequence[int], data: bytes | memoryview) -> np.ndarray:
    dtype, shape = tensor_layout(name, datatype, shape)
    _check_byte_length(name, datatype, dtype, shape, len(data))
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _check_byte_length(name: str, datatype: str, dtype: np.dtype, shape: tuple[int, ...], size: int) -> None:
    expected = math.prod(shape) * dtype.itemsize
    if size != expected:
        raise InvalidRequest(f"input '{name}': {size} bytes of data for shape {list(shape)} {datatype}, expected {expected}")


def array_from_json(name: str, datatype: str, shape: Sequence[int], data: Any) -> np.ndarray:
    return _array_from_values(name, datatype, _numpy_dtype(name, datatype), _shape(name, shape), data)


def _array_from_values(name: str, datatype: str, dtype: np.dtype, shape: tuple[int, ...], data: Any) -> np.ndarray:
    try:
        array = np.asarray(data, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as error:  # OverflowError: a value out of the datatype's range
        raise InvalidRequest(f"input '{name}': data is not {datatype}: {error}") from None
    if array.size != math.prod(shape):
        raise InvalidRequest(f"input '{name}': {array.size} values for shape {list(shape)}")
    return array.reshape(shape)


def _numpy_dtype(name: str, datatype: Any) -> np.dtype:
    if datatype not in DATATYPE_TO_NUMPY:
        raise InvalidRequest(f"input '{name}': unsupported datatype {datatype!r}")
    return np.dtype(DATATYPE_TO_NUMPY[datatype])


def boolean_parameter(owner: str, name: str, value: Any) -> bool:
    """A boolean parameter, which Triton refuses as anything else (the string "false" is no false)."""
    if not isinstance(value, bool):
        raise InvalidRequest(f"{owner}: parameter '{name}' must be true or false, got {value!r}")
    return value


# numpy refuses a shape whose dimensions multiply (zeros taken as ones) past what a 16-byte item could
# address, even one with no elements
MAX_SHAPE_PRODUCT = np.iinfo(np.intp).max // 16


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidRequest(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    if math.prod(max(d, 1) for d in shape) > MAX_SHAPE_PRODUCT:
        raise InvalidRequest(f"input '{name}': shape {list(shape)} is larger than any tensor can be")
    return tuple(shape)


# --------------------------------------------------------------------------- HTTP bodies


@dataclass(frozen=True)
class InputHeader:
    """One input as a request's JSON header describes it."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    binary_size: int | None  # its bytes in the binary part after the header, or None: JSON `data` or shared memory
    datatype: str = ""
    data: Any = None
    shared_memory: SharedMemoryReference | None = None


@dataclass(frozen=True)
class RequestHeader:
    """Everything an HTTP infer request's JSON header says, checked."""

    id: str
    inputs: tuple[InputHeader, ...]
    outputs: tuple[str, ...]
    binary_outputs: Mapping[str, bool]  # read-only
    binary_default: bool
    shared_memory_outputs: Mapping[str, SharedMemoryReference]  # read-only
    classifications: Mapping[str, int]  # read-only


def parse_request_header(text: bytes | memoryview) -> RequestHeader:
    try:  # orjson: the standard json module took ~2.5 us of the event loop per binary request header
        document = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest(f"failed to parse the request JSON: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidRequest("the request JSON must be an object with an 'inputs' list")
    inputs: list[InputHeader] = []
    for tensor in document["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidRequest("each input must be an object with a 'name'")
        name = tensor["name"]
        if any(seen.name == name for seen in inputs):
            raise InvalidRequest(f"input '{name}' is given twice")
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"input '{name}': parameters must be an object")
        size = parameters.get("binary_data_size")
        shared_memory = reference_from_parameters(f"input '{name}'", parameters)
        if size is None and "data" not in tensor and shared_memory is None:
            raise InvalidRequest(f"input '{name}' has neither 'data', binary_data_size nor shared_memory_region")
        if shared_memory is not None and (size is not None or "data" in tensor):
            raise InvalidRequest(f"input '{name}' names a shared memory region and also carries data")
        datatype = tensor.get("datatype")
        dtype, shape = _numpy_dtype(name, datatype), _shape(name, tensor.get("shape"))
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidRequest(f"input '{name}': binary_data_size {size!r} runs past the end of the body")
            _check_byte_length(name, datatype, dtype, shape, size)
        inputs.append(InputHeader(name, dtype, shape, size, datatype, tensor.get("data"), shared_memory))
    request_parameters = document.get("parameters") or {}
    binary_default = (boolean_parameter("request", "binary_data_output", request_parameters.get("binary_data_output", False))
                      if isinstance(request_parameters, dict) else False)
    outputs: list[str] = []
    binary_outputs: list[tuple[str, bool]] = []
    shared_memory_outputs: dict[str, SharedMemoryReference] = {}
    classifications: dict[str, int] = {}
    requested = document.get("outputs") or []
    if not isinstance(requested, list):
        raise InvalidRequest(f"'outputs' must be a list of objects, got {requested!r}")
    for tensor in requested:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidRequest("each requested output must be an object with a 'name'")
        outputs.append(tensor["name"])
        parameters = tensor.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidRequest(f"output '{tensor['name']}': parameters must be an object")
        if "binary_data" in parameters:
            binary_outputs.append((tensor["name"], boolean_parameter(f"output '{tensor['name']}'", "binary_data", parameters["binary_data"])))
        shared_memory = reference_from_parameters(f"output '{tensor['name']}'", parameters)
        if shared_memory is not None:
            shared_memory_outputs[tensor["name"]] = shared_memory
        if count := requested_classes(tensor["name"], parameters):
            classifications[tensor["name"]] = count
    request_id = document.get("id", "")
    return RequestHeader(str(request_id) if request_id is not None else "", tuple(inputs), tuple(outputs),
                         MappingProxyType(dict(binary_outputs)), binary_default, MappingProxyType(shared_memory_outputs),
                         MappingProxyType(classifications))


# A client sends the same header for every request of one shape (tritonclient builds it from the
# inputs' names, shapes and datatypes), so small headers are parsed and checked once: that was about
# a tenth of the event loop's work a request for an overhead-dominated model. A header with JSON
# tensor data inside is parsed again each time (its values differ).
MEMO_HEADER_BYTES = 2048
_parse_repeated_header = functools.lru_cache(maxsize=256)(parse_request_header)


def decode_http_request(body: bytes | memoryview, header_length: str | None, shared_memory: SharedMemoryInputs | None = None) -> InferRequest:
    """Parse a POST .../infer body: JSON, or JSON followed by binary tensors when the
    Inference-Header-Content-Length header gives the JSON's length. Inputs in shared memory are
    read from `shared_memory`'s regions."""
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise InvalidRequest(f"{HEADER_CONTENT_LENGTH} is not an integer: {header_length!r}") from None
        if not 0 <= json_length <= len(body):
            raise InvalidRequest(f"{HEADER_CONTENT_LENGTH} {json_length} is outside the body ({len(body)} bytes)")
        header = (_parse_repeated_header(bytes(body[:json_length])) if json_length <= MEMO_HEADER_BYTES  # hashable
                  else parse_request_header(memoryview(body)[:json_length]))
    else:
        json_length = len(body)
        header = parse_request_header(body)
    binary = memoryview(body)[json_length:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for tensor in header.inputs:
        if tensor.shared_memory is not None:
            if shared_memory is None:
                raise SharedMemoryError(f"input '{tensor.name}': this endpoint takes no shared memory")
            inputs[tensor.name] = shared_memory.input_array(tensor.shared_memory, tensor.name, tensor.dtype, tensor.shape)
            continue
        if tensor.binary_size is None:
            inputs[tensor.name] = _array_from_values(tensor.name, tensor.datatype, tensor.dtype, tensor.shape, tensor.data)
            continue
        if offset + tensor.binary_size > len(binary):
            raise InvalidRequest(f"input '{tensor.name}': binary_data_size {tensor.binary_size} runs past the end of the body")
        inputs[tensor.name] = np.frombuffer(binary, tensor.dtype, math.prod(tensor.shape), offset).reshape(tensor.shape)
        offset += tensor.binary_size
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} unexpected bytes after the binary inputs")
    return InferRequest(header.id, inputs, header.outputs, header.binary_outputs, header.binary_default,
                        header.shared_memory_outputs, header.classifications)


def encode_http_response(model_name: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray],
                         shared_memory: SharedMemoryOutputs | None = None) -> tuple[bytes, int | None]:
    """The response body and, when some outputs are binary, the JSON header's length. Outputs the
    request placed in shared memory are written to `shared_memory` and described without data."""
    if (outputs and not request.id and not request.shared_memory_outputs and not request.classifications
            and all(request.binary_outputs.get(name, request.binary_default) for name in outputs)):
        # every output binary: the JSON header depends only on the outputs' names, dtypes and shapes
        layout = tuple([(name, array.dtype, array.shape) for name, array in outputs.items()])
        header = _binary_outputs_header(model_name, version, layout)
        return b"".join([header, *(array.tobytes() for array in outputs.values())]), len(header)
    tensors = []
    blobs: list[bytes] = []
    for name, array in outputs.items():
        entry = _output_entry(name, array.dtype, array.shape)
        in_shared_memory = request.shared_memory_outputs.get(name)
        if in_shared_memory is not None:
            entry["parameters"] = write_to_shared_memory(shared_memory, in_shared_memory, name, array)
        elif request.binary_outputs.get(name, request.binary_default):
            raw = tensor_bytes(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif array.dtype == object:  # BYTES (a classification result): JSON strings
            entry["data"] = [element.decode() for element in array.reshape(-1)]
        else:  # orjson writes numpy arrays directly, without a list of Python floats in between
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        tensors.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": tensors}
    if request.id:
        document["id"] = request.id
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def tensor_bytes(array: np.ndarray) -> bytes:
    """A tensor's contents as the binary tensor extension and gRPC's raw_output_contents carry them:
    C order whatever the array's layout, and a BYTES tensor's elements each after its 4-byte
    little-endian length (tritonclient's own serializer writes that layout)."""
    if array.dtype != object:
        return array.tobytes()
    return serialize_byte_tensor(array).item() if array.size else b""


@functools.lru_cache(maxsize=256)  # a model answers a handful of output shapes; made once, not per request
def _binary_outputs_header(model_name: str, version: str, layout: tuple[tuple[str, np.dtype, tuple[int, ...]], ...]) -> bytes:
    """The JSON header of a response whose outputs (name, dtype, shape) all follow it as binary data."""
    tensors = [{**_output_entry(name, dtype, shape), "parameters": {"binary_data_size": math.prod(shape) * dtype.itemsize}}
               for name, dtype, shape in layout]
    return orjson.dumps({"model_name": model_name, "model_version": version, "outputs": tensors})


class SharedMemoryInputs(Protocol):
    def input_array(self, reference: SharedMemoryReference, tensor: str, dtype: np.dtype,
                    shape: tuple[int, ...]) -> np.ndarray: ...


class SharedMemoryOutputs(Protocol):
    def write_output(self, reference: SharedMemoryReference, tensor: str, array: np.ndarray) -> int: ...


def write_to_shared_memory(shared_memory: SharedMemoryOutputs | None, reference: SharedMemoryReference, name: str,
                           array: np.ndarray) -> dict[str, Any]:
    """Write an output where the request asked; the parameters a response describes it with."""
    if shared_memory is None:
        raise SharedMemoryError(f"output '{name}': this endpoint takes no shared memory")
    if array.dtype == object:  # BYTES (a classification): each element after its 4-byte length, as in a
        array = np.frombuffer(tensor_bytes(array), np.uint8)  # binary response; tritonclient's utilities read it so
    written = shared_memory.write_output(reference, name, array)
    parameters: dict[str, Any] = {"shared_memory_region": reference.region, "shared_memory_byte_size": written}
    if reference.offset:
        parameters["shared_memory_offset"] = reference.offset
    return parameters


def _output_entry(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> dict[str, Any]:
    """An output tensor's name, datatype and shape as a response's JSON header lists them."""
    return {"name": name, "datatype": datatype_of(dtype), "shape": list(shape)}
