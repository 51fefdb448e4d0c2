"""The TensorRT backend: applies a `trt_plan.TensorRTPlan` to the TensorRT 10 Python API.

TensorRT is imported lazily (only the builder image has it; GUIDE.md §3). This adapter is kept
thin on purpose: every decision is in `trt_plan`, which is unit-tested without TensorRT. The
engine runs through polygraphy's TrtRunner for the accuracy gate and the benchmark, and int8
calibration uses polygraphy's Calibrator (it manages the device buffers TensorRT's calibrator
interface needs).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Final

from plansmith.engine_key import EngineTarget
from plansmith.spec import BuildSpec
from plansmith.storage import ObjectNotFound, sha256_file
from plansmith_builder.backends.base import BuildContext, BuiltEngine, BuiltFile
from plansmith_builder.backends.trt_plan import TensorRTPlan, plan_trt_build
from plansmith_builder.calibration import batch_size_for, batches
from plansmith_builder.errors import BuildError

log = logging.getLogger(__name__)

ENGINE_FILE = "model.plan"


class TensorRTBackend:
    name: Final = "tensorrt"

    def version(self) -> str:
        import tensorrt

        return tensorrt.__version__

    def check(self, build: BuildSpec, target: EngineTarget) -> None:
        plan_trt_build(build, target, [], tensorrt_version=self.version(), storage_uri=None)

    def build(self, context: BuildContext) -> BuiltEngine:
        import tensorrt as trt

        plan = plan_trt_build(context.build, context.target, context.signature.inputs,
                              tensorrt_version=self.version(), storage_uri=context.storage_uri)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(context.model_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BuildError("UnsupportedModel", f"TensorRT's ONNX parser rejected the model: {errors}")
        config = builder.create_builder_config()
        self._apply(trt, builder, config, plan, context)
        cache_bytes = self._load_timing_cache(context, plan)
        cache = config.create_timing_cache(cache_bytes or b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            # a cache from another device or TensorRT build: start a fresh one rather than mix tactics
            log.warning("timing cache at %s does not match this GPU/TensorRT; starting a new one", plan.timing_cache_uri)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BuildError("BuildFailed", "TensorRT could not build the engine (see the builder log for the "
                                            "layer it failed on)")
        engine_path = context.workdir / ENGINE_FILE
        engine_path.write_bytes(bytes(serialized))
        self._save_timing_cache(context, plan, bytes(config.get_timing_cache().serialize()))
        return BuiltEngine(files=[BuiltFile(engine_path, ENGINE_FILE, "engine")],
                           runner=self._runner(engine_path), effective_precision=plan.effective_precision)

    @staticmethod
    def _apply(trt, builder, config, plan: TensorRTPlan, context: BuildContext) -> None:
        for flag in plan.flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
        config.builder_optimization_level = plan.builder_optimization_level
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, plan.hardware_compatibility_level)
        profile = None
        if plan.profile:
            profile = builder.create_optimization_profile()
            for shape in plan.profile:
                profile.set_shape(shape.name, shape.min, shape.opt, shape.max)
            config.add_optimization_profile(profile)
        if plan.calibrate:
            if context.calibration is None:
                raise BuildError("InvalidSpec", "calibrated int8 needs spec.build.calibration")
            try:
                from polygraphy.backend.trt import Calibrator
            except ImportError as error:
                raise BuildError("BackendUnavailable", f"int8 calibration needs polygraphy: {error}") from None
            inputs = context.signature.inputs
            fixed = any(t.shape[0] != -1 for t in inputs)
            loader = list(batches(context.calibration, batch_size_for(inputs), exact=fixed))
            config.int8_calibrator = Calibrator(loader)
            if profile is not None:
                config.set_calibration_profile(profile)

    @staticmethod
    def _load_timing_cache(context: BuildContext, plan: TensorRTPlan) -> bytes | None:
        if not plan.timing_cache_uri or context.store is None:
            return None
        try:
            data = context.store.read_bytes(plan.timing_cache_uri)
        except ObjectNotFound:
            log.info("no timing cache at %s yet; TensorRT starts a new one", plan.timing_cache_uri)
            return None
        log.info("timing cache loaded from %s (%d bytes)", plan.timing_cache_uri, len(data))
        return data

    @staticmethod
    def _save_timing_cache(context: BuildContext, plan: TensorRTPlan, data: bytes) -> None:
        if not plan.timing_cache_uri or context.store is None or not data:
            return
        with tempfile.NamedTemporaryFile(dir=context.workdir, suffix=".cache", delete=False) as handle:
            handle.write(data)
        path = Path(handle.name)
        context.store.upload(path, plan.timing_cache_uri, sha256_file(path))
        log.info("timing cache saved to %s (%d bytes)", plan.timing_cache_uri, len(data))

    @staticmethod
    def _runner(engine_path: Path):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        trt_runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
        trt_runner.activate()

        def run(feeds):
            return {name: value.copy() for name, value in trt_runner.infer(feeds).items()}

        return run
