"""Triton's model configuration (model_config.proto) for an engine and its serving settings.

One function builds the `ModelConfig` message; the runtime returns it from
/v2/models/{name}/config (as JSON) and gRPC ModelConfig, and the Triton repository renderer
writes it as config.pbtxt, so what our runtime reports and what stock Triton would load agree.
"""

from __future__ import annotations

import numpy as np

from plansmith.manifest import Manifest, TensorSpec
from plansmith_runtime.config import ServingConfig
from plansmith_runtime.protocol import DATATYPE_TO_CONFIG, datatype_of

PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}


def platform_of(manifest: Manifest) -> str:
    return PLATFORMS[manifest.backend]


def config_dims(tensor: TensorSpec, has_batch_dim: bool) -> list[int]:
    """Triton leaves the batch dimension out of dims when max_batch_size > 0."""
    return list(tensor.shape[1:] if has_batch_dim else tensor.shape)


def _warmup_dims(tensor: TensorSpec, has_batch_dim: bool) -> list[int]:
    dims = config_dims(tensor, has_batch_dim)
    hint = (tensor.opt_shape or tensor.min_shape or [])
    hint = hint[1:] if has_batch_dim else hint
    return [d if d >= 0 else (hint[i] if i < len(hint) else 1) for i, d in enumerate(dims)] or [1]


def _add_tensor(tensors, tensor: TensorSpec, has_batch_dim: bool, mc) -> None:
    """An input or output of a ModelConfig. Triton refuses empty dims (ValidateIOShape: "must specify
    'dims'"): a tensor that is one value an item (a label, a score) is dims [1] reshaped to []."""
    dims = config_dims(tensor, has_batch_dim)
    added = tensors.add(name=tensor.name, data_type=getattr(mc, DATATYPE_TO_CONFIG[datatype_of(tensor.dtype)]),
                        dims=dims or [1])
    if not dims:
        added.reshape.SetInParent()


def build_model_config(name: str, manifest: Manifest, serving: ServingConfig, *, kind_gpu: bool | None = None,
                       default_model_filename: str | None = None, cc_model_filenames: dict[str, str] | None = None):
    from tritonclient.grpc import model_config_pb2 as mc

    policy = serving.policy
    has_batch_dim = policy.max_batch_size > 0
    config = mc.ModelConfig(name=name, platform=platform_of(manifest), max_batch_size=policy.max_batch_size)
    for tensor in manifest.inputs:
        _add_tensor(config.input, tensor, has_batch_dim, mc)
    for tensor in manifest.outputs:
        _add_tensor(config.output, tensor, has_batch_dim, mc)
    if policy.batching:
        dynamic = config.dynamic_batching
        dynamic.preferred_batch_size.extend(policy.preferred_batch_sizes)
        dynamic.max_queue_delay_microseconds = policy.max_queue_delay_us
        dynamic.default_queue_policy.max_queue_size = serving.queue_limit
        if policy.timeout_us:
            dynamic.default_queue_policy.default_timeout_microseconds = policy.timeout_us
            dynamic.default_queue_policy.timeout_action = mc.ModelQueuePolicy.REJECT
    if serving.response_cache_bytes:
        config.response_cache.enable = True
    gpu = manifest.target.device == "gpu" if kind_gpu is None else kind_gpu
    config.instance_group.add(count=serving.instances,
                              kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU)
    if serving.warmup_enabled:
        for size in serving.warmup_batch_sizes():
            warmup = config.model_warmup.add(name=f"warmup_batch_{size}", batch_size=max(size, 1),
                                             count=serving.warmup_iterations)
            for tensor in manifest.inputs:
                warmup.inputs[tensor.name].data_type = getattr(mc, DATATYPE_TO_CONFIG[datatype_of(tensor.dtype)])
                warmup.inputs[tensor.name].dims.extend(_warmup_dims(tensor, has_batch_dim))
                # random bytes are fine values for a float, not for token ids an embedding gathers
                # with: Triton's warmup fails on them (zeros, as ServedModel's warmup_inputs uses)
                if np.dtype(tensor.dtype).kind == "f":
                    warmup.inputs[tensor.name].random_data = True
                else:
                    warmup.inputs[tensor.name].zero_data = True
    if default_model_filename:
        config.default_model_filename = default_model_filename
    for capability, filename in (cc_model_filenames or {}).items():
        config.cc_model_filenames[capability] = filename
    return config


def config_as_json(config) -> dict:
    """Triton's JSON rendering of a model config (what GET /v2/models/{name}/config returns)."""
    from google.protobuf import json_format

    return json_format.MessageToDict(config, preserving_proto_field_name=True)
