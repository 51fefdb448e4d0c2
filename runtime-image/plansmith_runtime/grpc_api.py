"""The KServe v2 gRPC front end: Triton's GRPCInferenceService (messages and method names from
tritonclient's generated protobuf modules) served by `grpc_transport`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2

from plansmith_runtime import __version__ as runtime_version
from plansmith_runtime import tracing
from plansmith_runtime.classification import classify_outputs
from plansmith_runtime.cuda_shared_memory import CudaSharedMemory
from plansmith_runtime.grpc_transport import GrpcError, GrpcServer, Method, ObservedResponse, StreamingMethod, UnaryMethod
from plansmith_runtime.http_api import EXTENSIONS, INFERENCE_ERRORS, SERVER_NAME
from plansmith_runtime.log_settings import InvalidLogSetting, LogControl
from plansmith_runtime.model import ModelNotReady, ServedModel
from plansmith_runtime.protobuf_wire import split_bytes_field
from plansmith_runtime.protocol import (InvalidRequest, ModelNotFound, NotFound, SharedMemoryError, SharedMemoryInputs,
                                        SharedMemoryRegionExists,
                                        SharedMemoryReference, array_from_bytes, array_from_json, datatype_of,
                                        reference_from_parameters, requested_classes, tensor_bytes, tensor_layout,
                                        write_to_shared_memory)
from plansmith_runtime.scheduler import QueueFull, RequestTimedOut, ShuttingDown
from plansmith_runtime.shared_memory import SharedMemoryRegions, SystemSharedMemory
from plansmith_runtime.tracing import InvalidTraceSetting, TraceControl, TraceSettingNotSettable, changes_from_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 << 20

# InferTensorContents field per datatype, for requests that send typed contents instead of raw bytes
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def grpc_status(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, SharedMemoryRegionExists):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(error, NotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, RequestTimedOut):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, (QueueFull, ModelNotReady, ShuttingDown)):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def parameters_of(message) -> dict:
    """A protobuf map of InferParameter as plain values."""
    return {key: value for key, value in choices(message.parameters).items() if value is not None}


def choices(mapping) -> dict:
    """A protobuf map whose values hold a `parameter_choice` oneof (InferParameter, a log
    setting's SettingValue) as plain values; None for a value with nothing chosen."""
    return {key: getattr(value, choice) if (choice := value.WhichOneof("parameter_choice")) else None
            for key, value in mapping.items()}


@dataclass(frozen=True, slots=True)
class InferCall:
    """A ModelInferRequest as the inference methods take it: the message without its
    raw_input_contents, and those apart, as views of the received bytes (parse_infer_request)."""
    message: service_pb2.ModelInferRequest
    raw_input_contents: Sequence[bytes | memoryview]
    read_started_ns: int = 0  # time.monotonic_ns() when the transport began reading it
    traceparent: str | None = None  # the call's W3C trace context metadata (OpenTelemetry tracing)
    tracestate: str | None = None


RAW_INPUT_CONTENTS = service_pb2.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number


def parse_infer_request(data: bytes | memoryview, read_started_ns: int = 0, traceparent: str | None = None,
                        tracestate: str | None = None) -> InferCall:
    """Parse a ModelInferRequest without copying its tensors (protobuf_wire says why)."""
    split = split_bytes_field(data, RAW_INPUT_CONTENTS)
    if split is None:  # a message protobuf_wire does not walk: protobuf parses (and copies) it all
        message = service_pb2.ModelInferRequest.FromString(data)
        return InferCall(message, message.raw_input_contents, read_started_ns, traceparent, tracestate)
    rest, raw = split
    return InferCall(service_pb2.ModelInferRequest.FromString(rest), raw, read_started_ns, traceparent, tracestate)


def decode_grpc_inputs(request, shared_memory: SharedMemoryInputs | None = None,
                       raw_input_contents: Sequence[bytes | memoryview] | None = None) -> dict[str, np.ndarray]:
    """The request's inputs: from shared memory when an input names a region, else from typed
    `contents`, else from the raw input contents (`raw_input_contents`, default the message's),
    whose entries belong, in order, to the inputs that have neither (as in Triton)."""
    raw = request.raw_input_contents if raw_input_contents is None else raw_input_contents
    next_raw = 0
    arrays: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        if tensor.name in arrays:
            raise InvalidRequest(f"input '{tensor.name}' is given twice")
        shape = list(tensor.shape)
        in_shared_memory = ("shared_memory_region" in tensor.parameters
                            and reference_from_parameters(f"input '{tensor.name}'", parameters_of(tensor)))
        if in_shared_memory:
            if shared_memory is None:
                raise SharedMemoryError(f"input '{tensor.name}': this endpoint takes no shared memory")
            if tensor.HasField("contents"):
                raise InvalidRequest(f"input '{tensor.name}' names a shared memory region and also carries contents")
            arrays[tensor.name] = shared_memory.input_array(in_shared_memory, tensor.name,
                                                            *tensor_layout(tensor.name, tensor.datatype, shape))
        elif tensor.HasField("contents"):
            if raw:
                raise InvalidRequest(f"input '{tensor.name}': contents must not be given when raw_input_contents are used")
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None:
                raise InvalidRequest(f"input '{tensor.name}': datatype {tensor.datatype!r} needs raw_input_contents")
            arrays[tensor.name] = array_from_json(tensor.name, tensor.datatype, shape, list(getattr(tensor.contents, field)))
        elif next_raw < len(raw):
            arrays[tensor.name] = array_from_bytes(tensor.name, tensor.datatype, shape, raw[next_raw])
            next_raw += 1
        else:
            raise InvalidRequest(f"unable to find data for input '{tensor.name}' in the request")
    if next_raw != len(raw):
        raise InvalidRequest(f"{len(raw)} raw_input_contents for {next_raw} inputs that take raw contents")
    return arrays


SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]


