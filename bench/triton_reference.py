"""The issue's reference server, run here: a real Triton Inference Server (the `tritonserver` binary
that nvidia-pytriton's wheel embeds, Python backend only) serving the same engine through a
Python-backend model that wraps an ONNX Runtime session, with the same batching settings.

`bench/serve.py --triton-reference` drives it with the same load generators right after plansmith,
so the two are compared on one machine in one run.

Set-up, cached by version under PLANSMITH_CACHE (default /var/cache/plansmith): the wheel is
downloaded with pip and unpacked (bench/tritonserver_wheel.py), and the Python backend's
stub gets its own site directory with numpy < 2 (the stub is built against numpy 1's ABI; numpy 2
arrays come back empty) and this environment's onnxruntime version.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from served_process import ServedProcess
from tritonserver_wheel import CACHE, tritonserver_root

MODEL_PY = '''
import sys
sys.path.insert(0, {site!r})  # numpy < 2 and onnxruntime for the stub (see bench/triton_reference.py)
import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Runs the batch Triton's dynamic batcher formed: one session.run over the concatenated
    requests, split back per request."""

    def initialize(self, args):
        parameters = json.loads(args["model_config"])["parameters"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters["intra_op_threads"]["string_value"])  # 0: ONNX Runtime's default
        self.session = ort.InferenceSession(parameters["engine"]["string_value"], options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy() for request in requests]
        batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        outputs = self.session.run(self.output_names, {{self.input_name: batch}})
        responses, start = [], 0
        for array in arrays:
            end = start + len(array)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, output[start:end].copy()) for name, output in zip(self.output_names, outputs)]))
            start = end
        return responses
'''


def install() -> Path:
    """The tritonserver directory (tritonserver_wheel.py), with the Python backend's site directory
    for this environment's onnxruntime version (prepared once)."""
    import onnxruntime

    root = tritonserver_root()
    site = CACHE / f"site-onnxruntime-{onnxruntime.__version__}"
    if not (site / "onnxruntime").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(site), "numpy<2",
                        f"onnxruntime=={onnxruntime.__version__}"], check=True)
    return root


def write_repository(directory: Path, engine: Path, batching: bool, layout, delay_us: int) -> Path:
    """A model repository with one Python-backend model named "model", served in `layout` (serve.Layout:
    max_batch_size, instances and each session's intra_op_threads); config.pbtxt is rendered from
    tritonclient's ModelConfig message, so its fields are checked by protobuf."""
    import onnxruntime as ort
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    session = ort.InferenceSession(str(engine), providers=["CPUExecutionProvider"])
    config = model_config_pb2.ModelConfig(name="model", backend="python", max_batch_size=layout.max_batch_size)
    for tensors, add in ((session.get_inputs(), config.input.add), (session.get_outputs(), config.output.add)):
        for tensor in tensors:
            add(name=tensor.name, data_type=model_config_pb2.TYPE_FP32, dims=[int(d) for d in tensor.shape[1:]])
    if batching:
        config.dynamic_batching.max_queue_delay_microseconds = delay_us
    config.instance_group.add(count=layout.instances, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    config.parameters["engine"].string_value = str(engine)
    config.parameters["intra_op_threads"].string_value = str(layout.intra_op_threads)
    model = directory / "model"
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(text_format.MessageToString(config))
    site = CACHE / f"site-onnxruntime-{ort.__version__}"
    (model / "1" / "model.py").write_text(MODEL_PY.format(site=str(site)))
    return directory


class TritonServer(ServedProcess):
    """tritonserver on free ports, serving the engine as "model"."""

    stop_timeout = 60.0

    def __init__(self, engine: Path, batching: bool, layout, delay_us: int, workdir: Path, free_port,
                 extra: tuple[str, ...] = ()) -> None:
        root = install()
        mode = f"{layout.name}-{'on' if batching else 'off'}"
        repository = write_repository(workdir / f"triton-repo-{mode}", engine, batching, layout, delay_us)
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        log_path = workdir / f"triton-{mode}.log"
        command = [str(root / "bin" / "tritonserver"), "--model-repository", str(repository),
                   "--backend-directory", str(root / "backends"), "--http-port", str(self.http),
                   "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics), "--log-verbose", "0", *extra]
        if not self.launch(command, log_path, ready_timeout=120):
            raise RuntimeError(f"tritonserver did not become ready: {log_path.read_text(errors='replace')[-3000:]}")
