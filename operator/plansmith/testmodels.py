"""Small, real ONNX models for tests, demos and benchmarks.

Each function builds a model with `onnx.helper` and seeded numpy weights (the same bytes on every
call), checks it with `onnx.checker`, writes it to `path` and returns a `TestModel` describing its
inputs and outputs, with the shape ranges to put in `spec.model.inputs`:

    info = small_cnn(tmp_path / "cnn.onnx")
    spec["model"]["inputs"] = info.spec_inputs()          # camelCase dicts for YAML
    write_calibration(tmp_path / "calib.npz", info)       # arrays named after the inputs

Models (dimension 0 is the dynamic batch dimension "batch" unless a fixed batch is asked for):

- `small_cnn`: Conv+BatchNormalization+Relu blocks, MaxPool, GlobalAveragePool, Gemm.
  input "input" float32 [N,3,32,32] -> "logits" float32 [N,10]
- `transformer_block`: pre-norm self-attention + MLP block with LayerNormalization, MatMul, Add,
  Softmax and Gelu in its erf form. input "tokens" float32 [N,16,64] -> "output" float32 [N,16,64]
- `mlp`: Gemm+Relu layers, small enough to be dominated by per-call overhead.
  input "input" float32 [N,sizes[0]] -> "logits" float32 [N,sizes[-1]]

Only onnx and numpy are needed (the builder extra), so the operator's tests can use this module too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plansmith.spec import InputShape

OPSET = 17  # LayerNormalization needs 17; ONNX Runtime 1.18+ runs it
IR_VERSION = 8  # readable by every ONNX Runtime the project supports

BATCH_DIM = "batch"
MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 8, 32


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output. `shape` uses None for the dynamic batch dimension."""

    name: str
    dtype: str  # numpy dtype name, e.g. "float32"
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class TestModel:
    """What a generated model looks like from the outside."""

    __test__ = False  # not a pytest test class

    path: Path
    kind: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    input_shapes: tuple[InputShape, ...] = field(default=())  # for spec.model.inputs; empty when static

    @property
    def input_name(self) -> str:
        return self.inputs[0].name

    @property
    def output_name(self) -> str:
        return self.outputs[0].name

    def spec_inputs(self) -> list[dict]:
        """`spec.model.inputs` as the API spells it (camelCase)."""
        return [shape.to_api() for shape in self.input_shapes]

    def sample_inputs(self, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """Random normal inputs of the given batch size (the fixed batch for static models)."""
        rng = np.random.default_rng(seed)
        feeds = {}
        for tensor in self.inputs:
            shape = tuple(batch if dim is None else dim for dim in tensor.shape)
            feeds[tensor.name] = rng.standard_normal(shape).astype(tensor.dtype)
        return feeds


# --------------------------------------------------------------------------- helpers


class _Graph:
    """Collects nodes and initializers with unique names (a thin convenience over onnx.helper)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, prefix: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, prefix: str, shape: tuple[int, ...], fan_in: int) -> str:
        scale = math.sqrt(2.0 / fan_in)  # He initialisation keeps activations in a sane range
        return self.const(prefix, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, op: str, inputs: list[str], prefix: str | None = None, **attrs) -> str:
        from onnx import helper

        out = self.name(prefix or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out


def _finish(graph: _Graph, *, name: str, inputs: list, outputs: list, last: str, output_name: str,
            path: str | Path):
    import onnx
    from onnx import helper

    graph.nodes.append(helper.make_node("Identity", [last], [output_name], name="output_identity"))
    model = helper.make_model(
        helper.make_graph(graph.nodes, name, inputs, outputs, initializer=graph.initializers),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="plansmith.testmodels",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return model


def _value_info(tensor: TensorInfo):
    from onnx import TensorProto, helper

    dims = [BATCH_DIM if d is None else d for d in tensor.shape]
    return helper.make_tensor_value_info(tensor.name, TensorProto.FLOAT, dims)


def _batch_dim(batch: int | None) -> int | None:
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1 or None (dynamic), got {batch}")
    return batch


def _ranges(inputs: tuple[TensorInfo, ...]) -> tuple[InputShape, ...]:
    shapes = []
    for tensor in inputs:
        if tensor.shape[0] is not None:
            continue
        rest = [int(d) for d in tensor.shape[1:] if d is not None]
        shapes.append(
            InputShape(
                name=tensor.name,
                min_shape=[MIN_BATCH, *rest],
                opt_shape=[OPT_BATCH, *rest],
                max_shape=[MAX_BATCH, *rest],
            )
        )
    return tuple(shapes)


# --------------------------------------------------------------------------- models


def small_cnn(path: str | Path, batch: int | None = None, *, seed: int = 0, image_size: int = 32) -> TestModel:
    """Three Conv+BatchNormalization+Relu blocks (32, 64, 128 channels) with MaxPool between,
    GlobalAveragePool, Flatten and a Gemm classifier, on 3 x image_size x image_size images (the
    weights do not depend on the size; compute grows with its square). `batch=None` makes
    dimension 0 dynamic."""
    batch = _batch_dim(batch)
    graph = _Graph(seed)
    x = "input"
    channels_in = 3
    for index, channels in enumerate((32, 64, 128)):
        w = graph.weight("conv_w", (channels, channels_in, 3, 3), channels_in * 9)
        b = graph.const("conv_b", np.zeros(channels, np.float32))
        x = graph.node("Conv", [x, w, b], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        scale = graph.const("bn_scale", (1.0 + 0.1 * graph.rng.standard_normal(channels)).astype(np.float32))
        bias = graph.const("bn_bias", (0.1 * graph.rng.standard_normal(channels)).astype(np.float32))
        mean = graph.const("bn_mean", (0.1 * graph.rng.standard_normal(channels)).astype(np.float32))
        var = graph.const("bn_var", (1.0 + 0.1 * graph.rng.random(channels)).astype(np.float32))
        x = graph.node("BatchNormalization", [x, scale, bias, mean, var], epsilon=1e-5)
        x = graph.node("Relu", [x])
        if index < 2:
            x = graph.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
        channels_in = channels
    x = graph.node("GlobalAveragePool", [x])
    x = graph.node("Flatten", [x], axis=1)
    w = graph.weight("fc_w", (10, channels_in), channels_in)
    b = graph.const("fc_b", np.zeros(10, np.float32))
    x = graph.node("Gemm", [x, w, b], transB=1)

    inputs = (TensorInfo("input", "float32", (batch, 3, image_size, image_size)),)
    outputs = (TensorInfo("logits", "float32", (batch, 10)),)
    _finish(graph, name="small_cnn", inputs=[_value_info(t) for t in inputs],
            outputs=[_value_info(t) for t in outputs], last=x, output_name="logits", path=path)
    return TestModel(Path(path), "small_cnn", inputs, outputs, _ranges(inputs))


def _layer_norm(graph: _Graph, x: str, width: int) -> str:
    gamma = graph.const("ln_gamma", (1.0 + 0.05 * graph.rng.standard_normal(width)).astype(np.float32))
    beta = graph.const("ln_beta", (0.05 * graph.rng.standard_normal(width)).astype(np.float32))
    return graph.node("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)


def _gelu_erf(graph: _Graph, x: str) -> str:
    """Gelu(x) = 0.5 * x * (1 + erf(x / sqrt(2))), the form exporters emit below opset 20
    (ONNX Runtime fuses it back into one Gelu kernel)."""
    scaled = graph.node("Div", [x, graph.const("sqrt2", np.array(math.sqrt(2.0), np.float32))])
    erf = graph.node("Erf", [scaled])
    one_plus = graph.node("Add", [erf, graph.const("one", np.array(1.0, np.float32))])
    product = graph.node("Mul", [x, one_plus])
    return graph.node("Mul", [product, graph.const("half", np.array(0.5, np.float32))])


def transformer_block(path: str | Path, batch: int | None = None, *, seed: int = 0,
                      sequence: int = 16, width: int = 64, heads: int = 4) -> TestModel:
    """A pre-norm transformer encoder block: LayerNorm -> multi-head self-attention (MatMul, Softmax)
    -> residual Add -> LayerNorm -> MLP (4x width, Gelu) -> residual Add."""
    if width % heads:
        raise ValueError("width must be a multiple of heads")
    batch = _batch_dim(batch)
    head = width // heads
    graph = _Graph(seed)
    x = "tokens"
    normed = _layer_norm(graph, x, width)

    def project(source: str, out: int, fan_in: int) -> str:
        w = graph.weight("proj_w", (fan_in, out), fan_in)
        b = graph.const("proj_b", (0.02 * graph.rng.standard_normal(out)).astype(np.float32))
        return graph.node("Add", [graph.node("MatMul", [source, w]), b])

    split_shape = graph.const("split_shape", np.array([0, sequence, heads, head], np.int64))

    def heads_first(t: str) -> str:  # [N,S,W] -> [N,H,S,D]
        return graph.node("Transpose", [graph.node("Reshape", [t, split_shape])], perm=[0, 2, 1, 3])

    q = heads_first(project(normed, width, width))
    k = heads_first(project(normed, width, width))
    v = heads_first(project(normed, width, width))
    k_t = graph.node("Transpose", [k], perm=[0, 1, 3, 2])
    scores = graph.node("MatMul", [q, k_t])
    scores = graph.node("Div", [scores, graph.const("sqrt_d", np.array(math.sqrt(head), np.float32))])
    attention = graph.node("Softmax", [scores], axis=-1)
    context = graph.node("MatMul", [attention, v])
    context = graph.node("Transpose", [context], perm=[0, 2, 1, 3])
    merge_shape = graph.const("merge_shape", np.array([0, sequence, width], np.int64))
    context = graph.node("Reshape", [context, merge_shape])
    x = graph.node("Add", [x, project(context, width, width)])

    hidden = project(_layer_norm(graph, x, width), 4 * width, width)
    hidden = _gelu_erf(graph, hidden)
    x = graph.node("Add", [x, project(hidden, width, 4 * width)])

    inputs = (TensorInfo("tokens", "float32", (batch, sequence, width)),)
    outputs = (TensorInfo("output", "float32", (batch, sequence, width)),)
    _finish(graph, name="transformer_block", inputs=[_value_info(t) for t in inputs],
            outputs=[_value_info(t) for t in outputs], last=x, output_name="output", path=path)
    return TestModel(Path(path), "transformer_block", inputs, outputs, _ranges(inputs))


def mlp(path: str | Path, sizes: tuple[int, ...] = (256, 512, 10), batch: int | None = None, *,
        seed: int = 0) -> TestModel:
    """Gemm layers with Relu between them: sizes[0] inputs, sizes[-1] outputs."""
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError("sizes needs at least two positive layer widths")
    batch = _batch_dim(batch)
    graph = _Graph(seed)
    x = "input"
    for index, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        w = graph.weight("fc_w", (fan_out, fan_in), fan_in)
        b = graph.const("fc_b", (0.02 * graph.rng.standard_normal(fan_out)).astype(np.float32))
        x = graph.node("Gemm", [x, w, b], transB=1)
        if index < len(sizes) - 2:
            x = graph.node("Relu", [x])

    inputs = (TensorInfo("input", "float32", (batch, sizes[0])),)
    outputs = (TensorInfo("logits", "float32", (batch, sizes[-1])),)
    _finish(graph, name="mlp", inputs=[_value_info(t) for t in inputs],
            outputs=[_value_info(t) for t in outputs], last=x, output_name="logits", path=path)
    return TestModel(Path(path), "mlp", inputs, outputs, _ranges(inputs))


def write_calibration(path: str | Path, model: TestModel, samples: int = 64, *, seed: int = 1) -> Path:
    """An .npz calibration file for `model` (spec.build.calibration): one array per input, named
    after it, `samples` items along dimension 0, random normal like the inputs the tests send."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    rng = np.random.default_rng(seed)
    arrays = {}
    for tensor in model.inputs:
        rest = tuple(1 if d is None else d for d in tensor.shape[1:])
        arrays[tensor.name] = rng.standard_normal((samples, *rest)).astype(tensor.dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:  # a handle keeps numpy from appending ".npz" to the name
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stubs type **kwds too narrowly
    return path
