"""A stock Triton model repository for `serving.runtime: triton`, as a pure function of the spec
and the engine manifests (one per target):

    <model>/config.pbtxt
    <model>/1/model.onnx                       onnxruntime engine
    <model>/1/model.plan                       one TensorRT plan (one GPU type, or ampere+)
    <model>/1/model_sm86.plan, model_sm90.plan plans for several compute capabilities, chosen by
                                               Triton through cc_model_filenames

The result lists the text files to write and, for each engine file, which manifest artifact to
copy there (the caller downloads and verifies it like the runtime does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from plansmith.manifest import Manifest
from plansmith.engine_key import engine_prefix
from plansmith.spec import InferenceModelSpec
from plansmith.storage import IntegrityError, join, open_store
from plansmith_runtime.config import ServingConfig, check_against_engine, policy_from_spec
from plansmith_runtime.model_config import build_model_config

VERSION = "1"


class RepositoryError(ValueError):
    """The manifests cannot be served as one Triton model."""


@dataclass(frozen=True)
class EngineFile:
    manifest: Manifest
    artifact: str  # artifact name in the manifest's folder


@dataclass
class TritonRepository:
    files: dict[str, str] = field(default_factory=dict)  # relative path -> text
    engines: dict[str, EngineFile] = field(default_factory=dict)  # relative path -> artifact to copy there


def plan_filename(manifest: Manifest) -> str:
    capability = manifest.target.compute_capability or ""
    return f"model_sm{capability.replace('.', '')}.plan"


def render_repository(name: str, spec: InferenceModelSpec, manifests: list[Manifest]) -> TritonRepository:
    if not manifests:
        raise RepositoryError("no engine manifests to render")
    first = manifests[0]
    for manifest in manifests[1:]:
        if manifest.backend != first.backend:
            raise RepositoryError(f"engines mix backends ({first.backend}, {manifest.backend}); Triton needs one platform")
        if manifest.inputs != first.inputs or manifest.outputs != first.outputs:
            raise RepositoryError(f"engine {manifest.key} has other inputs or outputs than {first.key}")
    serving = spec.serving
    policy = policy_from_spec(serving)
    for manifest in manifests:
        check_against_engine(policy, manifest.max_batch_size)
    config = ServingConfig(model_name=name, policy=policy, instances=serving.instances,
                           warmup_enabled=serving.warmup.enabled, warmup_iterations=serving.warmup.iterations,
                           response_cache_bytes=serving.response_cache.size_bytes if serving.response_cache else 0)
    repository = TritonRepository()
    cc_files: dict[str, str] = {}
    default_name: str | None = None
    if first.backend == "onnxruntime":
        if len(manifests) > 1:
            raise RepositoryError("several ONNX Runtime engines for one model; render one per target")
        default_name = "model.onnx"
        repository.engines[f"{name}/{VERSION}/model.onnx"] = EngineFile(first, first.artifact("engine").name)
    elif len(manifests) == 1:
        default_name = "model.plan"
        repository.engines[f"{name}/{VERSION}/model.plan"] = EngineFile(first, first.artifact("engine").name)
    else:
        for manifest in manifests:
            capability = manifest.target.compute_capability
            if not capability:
                raise RepositoryError(f"engine {manifest.key} has no compute capability to select it by")
            if capability in cc_files:
                raise RepositoryError(f"two engines for compute capability {capability}")
            filename = plan_filename(manifest)
            cc_files[capability] = filename
            repository.engines[f"{name}/{VERSION}/{filename}"] = EngineFile(manifest, manifest.artifact("engine").name)
    message = build_model_config(name, first, config, kind_gpu=first.target.device == "gpu",
                                 default_model_filename=default_name, cc_model_filenames=cc_files)
    from google.protobuf import text_format

    repository.files[f"{name}/config.pbtxt"] = text_format.MessageToString(message)
    return repository


def write_repository(repository: TritonRepository, destination: Path, storage_uri: str,
                     endpoint: str | None = None) -> list[Path]:
    """Materialize a rendered repository under `destination` (e.g. an init container filling the
    volume Triton's --model-repository points at): the text files, and every engine file
    downloaded from `<storage>/engines/<key>/` and verified against its manifest's sha256."""
    written = []
    for relative, text in repository.files.items():
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        written.append(target)
    store = open_store(storage_uri, endpoint)
    for relative, engine in repository.engines.items():
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        source = join(engine_prefix(storage_uri, engine.manifest.key), engine.artifact)
        expected = next(a.sha256 for a in engine.manifest.artifacts if a.name == engine.artifact)
        if store.download(source, target) != expected:
            target.unlink(missing_ok=True)
            raise IntegrityError(f"{source} does not match the manifest's sha256 {expected}")
        written.append(target)
    return written
