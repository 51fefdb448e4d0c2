"""The KServe v2 gRPC front end: Triton's GRPCInferenceService (messages and method names from
tritonclient's generated protobuf modules) served by `grpc_transport`."""

from __future__ import annotations

import logging

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from plansmith_runtime import __version__ as runtime_version
from plansmith_runtime.grpc_transport import GrpcError, GrpcServer, UnaryMethod
from plansmith_runtime.http_api import EXTENSIONS, INFERENCE_ERRORS, SERVER_NAME
from plansmith_runtime.model import ModelNotReady, ServedModel
from plansmith_runtime.protocol import InvalidRequest, ModelNotFound, array_from_bytes, array_from_json, datatype_of
from plansmith_runtime.scheduler import QueueFull, RequestTimedOut, ShuttingDown

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 << 20

# InferTensorContents field per datatype, for requests that send typed contents instead of raw bytes
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def grpc_status(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, RequestTimedOut):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, (QueueFull, ModelNotReady, ShuttingDown)):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def decode_grpc_inputs(request) -> dict[str, np.ndarray]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequest(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidRequest(f"input '{tensor.name}' is given twice")
        shape = list(tensor.shape)
        if raw:
            arrays[tensor.name] = array_from_bytes(tensor.name, tensor.datatype, shape, raw[index])
        else:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise InvalidRequest(f"input '{tensor.name}': datatype {tensor.datatype!r} needs raw_input_contents")
            arrays[tensor.name] = array_from_json(tensor.name, tensor.datatype, shape, list(getattr(tensor.contents, field)))
    return arrays


SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def grpc_error(error: BaseException) -> GrpcError:
    return GrpcError(grpc_status(error), str(error))


class InferenceService:
    """The GRPCInferenceService methods the server implements (Triton's other methods, for
    extensions it does not announce, answer UNIMPLEMENTED). Each takes the request message and
    returns the response, or a coroutine of it when the call waits (an inference)."""

    def __init__(self, model: ServedModel, is_ready) -> None:
        self.model = model
        self.is_ready = is_ready

    def methods(self) -> dict[str, UnaryMethod]:
        """Full method path ("/inference.GRPCInferenceService/ModelInfer") -> request type and handler."""
        implemented = {}
        for method in SERVICE.methods:
            handler = getattr(self, method.name, None)
            if handler is not None:
                implemented[f"/{SERVICE.full_name}/{method.name}"] = UnaryMethod(
                    getattr(service_pb2, method.input_type.name), handler)
        return implemented

    def _model(self, name: str, version: str) -> ServedModel:
        if name != self.model.name:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        self.model.check_version(version)
        return self.model

    def ServerLive(self, request):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request):
        return service_pb2.ServerReadyResponse(ready=self.is_ready())

    def ModelReady(self, request):
        try:
            model = self._model(request.name, request.version)
        except InvalidRequest as error:
            raise grpc_error(error) from None
        return service_pb2.ModelReadyResponse(ready=model.ready and self.is_ready())

    def ServerMetadata(self, request):
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=runtime_version, extensions=EXTENSIONS)

    def ModelMetadata(self, request):
        try:
            metadata = self._model(request.name, request.version).metadata()
        except (InvalidRequest, ModelNotReady) as error:
            raise grpc_error(error) from None
        response = service_pb2.ModelMetadataResponse(name=metadata["name"], versions=metadata["versions"],
                                                     platform=metadata["platform"])
        for tensor in metadata["inputs"]:
            response.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        for tensor in metadata["outputs"]:
            response.outputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        return response

    def ModelConfig(self, request):
        try:
            config = self._model(request.name, request.version).model_config()
            if config is None:
                raise ModelNotReady(f"model '{self.model.name}' is not ready: {self.model.reason}")
        except (InvalidRequest, ModelNotReady) as error:
            raise grpc_error(error) from None
        return service_pb2.ModelConfigResponse(config=config)

    async def ModelInfer(self, request):
        try:
            model = self._model(request.model_name, request.model_version)
            inputs = decode_grpc_inputs(request)
            wanted = [tensor.name for tensor in request.outputs]
            timeout = request.parameters["timeout"].int64_param if "timeout" in request.parameters else 0
            outputs = await model.infer(inputs, wanted, timeout)
        except INFERENCE_ERRORS as error:
            raise grpc_error(error) from None
        response = service_pb2.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for name, array in outputs.items():
            response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
        return response


def create_server(model: ServedModel, is_ready) -> GrpcServer:
    return GrpcServer(InferenceService(model, is_ready).methods(), MAX_MESSAGE_BYTES)
