"""The ONNX Runtime backend (runs on any machine): simplify, convert or quantize, then save ONNX
Runtime's offline-optimized model as the engine (`model.onnx`). See `ort_plan` for the decisions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from plansmith.engine_key import EngineTarget
from plansmith.spec import BuildSpec
from plansmith.onnxruntime_providers import (
    CUDA_PROVIDER,
    CUDA_PROVIDER_OPTIONS,
    ProviderUnavailable,
    check_providers,
    preload_cuda_libraries,
)
from plansmith_builder.backends.base import BuildContext, BuiltEngine, BuiltFile, Runner
from plansmith_builder.backends.ort_plan import plan_ort_build
from plansmith_builder.calibration import batch_size_for, ort_reader
from plansmith_builder.errors import BuildError

log = logging.getLogger(__name__)

ENGINE_FILE = "model.onnx"
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger"}


def session(path: Path, provider: str, level: str = "ORT_ENABLE_ALL", optimized_path: Path | None = None):
    """An InferenceSession; a model ONNX Runtime cannot load is UnsupportedModel."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.log_severity_level = 3  # errors only: the hardware-specific-layout warning is expected here
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    providers: list = [provider]
    if provider == CUDA_PROVIDER:
        preload_cuda_libraries()
        providers = [(provider, CUDA_PROVIDER_OPTIONS)]  # gate and time the engine as the runtime runs it
    try:
        sess = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime's Fail / InvalidGraph / NotImplemented exceptions
        raise BuildError("UnsupportedModel", f"ONNX Runtime cannot load the model: {_first_line(error)}") from None
    require_active(provider, sess.get_providers())
    return sess


def require_active(provider: str, active: list[str]) -> None:
    """ONNX Runtime silently falls back to the CPU when the CUDA provider cannot load (missing CUDA
    or cuDNN libraries): an engine meant for the GPU must not be built, gated and timed on the CPU."""
    try:
        check_providers(provider, active)
    except ProviderUnavailable as error:
        raise BuildError("BackendUnavailable", str(error)) from None


def runner(sess) -> Runner:
    names = [output.name for output in sess.get_outputs()]

    def run(feeds):
        return dict(zip(names, sess.run(names, feeds)))

    return run


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else type(error).__name__


class OnnxRuntimeBackend:
    name: Final = "onnxruntime"

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def require_provider(self, target: EngineTarget) -> None:
        if target.device != "gpu":
            return
        import onnxruntime

        preload_cuda_libraries()
        if CUDA_PROVIDER not in onnxruntime.get_available_providers():
            raise BuildError("BackendUnavailable", f"target {target.name} needs ONNX Runtime's CUDA execution provider "
                                                   "(onnxruntime-gpu), which is not installed here")

    def check(self, build: BuildSpec, target: EngineTarget) -> None:
        plan_ort_build(build, target)

    def build(self, context: BuildContext) -> BuiltEngine:
        import onnx

        plan = plan_ort_build(context.build, context.target)
        if plan.note:
            log.info("%s", plan.note)
        work = context.workdir
        model = onnx.load(str(context.model_path))
        if plan.simplify:
            model = _simplify(model)
        staged = work / "staged.onnx"
        onnx.save(model, str(staged))

        if plan.quantize == "explicit":
            if not any(node.op_type in QDQ_OPS for node in model.graph.node):
                raise BuildError("UnsupportedModel", "quantization: explicit needs a model with QuantizeLinear/"
                                                     "DequantizeLinear nodes, and this one has none")
        elif plan.quantize == "static":
            staged = self._quantize_static(_pre_process(staged, work / "pre-processed.onnx"), context,
                                           work / "quantized.onnx")
        elif plan.quantize == "dynamic":
            staged = self._quantize_dynamic(_pre_process(staged, work / "pre-processed.onnx"), work / "quantized.onnx")
        elif plan.convert_fp16:
            staged = self._to_fp16(staged, work / "fp16.onnx")

        engine_path = work / ENGINE_FILE
        # Loading with optimized_model_filepath makes ONNX Runtime write the graph it optimized.
        session(staged, plan.execution_provider, plan.graph_level, optimized_path=engine_path)
        if not engine_path.is_file():
            raise BuildError("BuildFailed", "ONNX Runtime did not write the optimized model")
        engine = session(engine_path, plan.execution_provider, plan.graph_level)
        return BuiltEngine(
            files=[BuiltFile(engine_path, ENGINE_FILE, "engine")],
            runner=runner(engine),
            effective_precision=plan.effective_precision,
            execution_provider=plan.execution_provider,
            notes=[plan.note] if plan.note else [],
        )

    @staticmethod
    def _quantize_static(source: Path, context: BuildContext, out: Path) -> Path:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        if context.calibration is None:
            raise BuildError("InvalidSpec", "calibrated int8 needs spec.build.calibration")
        inputs = context.signature.inputs
        fixed = any(t.shape[0] != -1 for t in inputs)
        reader = ort_reader(context.calibration, batch_size_for(inputs), exact=fixed)
        try:
            # uint8 activations with int8 weights (U8S8) is ONNX Runtime's fastest x86 combination
            quantize_static(str(source), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        except BuildError:
            raise
        except Exception as error:
            raise BuildError("UnsupportedModel", f"int8 calibration failed: {_first_line(error)}") from None
        return out

    @staticmethod
    def _quantize_dynamic(source: Path, out: Path) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        try:
            quantize_dynamic(str(source), str(out), per_channel=True, weight_type=QuantType.QInt8)
        except Exception as error:
            raise BuildError("UnsupportedModel", f"dynamic int8 quantization failed: {_first_line(error)}") from None
        return out

    @staticmethod
    def _to_fp16(source: Path, out: Path) -> Path:
        import onnx
        from onnxconverter_common import float16

        try:
            converted = float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        except Exception as error:
            raise BuildError("UnsupportedModel", f"fp16 conversion failed: {_first_line(error)}") from None
        onnx.save(converted, str(out))
        return out


def _pre_process(source: Path, out: Path) -> Path:
    """ONNX Runtime's documented quantization pre-processing (symbolic shape inference and its
    basic graph optimizations, which fold e.g. BatchNormalization into Conv before scales are
    chosen); the input unchanged, with a warning, when it cannot handle the model."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(out))
    except Exception as error:
        log.warning("quantization pre-processing failed, quantizing without it: %s", _first_line(error))
        return source
    return out


def _simplify(model):
    """onnxslim's simplification and constant folding; the model unchanged (with a warning) when
    onnxslim cannot handle it, since simplification is an optimization, not a requirement."""
    import onnxslim

    try:
        return onnxslim.slim(model)
    except Exception as error:
        log.warning("onnxslim could not simplify the model, continuing without: %s", _first_line(error))
        return model

