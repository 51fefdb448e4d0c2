"""The backend interface and the choice of backend for a target."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Protocol

import numpy as np

from plansmith.engine_key import EngineTarget
from plansmith.spec import BuildSpec
from plansmith.storage import Store
from plansmith_builder.errors import BuildError
from plansmith_builder.modelcheck import ModelSignature

log = logging.getLogger(__name__)

ArtifactRole = Literal["engine", "timing-cache", "reference", "other"]
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class BuildContext:
    """Everything a backend needs to build one engine."""

    model_path: Path  # the verified original ONNX file
    signature: ModelSignature
    build: BuildSpec
    target: EngineTarget
    workdir: Path
    calibration: dict[str, np.ndarray] | None = None
    store: Store | None = None  # for backend caches kept in the engine store (TensorRT timing cache)
    storage_uri: str | None = None


@dataclass
class BuiltFile:
    path: Path
    name: str  # file name in the engine folder
    role: ArtifactRole = "engine"


@dataclass
class BuiltEngine:
    """A built engine: its files (the first is the engine) and a runner executing it."""

    files: list[BuiltFile]
    runner: Runner
    effective_precision: str
    execution_provider: str | None = None
    notes: list[str] = field(default_factory=list)


class EngineBackend(Protocol):
    @property
    def name(self) -> Literal["tensorrt", "onnxruntime"]: ...

    def version(self) -> str: ...

    def check(self, build: BuildSpec, target: EngineTarget) -> None:
        """Raise BuildError (UnsupportedModel, BackendUnavailable) when this backend cannot build
        `build` for `target`, before any work is done."""
        ...

    def build(self, context: BuildContext) -> BuiltEngine: ...


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def resolve_backend(requested: str, target: EngineTarget) -> EngineBackend:
    """The backend for `requested` (auto, tensorrt, onnxruntime) on `target`.

    auto: TensorRT for GPU targets when the image has it, else ONNX Runtime. TensorRT never builds
    for a CPU target; ONNX Runtime builds for a GPU target only with its CUDA execution provider."""
    from plansmith_builder.backends.ort_backend import OnnxRuntimeBackend
    from plansmith_builder.backends.trt_backend import TensorRTBackend

    if requested == "auto":
        requested = "tensorrt" if target.device == "gpu" and tensorrt_available() else "onnxruntime"
    if requested == "tensorrt":
        if target.device != "gpu":
            raise BuildError("BackendUnavailable", "TensorRT builds engines for GPUs only, and the target is "
                                                   f"{target.name}; use backend onnxruntime or a GPU node")
        if not tensorrt_available():
            raise BuildError("BackendUnavailable", "backend tensorrt was asked for, but the tensorrt Python "
                                                   "package is not installed here (use the plansmith builder image)")
        return TensorRTBackend()
    if requested == "onnxruntime":
        backend = OnnxRuntimeBackend()
        backend.require_provider(target)
        return backend
    raise BuildError("InvalidSpec", f"unknown backend {requested!r} (auto, tensorrt, onnxruntime)")