def grpc_error(error: BaseException) -> GrpcError:
    return GrpcError(grpc_status(error), str(error))


def region_status(regions: SystemSharedMemory | CudaSharedMemory, name: str, response_type):
    """A {System,Cuda}SharedMemoryStatusResponse of `regions` (every one, or the one named)."""
    try:
        found = regions.status(name)
    except SharedMemoryError as error:
        raise grpc_error(error) from None
    response = response_type()
    for region in found:
        response.regions[region["name"]].CopyFrom(response_type.RegionStatus(**region))
    return response


def unregister(regions: SystemSharedMemory | CudaSharedMemory, name: str) -> None:
    """The region named, or every one when the request names none (Triton's reading)."""
    if name:
        regions.unregister(name)
    else:
        regions.unregister_all()


class InferenceService:
    """The GRPCInferenceService methods the server implements (Triton's other methods, for
    extensions it does not announce, answer UNIMPLEMENTED). Each takes the request message and
    returns the response, or a coroutine of it when the call waits (an inference)."""

    def __init__(self, model: ServedModel, is_ready, shared_memory: SharedMemoryRegions, log_control: LogControl,
                 trace_control: TraceControl) -> None:
        self.model = model
        self.is_ready = is_ready
        self.shared_memory = shared_memory  # the server's regions, shared with the HTTP front end
        self.log_control = log_control  # the process's log settings, shared with the HTTP front end
        self.trace_control = trace_control  # the trace settings and samplers, shared with the HTTP front end

    def methods(self) -> dict[str, Method]:
        """Full method path ("/inference.GRPCInferenceService/ModelInfer") -> request type and handler."""
        implemented: dict[str, Method] = {}
        for method in SERVICE.methods:
            handler = getattr(self, method.name, None)
            if handler is not None:
                kind = StreamingMethod if method.client_streaming else UnaryMethod
                request_type = getattr(service_pb2, method.input_type.name)
                parse = parse_infer_request if request_type is service_pb2.ModelInferRequest else None
                implemented[f"/{SERVICE.full_name}/{method.name}"] = kind(request_type, handler, parse)
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

    def ModelStatistics(self, request):
        try:
            model = self._model(request.name, request.version) if request.name else self.model
            model_stats = model.statistics(named=bool(request.name))
        except InvalidRequest as error:
            raise grpc_error(error) from None
        return json_format.ParseDict({"model_stats": model_stats}, service_pb2.ModelStatisticsResponse())

    def RepositoryIndex(self, request):
        response = service_pb2.RepositoryIndexResponse()
        for entry in self.model.repository_index(request.ready):
            response.models.add(**entry)
        return response

    def RepositoryModelLoad(self, request):
        raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, self.model.control_refusal(request.model_name, "load"))

    def RepositoryModelUnload(self, request):
        raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, self.model.control_refusal(request.model_name, "unload"))

    def SystemSharedMemoryStatus(self, request):
        return region_status(self.shared_memory.system, request.name, service_pb2.SystemSharedMemoryStatusResponse)

    def SystemSharedMemoryRegister(self, request):
        try:
            self.shared_memory.register_system(request.name, request.key, request.offset, request.byte_size)
        except SharedMemoryError as error:
            raise grpc_error(error) from None
        return service_pb2.SystemSharedMemoryRegisterResponse()

    def SystemSharedMemoryUnregister(self, request):
        unregister(self.shared_memory.system, request.name)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    def CudaSharedMemoryStatus(self, request):
        return region_status(self.shared_memory.cuda, request.name, service_pb2.CudaSharedMemoryStatusResponse)

    def CudaSharedMemoryRegister(self, request):
        try:
            self.shared_memory.register_cuda(request.name, request.raw_handle, request.device_id, request.byte_size)
        except SharedMemoryError as error:
            raise grpc_error(error) from None
        return service_pb2.CudaSharedMemoryRegisterResponse()

    def CudaSharedMemoryUnregister(self, request):
        unregister(self.shared_memory.cuda, request.name)
        return service_pb2.CudaSharedMemoryUnregisterResponse()

    def LogSettings(self, request):
        """Triton's logging extension: the settings a request names are changed (none: read them).
        A setting named without a value is refused, as Triton refuses it ("expect boolean for ...")."""
        changes = choices(request.settings)
        if unset := sorted(name for name, value in changes.items() if value is None):
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, f"log settings named without a value: {unset}")
        try:
            settings = self.log_control.update(changes)
        except InvalidLogSetting as error:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        response = service_pb2.LogSettingsResponse()
        for name, value in settings.items():
            if isinstance(value, bool):
                response.settings[name].bool_param = value
            elif isinstance(value, int):
                response.settings[name].uint32_param = value
            else:
                response.settings[name].string_param = value
        return response

    def TraceSetting(self, request):
        """Triton's trace extension: the settings a request names are changed (none: read them), for
        the model it names or globally; a setting without values is cleared."""
        model = request.model_name or None
        try:
            settings = self.trace_control.update(model, changes_from_grpc(
                {name: value.value for name, value in request.settings.items()}))
        except TraceSettingNotSettable as error:
            raise GrpcError(grpc.StatusCode.UNIMPLEMENTED, str(error)) from None
        except InvalidTraceSetting as error:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        response = service_pb2.TraceSettingResponse()
        for name, value in settings.items():
            response.settings[name].value.extend(value if isinstance(value, list) else [value])
        return response

    async def ModelInfer(self, call: InferCall):
        request = call.message
        trace = self.trace_control.start(request.model_name, request.id, call.traceparent, call.tracestate)
        if trace is not None:
            trace.stamp(tracing.GRPC_WAITREAD_START, call.read_started_ns)
            trace.stamp(tracing.GRPC_WAITREAD_END, time.monotonic_ns())
        try:
            try:
                model = self._model(request.model_name, request.model_version)
                inputs = decode_grpc_inputs(request, self.shared_memory, call.raw_input_contents)
                wanted = [tensor.name for tensor in request.outputs]
                in_shared_memory = {tensor.name: reference_from_parameters(f"output '{tensor.name}'", parameters_of(tensor))
                                    for tensor in request.outputs if "shared_memory_region" in tensor.parameters}
                classifications = {tensor.name: count for tensor in request.outputs if "classification" in tensor.parameters
                                   and (count := requested_classes(tensor.name, parameters_of(tensor)))}
                timeout = request.parameters["timeout"].int64_param if "timeout" in request.parameters else 0
                destinations = self.shared_memory.output_destinations(in_shared_memory) if in_shared_memory else None

                def respond(outputs: dict[str, np.ndarray]) -> service_pb2.ModelInferResponse:
                    if classifications:
                        outputs = classify_outputs(outputs, classifications, model.has_batch_dim)
                    return self._infer_response(model, request.id, outputs, in_shared_memory)

                response = await model.infer(inputs, wanted, timeout, trace, destinations, respond)
            except INFERENCE_ERRORS as error:
                raise grpc_error(error) from None
        except BaseException:  # answered with an error status, or cancelled: the trace ends without a send
            if trace is not None:
                trace.finish()
            raise
        if trace is None:
            return response
        trace.stamp(tracing.INFER_RESPONSE_COMPLETE, time.monotonic_ns())
        return ObservedResponse(response, trace.sent_over_grpc)

    def _infer_response(self, model: ServedModel, request_id: str, outputs: dict[str, np.ndarray],
                        in_shared_memory: dict[str, SharedMemoryReference | None]) -> service_pb2.ModelInferResponse:
        response = service_pb2.ModelInferResponse(model_name=model.name, model_version=model.version, id=request_id)
        for name, array in outputs.items():
            tensor = response.outputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
            reference = in_shared_memory.get(name)
            if reference is None:
                response.raw_output_contents.append(tensor_bytes(array))
                continue
            parameters = write_to_shared_memory(self.shared_memory, reference, name, array)
            for key, value in parameters.items():
                if isinstance(value, str):
                    tensor.parameters[key].string_param = value
                else:
                    tensor.parameters[key].int64_param = value
            response.raw_output_contents.append(b"")  # Triton keeps one entry per output, empty for shared memory
        return response

    async def ModelStreamInfer(self, call: InferCall):
        """One request of the bidirectional stream tritonclient's start_stream / stream_infer open.
        As in Triton, a request that fails is answered on the stream with its error_message, and
        the stream goes on; the answer carries the request's id (and model), as Triton's does "so
        that client knows which request failed". Answers come in request order (StreamingMethod)."""
        try:
            response = await self.ModelInfer(call)
        except GrpcError as error:
            request = call.message
            failed = service_pb2.ModelInferResponse(id=request.id, model_name=request.model_name,
                                                    model_version=request.model_version)
            return service_pb2.ModelStreamInferResponse(error_message=error.message, infer_response=failed)
        if type(response) is ObservedResponse:  # a traced request
            return response._replace(message=service_pb2.ModelStreamInferResponse(infer_response=response.message))
        return service_pb2.ModelStreamInferResponse(infer_response=response)


def create_server(model: ServedModel, is_ready, shared_memory: SharedMemoryRegions, log_control: LogControl,
                  trace_control: TraceControl) -> GrpcServer:
    service = InferenceService(model, is_ready, shared_memory, log_control, trace_control)
    return GrpcServer(service.methods(), MAX_MESSAGE_BYTES)
