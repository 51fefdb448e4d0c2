"""Operator-wide settings, read once at start-up from PLANSMITH_* environment variables
(the Helm chart sets them from its values; see charts/plansmith/values.yaml).

| variable | meaning | default |
|---|---|---|
| PLANSMITH_BUILDER_IMAGE | image of the build Jobs | plansmith/builder:dev |
| PLANSMITH_BUILDER_BACKEND | engine backend that image builds with: tensorrt or onnxruntime | onnxruntime |
| PLANSMITH_BUILDER_BACKEND_VERSION | that backend's version (TensorRT version for tensorrt images); part of every engine key, so changing it rebuilds every engine once per GPU type | the installed onnxruntime's version |
| PLANSMITH_BUILDER_IMAGES | JSON map backend version -> image, for fleets that pin several TensorRT versions | {} |
| PLANSMITH_RUNTIME_IMAGE | image of the serving pods (runtime: plansmith) | plansmith/runtime:dev |
| PLANSMITH_TRITON_IMAGE | image of the serving pods (runtime: triton) | nvcr.io/nvidia/tritonserver:24.08-py3 |
| PLANSMITH_IMAGE_PULL_POLICY | pull policy of the pods plansmith creates | IfNotPresent |
| PLANSMITH_STORAGE_URI | engine storage when spec.storage.uri is unset | (none: spec must set it) |
| PLANSMITH_S3_ENDPOINT | S3 endpoint when spec.storage.endpoint is unset | (AWS) |
| PLANSMITH_STORAGE_SECRET | Secret with S3 credentials when spec.storage.secretRef is unset | (none) |
| PLANSMITH_MIG_STRATEGY | MIG strategy of nodes without the nvidia.com/mig.strategy label: none, single, mixed | single |
| PLANSMITH_BUILD_CONCURRENCY | build Jobs running at once, per operator | 4 |
| PLANSMITH_BUILD_BACKOFF_LIMIT | retries of a failed build pod | 1 |
| PLANSMITH_GPU_PRODUCT_LABEL | node label with the GPU product | nvidia.com/gpu.product |
| PLANSMITH_GPU_COMPUTE_MAJOR_LABEL / _MINOR_LABEL | node labels with the compute capability | nvidia.com/gpu.compute.major / .minor |
| PLANSMITH_CPU_FALLBACK | build an onnxruntime CPU engine when the cluster has no GPU node | true |
| PLANSMITH_SIMULATED_GPUS | the cluster's GPUs are simulated (plansmith dev-cluster): engines are keyed per GPU type but built and served on the CPU (`plansmith build --simulated-gpu`) | false |
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal, Mapping


def _installed_onnxruntime_version() -> str:
    try:
        from importlib.metadata import version

        return version("onnxruntime")
    except Exception:  # noqa: BLE001 - not installed in the operator image: a default must be configured
        return "unknown"


@dataclass(frozen=True)
class OperatorSettings:
    builder_image: str = "plansmith/builder:dev"
    builder_backend: Literal["tensorrt", "onnxruntime"] = "onnxruntime"
    builder_backend_version: str = "unknown"
    builder_images: Mapping[str, str] = field(default_factory=dict)
    runtime_image: str = "plansmith/runtime:dev"
    triton_image: str = "nvcr.io/nvidia/tritonserver:24.08-py3"
    image_pull_policy: str = "IfNotPresent"
    storage_uri: str | None = None
    s3_endpoint: str | None = None
    storage_secret: str | None = None
    mig_strategy: Literal["none", "single", "mixed"] = "single"
    build_concurrency: int = 4
    build_backoff_limit: int = 1
    gpu_product_label: str = "nvidia.com/gpu.product"
    gpu_compute_major_label: str = "nvidia.com/gpu.compute.major"
    gpu_compute_minor_label: str = "nvidia.com/gpu.compute.minor"
    mig_strategy_label: str = "nvidia.com/mig.strategy"
    cpu_fallback: bool = True
    simulated_gpus: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OperatorSettings":
        env = os.environ if env is None else env
        get = lambda name, default=None: env.get(f"PLANSMITH_{name}") or default  # noqa: E731
        backend = get("BUILDER_BACKEND", "onnxruntime")
        if backend not in ("tensorrt", "onnxruntime"):
            raise ValueError(f"PLANSMITH_BUILDER_BACKEND must be tensorrt or onnxruntime, got {backend!r}")
        version = get("BUILDER_BACKEND_VERSION") or (_installed_onnxruntime_version() if backend == "onnxruntime" else None)
        if not version:
            raise ValueError("PLANSMITH_BUILDER_BACKEND_VERSION is required for a tensorrt builder image")
        strategy = get("MIG_STRATEGY", "single")
        if strategy not in ("none", "single", "mixed"):
            raise ValueError(f"PLANSMITH_MIG_STRATEGY must be none, single or mixed, got {strategy!r}")
        return cls(
            builder_image=get("BUILDER_IMAGE", cls.builder_image),
            builder_backend=backend,
            builder_backend_version=version,
            builder_images=json.loads(get("BUILDER_IMAGES", "{}")),
            runtime_image=get("RUNTIME_IMAGE", cls.runtime_image),
            triton_image=get("TRITON_IMAGE", cls.triton_image),
            image_pull_policy=get("IMAGE_PULL_POLICY", cls.image_pull_policy),
            storage_uri=get("STORAGE_URI"),
            s3_endpoint=get("S3_ENDPOINT"),
            storage_secret=get("STORAGE_SECRET"),
            mig_strategy=strategy,
            build_concurrency=int(get("BUILD_CONCURRENCY", "4")),
            build_backoff_limit=int(get("BUILD_BACKOFF_LIMIT", "1")),
            gpu_product_label=get("GPU_PRODUCT_LABEL", cls.gpu_product_label),
            gpu_compute_major_label=get("GPU_COMPUTE_MAJOR_LABEL", cls.gpu_compute_major_label),
            gpu_compute_minor_label=get("GPU_COMPUTE_MINOR_LABEL", cls.gpu_compute_minor_label),
            mig_strategy_label=get("MIG_STRATEGY_LABEL", cls.mig_strategy_label),
            cpu_fallback=get("CPU_FALLBACK", "true").lower() in ("1", "true", "yes"),
            simulated_gpus=get("SIMULATED_GPUS", "false").lower() in ("1", "true", "yes"),
        )

    def builder_image_for(self, backend_version: str) -> str:
        return self.builder_images.get(backend_version, self.builder_image)
