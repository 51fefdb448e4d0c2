"""One engine build, end to end: the Python API behind `plansmith build` (and the operator and
`plansmith up`, which call `run_build` directly).

    fetch model (verify sha256) -> check ONNX and shapes -> target -> backend -> engine key
    -> cache hit?  yes: verify artifacts, report `hit` (nothing written)
                   no:  can the store be written? -> build -> accuracy gate -> benchmark
                        -> upload artifacts -> manifest (last)

Every failure is a `BuildResult` with status `failed` and a reason (see `errors`); nothing is
published for a failed build.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from plansmith import __version__ as PLANSMITH_VERSION
from plansmith.engine_key import build_options, effective_quantization, engine_key, manifest_uri
from plansmith.manifest import Manifest, ManifestTarget, SourceModel
from plansmith.onnxruntime_providers import CPU_PROVIDER
from plansmith.spec import InferenceModelSpec
from plansmith.storage import (
    IntegrityError,
    InvalidStorageUri,
    ObjectNotFound,
    StorageUnavailable,
    open_store,
)
from plansmith_builder.accuracy import gate_failure, gate_feeds, measure
from plansmith_builder.backends import BuildContext, resolve_backend
from plansmith_builder.backends.ort_backend import runner as ort_runner, session as ort_session
from plansmith_builder.benchmark import BenchmarkBudget, benchmark, reference_timing_provider
from plansmith_builder.calibration import load_calibration
from plansmith_builder.errors import BuildError
from plansmith_builder.modelcheck import inspect_model, load_model
from plansmith_builder.progress import Progress
from plansmith_builder.publish import artifact_for, check_publishable, find_engine, publish
from plansmith_builder.target import DetectedTarget, cpu_target, detect_target, target_from_override

log = logging.getLogger(__name__)


@dataclass
class BuildRequest:
    spec: InferenceModelSpec
    store_uri: str | None = None  # default: spec.storage.uri
    endpoint: str | None = None  # default: spec.storage.endpoint, then the environment
    backend: str | None = None  # auto | tensorrt | onnxruntime; default: spec.build.backend
    target: str = "auto"  # auto | cpu | a compute capability such as 9.0
    workdir: Path | None = None  # default: a temporary folder, removed afterwards
    benchmark: BenchmarkBudget = field(default_factory=BenchmarkBudget)
    detected: DetectedTarget | None = None  # default: detect_target()
    progress: Progress | None = None
    # the GPU named by `target` is simulated (plansmith dev-cluster): key the engine for it, but build
    # and run it on this machine's CPU, and say so in the manifest
    simulated_gpu: bool = False
    # the key the caller expects the engine under (the operator's Jobs: PLANSMITH_ENGINE_KEY); a
    # builder that keys it otherwise (another plansmith version) fails instead of publishing elsewhere
    expected_key: str | None = None


@dataclass
class BuildResult:
    status: str  # built | hit | failed
    key: str | None = None
    manifest_uri: str | None = None
    reason: str | None = None
    message: str = ""
    manifest: Manifest | None = None

    def to_dict(self) -> dict:
        return {"status": self.status, "key": self.key, "manifestUri": self.manifest_uri,
                "reason": self.reason, "message": self.message}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False, separators=(",", ":"))


def run_build(request: BuildRequest) -> BuildResult:
    """Build (or find) the engine for `request`; never raises for a build failure."""
    progress = request.progress or Progress(tty=False)
    state: dict[str, str | None] = {"key": None, "manifest_uri": None}
    try:
        if request.workdir is not None:
            request.workdir.mkdir(parents=True, exist_ok=True)
            return _run(request, Path(request.workdir), progress, state)
        with tempfile.TemporaryDirectory(prefix="plansmith-build-") as workdir:
            return _run(request, Path(workdir), progress, state)
    except BuildError as error:
        return BuildResult("failed", state["key"], state["manifest_uri"], error.reason, error.message)
    except StorageUnavailable as error:
        return BuildResult("failed", state["key"], state["manifest_uri"], "StorageUnavailable", str(error))
    except IntegrityError as error:
        return BuildResult("failed", state["key"], state["manifest_uri"], "IntegrityError", str(error))
    except ObjectNotFound as error:  # the engine store's bucket is missing: an operator may still create it
        return BuildResult("failed", state["key"], state["manifest_uri"], "StorageUnavailable",
                           f"engine store not found: {error}")
    except Exception as error:  # a bug or an unexpected library failure: reported, never a bare traceback
        log.error("unexpected build failure\n%s", traceback.format_exc())
        return BuildResult("failed", state["key"], state["manifest_uri"], "BuildFailed",
                           f"{type(error).__name__}: {error}")


def _fetch(store, uri: str, dest: Path, progress: Progress, what: str) -> str:
    callback = progress.transfer(f"download {what}")
    try:
        digest = store.download(uri, dest, callback)
    except ObjectNotFound:
        raise BuildError("ModelNotFound", f"{what} not found at {uri}") from None
    finally:
        progress.end_transfer()
    return digest


def _open(uri: str, endpoint: str | None, field_path: str):
    try:
        return open_store(uri, endpoint)
    except InvalidStorageUri as error:
        raise BuildError("InvalidSpec", f"{field_path}: {error}") from None


def _run(request: BuildRequest, workdir: Path, progress: Progress, state: dict) -> BuildResult:
    started = time.monotonic()
    spec = request.spec
    build = spec.build
    storage_uri = request.store_uri or spec.storage.uri
    if not storage_uri:
        raise BuildError("InvalidSpec", "no engine store: set spec.storage.uri or pass --store")
    endpoint = request.endpoint or spec.storage.endpoint
    engine_store = _open(storage_uri, endpoint, "--store" if request.store_uri else "spec.storage.uri")

    detected = request.detected or detect_target()
    try:
        detected = target_from_override(request.target, detected)
    except ValueError as error:
        raise BuildError("InvalidSpec", str(error)) from None
    target = detected.target  # what the engine is for: its key and the manifest's target
    run_target = target  # what it is built for and runs on
    if request.simulated_gpu:
        if target.device != "gpu":
            raise BuildError("InvalidSpec", "--simulated-gpu needs --target <compute capability>")
        run_target = cpu_target().target
        target = replace(target, simulated=True)  # keyed apart from a real GPU's engine
        progress.info("simulated GPU", target=target.name, runsOn=run_target.name)
    backend = resolve_backend(request.backend or build.backend, run_target)
    backend.check(build, run_target)
    backend_version = backend.version()
    progress.info("target and backend", target=target.name, backend=backend.name, version=backend_version)

    # ---- the model
    progress.phase("fetch", uri=spec.model.uri)
    model_store = _open(spec.model.uri, endpoint, "spec.model.uri")
    source_path = workdir / "source.onnx"
    source_sha256 = _fetch(model_store, spec.model.uri, source_path, progress, "model")
    if spec.model.sha256 and source_sha256 != spec.model.sha256:
        raise BuildError("IntegrityError", f"model at {spec.model.uri} has sha256 {source_sha256}, "
                                           f"spec.model.sha256 is {spec.model.sha256}")
    progress.done("fetch", sha256=source_sha256, bytes=source_path.stat().st_size)
    progress.phase("check")
    model = load_model(source_path.read_bytes())
    signature = inspect_model(model, spec.model.inputs)
    del model
    progress.done("check", opset=signature.opset, inputs=",".join(t.name for t in signature.inputs),
                  maxBatch=signature.max_batch_size)

    calibration = None
    calibration_sha256 = None
    if build.calibration is not None:
        progress.phase("fetch-calibration", uri=build.calibration.uri)
        calibration_path = workdir / "calibration.npz"
        calibration_store = _open(build.calibration.uri, endpoint, "spec.build.calibration.uri")
        calibration_sha256 = _fetch(calibration_store, build.calibration.uri, calibration_path, progress,
                                    "calibration data")
        calibration = load_calibration(calibration_path.read_bytes(), signature.inputs, build.calibration.samples)
        progress.done("fetch-calibration", sha256=calibration_sha256)

    # ---- the key, and a cache hit
    key_sha = calibration_sha256 if effective_quantization(build) == "calibrated" else None
    key = engine_key(source_sha256=source_sha256, build=build, inputs=spec.model.inputs, backend=backend.name,
                     backend_version=backend_version, target=target, calibration_sha256=key_sha)
    state["key"] = key
    state["manifest_uri"] = manifest_uri(storage_uri, key)
    if request.expected_key and request.expected_key != key:
        raise BuildError("KeyMismatch", f"this builder keys the engine {key}, the operator waits for "
                                        f"{request.expected_key}: the builder image and the operator are "
                                        "different plansmith versions; use the builder image of the operator's version")
    progress.phase("lookup", key=key)
    existing = find_engine(engine_store, storage_uri, key, workdir)
    if existing.manifest is not None:
        recorded = existing.manifest.accuracy
        if recorded is not None:
            failure = gate_failure(recorded, build.accuracy)
            if failure:
                raise BuildError("AccuracyGateFailed", f"the cached engine {key} (same bytes a rebuild would give) "
                                                       f"fails this spec's accuracy gate: {failure}")
        progress.done("lookup", result="hit")
        return BuildResult("hit", key, state["manifest_uri"], None, "engine already built and verified",
                           existing.manifest)
    if existing.problem:
        log.warning("rebuilding %s: %s", key, existing.problem)
    # Checked before building, not only when publishing: a TensorRT build can take an hour of GPU
    # time, and a store that refuses the upload fails the Job as StorageUnavailable, which is
    # retried, so every retry repeated the whole build. Only a miss is checked: a hit writes
    # nothing, and `plansmith serve` looks engines up through here with read-only credentials.
    check_publishable(engine_store, storage_uri, key)
    progress.done("lookup", result="miss")

    # ---- build, gate, benchmark
    progress.phase("build", backend=backend.name, precision=build.precision)
    build_dir = workdir / "build"
    build_dir.mkdir(exist_ok=True)
    built = backend.build(BuildContext(model_path=source_path, signature=signature, build=build, target=run_target,
                                       workdir=build_dir, calibration=calibration, store=engine_store,
                                       storage_uri=storage_uri))
    build_seconds = time.monotonic() - started
    progress.done("build", engine=built.files[0].name, bytes=built.files[0].path.stat().st_size)

    progress.phase("accuracy", samples=build.accuracy.samples)
    reference = ort_runner(ort_session(source_path, CPU_PROVIDER))
    feeds = gate_feeds(signature, build.accuracy.samples, calibration)
    try:
        accuracy = measure(reference, built.runner, feeds, build.accuracy)
    except ValueError as error:
        raise BuildError("BuildFailed", f"the engine's outputs do not match the model's: {error}") from None
    failure = gate_failure(accuracy, build.accuracy)
    if failure:
        raise BuildError("AccuracyGateFailed", f"engine fails the accuracy gate against the FP32 reference: {failure}")
    progress.done("accuracy", cosine=round(accuracy.cosine, 6), maxAbsError=f"{accuracy.max_abs_error:.3g}")

    progress.phase("benchmark")
    figures = benchmark(built.runner, _timed_reference(source_path, built.execution_provider, reference), signature,
                        request.benchmark)
    progress.done("benchmark", p50Ms=figures.batch1.p50_ms,
                  throughput=(figures.max_batch or figures.batch1).throughput)

    # ---- publish, manifest last
    progress.phase("publish", uri=state["manifest_uri"])
    artifacts = [artifact_for(f.path, f.name, f.role) for f in built.files]
    files = {artifact.name: f.path for artifact, f in zip(artifacts, built.files)}
    manifest = Manifest(
        key=key,
        backend=backend.name,
        backend_version=backend_version,
        target=ManifestTarget(
            device=target.device, compute_capability=target.compute_capability, gpu_product=target.gpu_product,
            driver_version=detected.driver_version, cpu_isa=run_target.cpu_isa, cpu_vendor=detected.cpu_vendor,
            hardware_compatibility=build.hardware_compatibility if backend.name == "tensorrt" else "none",
            execution_provider=built.execution_provider,
        ),
        precision=build.precision,
        quantization=effective_quantization(build),
        effective_precision=built.effective_precision if built.effective_precision != build.precision else None,
        build_options=build_options(build, spec.model.inputs, backend.name, target, calibration_sha256=key_sha),
        source=SourceModel(uri=spec.model.uri, sha256=source_sha256, opset=signature.opset),
        inputs=signature.inputs,
        outputs=signature.outputs,
        max_batch_size=signature.max_batch_size,
        artifacts=artifacts,
        accuracy=accuracy,
        benchmark=figures,
        build_seconds=round(build_seconds, 3),
        builder_version=PLANSMITH_VERSION,
        created_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    uri, ours = publish(engine_store, storage_uri, manifest, files, workdir, progress,
                        replace_broken=existing.problem is not None)
    if not ours:  # another build of this key published first: its engine is the key's
        earlier = find_engine(engine_store, storage_uri, key, workdir)
        if earlier.manifest is None:
            raise BuildError("StorageUnavailable", f"another build published {uri} first, and it does not verify: "
                                                   f"{earlier.problem}; a retry replaces it")
        progress.done("publish", result="hit", seconds_total=round(time.monotonic() - started, 3))
        return BuildResult("hit", key, uri, None, "another build of this key published first; its engine is kept",
                           earlier.manifest)
    progress.done("publish", seconds_total=round(time.monotonic() - started, 3))
    message = f"built {backend.name} {built.effective_precision} engine for {target.name}"
    if built.notes:
        message += " (" + "; ".join(built.notes) + ")"
    return BuildResult("built", key, uri, None, message, manifest)


def _timed_reference(source_path: Path, execution_provider: str | None, cpu_reference):
    """The FP32 reference to time beside the engine, on the engine's device (None: not timed)."""
    import onnxruntime

    provider = reference_timing_provider(execution_provider, onnxruntime.get_available_providers())
    if provider is None:
        return None
    if provider == CPU_PROVIDER:
        return cpu_reference  # the accuracy gate's session, already loaded
    return ort_runner(ort_session(source_path, provider))
