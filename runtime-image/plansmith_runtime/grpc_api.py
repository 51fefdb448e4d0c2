"""The KServe v2 gRPC front end (grpc.aio) with Triton's GRPCInferenceService stubs from tritonclient."""

from __future__ import annotations

import logging

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from plansmith_runtime import __version__ as runtime_version
from plansmith_runtime.http_api import EXTENSIONS, SERVER_NAME
from plansmith_runtime.model import ModelNotReady, ServedModel
from plansmith_runtime.protocol import InvalidRequest, ModelNotFound, array_from_bytes, array_from_json, datatype_of
from plansmith_runtime.scheduler import ExecutionFailed, QueueFull, RequestTimedOut, ShuttingDown

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


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: ServedModel, is_ready) -> None:
        self.model = model
        self.is_ready = is_ready

    def _model(self, name: str, version: str) -> ServedModel:
        if name != self.model.name:
            raise ModelNotFound(f"Request for unknown model: '{name}' is not found")
        self.model.check_version(version)
        return self.model

    async def _abort(self, context, error: BaseException):
        await context.abort(grpc_status(error), str(error))

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(self, request, context):
        try:
            model = self._model(request.name, request.version)
        except InvalidRequest as error:
            await self._abort(context, error)
        return service_pb2.ModelReadyResponse(ready=model.ready and self.is_ready())

    async def ServerMetadata(self, request, context):
        return service_pb2.ServerMetadataResponse(name=SERVER_NAME, version=runtime_version, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        try:
            metadata = self._model(request.name, request.version).metadata()
        except (InvalidRequest, ModelNotReady) as error:
            await self._abort(context, error)
        response = service_pb2.ModelMetadataResponse(name=metadata["name"], versions=metadata["versions"],
                                                     platform=metadata["platform"])
        for tensor in metadata["inputs"]:
            response.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        for tensor in metadata["outputs"]:
            response.outputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        return response

    async def ModelConfig(self, request, context):
        try:
            config = self._model(request.name, request.version).model_config()
            if config is None:
                raise ModelNotReady(f"model '{self.model.name}' is not ready: {self.model.reason}")
        except (InvalidRequest, ModelNotReady) as error:
            await self._abort(context, error)
        return service_pb2.ModelConfigResponse(config=config)

    async def ModelInfer(self, request, context):
        try:
            model = self._model(request.model_name, request.model_version)
            inputs = decode_grpc_inputs(request)
            wanted = [tensor.name for tensor in request.outputs]
            timeout = request.parameters["timeout"].int64_param if "timeout" in request.parameters else 0
            outputs = await model.infer(inputs, wanted, timeout)
        except (InvalidRequest, ModelNotReady, QueueFull, ShuttingDown, RequestTimedOut, ExecutionFailed) as error:
            await self._abort(context, error)
        response = service_pb2.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for name, array in outputs.items():
            response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
            response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
        return response


def create_server(model: ServedModel, is_ready, address: str) -> grpc.aio.Server:
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(model, is_ready), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:  # grpcio >= 1.6x raises instead of returning 0
        raise OSError(f"cannot listen on {address} (gRPC): {error}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address} (gRPC)")
    return server
