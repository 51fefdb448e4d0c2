"""Issue 7: plansmith's ONNX Runtime CUDA engines on a GPU, measured against PyTorch eager.

    bench/gpu/run.sh [--cpu-smoke] [--phase all|build|serve] [--out DIR] [--workdir DIR]

run.sh installs the carried wheels (onnxruntime-gpu, plansmith and its missing dependencies) into a
target folder and runs this file. Phases (state is kept in WORKDIR/state.json, so the two device
calls of one session can share it):

  build  export ResNet-50 (torchvision, random weights) and a BERT-base-sized encoder (transformers
         BertModel, random weights, sequence 128, pooled output) to ONNX; check the target NVML
         reports; `plansmith build --backend onnxruntime --target auto` for fp32 and fp16; then, in
         this process, the engines through plansmith's executor (IO binding, inputs already on the
         GPU as OrtValues) and PyTorch eager FP32 / FP16 (channels-last for the CNN) at batch 1, 64, 256.
  serve  each engine behind `plansmith serve` on loopback, driven through tritonclient's gRPC
         service definitions (KServe v2 ModelInfer) at the given concurrencies, batching on and off;
         payload bytes/s (request + response messages) are reported with the throughput. With
         --trace-rate N the server traces every N-th request (Triton's trace extension) and each
         load's line is followed by where its traced requests spent their time (p50 / p99 of each
         span: receive, queue, compute input / infer / output, overhead, send).
  all    both.

The table (markdown) is printed last and written to OUT/table.md, every figure to OUT/results.json.
--cpu-smoke runs the same code on the CPU with small shapes and short timings, to find bugs before
any device time is spent: its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import serve as serve_bench  # noqa: E402  (bench/serve.py: the `plansmith serve` process wrapper)
from served_process import mean_batch  # noqa: E402

MODELS = ("resnet50", "bert")
# BERT answering with its last hidden state ([batch, seq, hidden]: 393 KB an fp32 request at seq 128), for
# the outputs' path (CUDA shared memory outputs written on the device); not in the default set
LARGE_OUTPUT_MODEL = "bert-hidden"
PRECISIONS = ("fp32", "fp16")


# --------------------------------------------------------------------------- settings


def settings(smoke: bool) -> dict:
    if smoke:
        return {"device": "cpu", "batches": [1, 4], "max_batch": 4, "opt_batch": 2, "seq": 32, "seconds": 0.3,
                "serve_seconds": 1.5, "concurrency": [1, 8], "processes": 2, "samples": 2,
                "bert": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2,
                         "intermediate_size": 512}}
    return {"device": "cuda", "batches": [1, 64, 256], "max_batch": 64, "opt_batch": 8, "seq": 128, "seconds": 1.5,
            "serve_seconds": 4.0, "concurrency": [1, 64], "processes": 4, "samples": 8, "bert": {}}


# --------------------------------------------------------------------------- models


def export_resnet50(path: Path, cfg: dict) -> dict:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    example = torch.randn(2, 3, 224, 224)
    torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return {"inputs": [{"name": "input", "shape": [3, 224, 224], "dtype": "float32"}]}


class BenchBert:
    """BertModel returning its pooled output only ([batch, hidden]: a small answer on the wire), or
    with `hidden` its last hidden state ([batch, seq, hidden]: a large one)."""

    @staticmethod
    def create(cfg: dict, hidden: bool = False):
        import torch
        from transformers import BertConfig, BertModel

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = BertModel(BertConfig(**cfg["bert"]), add_pooling_layer=True)

            def forward(self, input_ids, attention_mask):
                outputs = self.bert(input_ids=input_ids, attention_mask=attention_mask)
                return outputs.last_hidden_state if hidden else outputs.pooler_output

        torch.manual_seed(0)
        return Wrapper().eval()


def export_bert(path: Path, cfg: dict, hidden: bool = False) -> dict:
    import torch

    model = BenchBert.create(cfg, hidden)
    output = "hidden" if hidden else "pooled"
    seq = cfg["seq"]
    ids = torch.randint(0, model.bert.config.vocab_size, (2, seq))
    mask = torch.ones(2, seq, dtype=torch.int64)
    torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=[output], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, output: {0: "batch"}})
    return {"inputs": [{"name": "input_ids", "shape": [seq], "dtype": "int64"},
                       {"name": "attention_mask", "shape": [seq], "dtype": "int64"}],
            "vocab": model.bert.config.vocab_size}


def sample_inputs(meta: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for tensor in meta["inputs"]:
        shape = [batch, *tensor["shape"]]
        if tensor["name"] == "input_ids":
            feeds[tensor["name"]] = rng.integers(0, meta["vocab"], size=shape, dtype=np.int64)
        elif tensor["name"] == "attention_mask":
            feeds[tensor["name"]] = np.ones(shape, np.int64)
        else:
            feeds[tensor["name"]] = rng.standard_normal(shape).astype(tensor["dtype"])
    return feeds


# --------------------------------------------------------------------------- timing


def time_calls(fn, batch: int, seconds: float, warmup: int = 3, min_iterations: int = 5) -> dict:
    """Synchronous calls (each returns when its results are on the host): p50/p99 and items/s."""
    for _ in range(warmup):
        fn()
    latencies = []
    started = time.perf_counter()
    while len(latencies) < min_iterations or time.perf_counter() - started < seconds:
        begin = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - begin)
    values = np.asarray(latencies) * 1000
    return {"batch": batch, "p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99)),
            "items_per_s": batch * len(values) / (values.sum() / 1000), "iterations": len(values)}


def mixed_sizes(run, feeds_by_size: dict[int, dict], seconds: float, seed: int = 1) -> dict:
    """Batches of random sizes (1..max), as a dynamic batcher forms them, with no warmup per size:
    what a shape-specialising backend pays on the first batch of each size shows up here."""
    rng = np.random.default_rng(seed)
    sizes = sorted(feeds_by_size)
    items = runs = 0
    slowest = 0.0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        size = int(rng.choice(sizes))
        begin = time.perf_counter()
        run(feeds_by_size[size])
        slowest = max(slowest, time.perf_counter() - begin)
        items += size
        runs += 1
    elapsed = time.perf_counter() - started
    return {"items_per_s": items / elapsed, "runs": runs, "mean_batch": items / max(runs, 1),
            "slowest_ms": slowest * 1000, "seconds": elapsed}


def device_feeds(meta: dict, batches, device: str) -> dict[int, dict]:
    import onnxruntime as ort

    return {batch: {name: ort.OrtValue.ortvalue_from_numpy(array, device, 0)
                    for name, array in sample_inputs(meta, batch, seed=batch).items()} for batch in batches}


def executor_figures(manifest_uri: str, meta: dict, cfg: dict, workdir: Path) -> dict:
    """plansmith's executor in this process; on a GPU, inputs are OrtValues already on the device."""
    import onnxruntime as ort

    from plansmith_runtime.executors import create_executor
    from plansmith_runtime.loader import fetch_engine

    engine = fetch_engine(manifest_uri, workdir)
    executor = create_executor(engine)
    figures = {"providers": executor.session.get_providers(), "io_binding": getattr(executor, "io_binding", False)}
    try:
        for batch in cfg["batches"]:
            host = sample_inputs(meta, batch, seed=batch)
            device = "cuda" if figures["io_binding"] else "cpu"
            feeds = {name: ort.OrtValue.ortvalue_from_numpy(array, device, 0) for name, array in host.items()}
            first = executor.run(feeds)
            if not all(np.all(np.isfinite(value)) for value in first.values()):
                raise RuntimeError(f"non-finite outputs at batch {batch}")
            figures[f"b{batch}"] = time_calls(lambda: executor.run(feeds), batch, cfg["seconds"])
            print(f"    executor b{batch}: {fmt_time(figures[f'b{batch}'])}", flush=True)
    finally:
        executor.close()
    # The executor as `plansmith serve` creates it (on the CUDA provider: a session per batch-size
    # bucket) and warms it (every bucket), fed host arrays as the server hands them over.
    served = create_executor(engine, max_batch_size=cfg["max_batch"])
    try:
        for size in served.batch_buckets:
            served.run(sample_inputs(meta, size, seed=size))
        pool = {batch: sample_inputs(meta, batch, seed=batch) for batch in range(1, cfg["max_batch"] + 1)}
        figures["mixed"] = mixed_sizes(served.run, pool, 2 * cfg["seconds"])
        figures["buckets"] = list(served.batch_buckets)
        print(f"    executor, host inputs, random batch sizes 1-{cfg['max_batch']}: {fmt_mixed(figures['mixed'])}; "
              f"buckets {figures['buckets']}", flush=True)
        del pool
    finally:
        served.close()
    figures["joined"] = joined_batch_figures(engine, meta, cfg)
    return figures


def joined_batch_figures(engine, meta: dict, cfg: dict, rounds: int = 3) -> dict:
    """One-item requests joined into a batch of the serving limit by the executor and run, as the
    server's batcher does, in pageable memory (`--pinned-memory-pool-byte-size 0`) and in pinned
    buffers, alternating: items/s each round, and the ratio of the medians."""
    from plansmith_runtime.executors import create_executor
    from plansmith_runtime.executors.pinned_memory import DEFAULT_POOL_BYTES, PinnedMemoryPool

    batch = min(cfg["serve_max_batch"], cfg["max_batch"])
    requests = [sample_inputs(meta, 1, seed=index) for index in range(batch)]
    pinned_pool = PinnedMemoryPool(DEFAULT_POOL_BYTES)
    executors = {"pageable": create_executor(engine, max_batch_size=cfg["max_batch"]),
                 "pinned": create_executor(engine, max_batch_size=cfg["max_batch"], pinned_pool=pinned_pool)}
    figures: dict = {"batch": batch, **{label: [] for label in executors}}
    try:
        outputs = {label: executor.run(executor.form_batch(requests)) for label, executor in executors.items()}
        for name, expected in outputs["pageable"].items():
            np.testing.assert_allclose(outputs["pinned"][name], expected, rtol=1e-3, atol=1e-3)
        figures["pinned_bytes"] = pinned_pool.used_bytes
        for _ in range(rounds):
            for label, executor in executors.items():
                timed = time_calls(lambda: executor.run(executor.form_batch(requests)), batch, cfg["seconds"])
                figures[label].append(timed["items_per_s"])
        figures["ratio"] = float(np.median(figures["pinned"]) / np.median(figures["pageable"]))
        print(f"    executor, {batch} one-item requests joined and run: pinned {fmt_rates(figures['pinned'])} against "
              f"pageable {fmt_rates(figures['pageable'])} items/s = {figures['ratio']:.2f}x "
              f"({figures['pinned_bytes'] / 1e6:.1f} MB pinned)", flush=True)
    finally:
        for executor in executors.values():
            executor.close()
        pinned_pool.close()
    return figures


def fmt_rates(rates: list[float]) -> str:
    return " / ".join(f"{rate:,.0f}" for rate in rates)


def provider_variants(engine_path: Path, meta: dict, cfg: dict) -> dict:
    """Raw ONNX Runtime sessions on the same engine file with other CUDA provider options than the
    executor's: the executor's previous ones (ONNX Runtime's defaults: exhaustive cuDNN algorithm
    search per input shape, NCHW), and CUDA graph capture at batch 1 (enable_cuda_graph; it needs
    the same bound input and output buffers on every run)."""
    import onnxruntime as ort

    from plansmith.onnxruntime_providers import CUDA_PROVIDER_OPTIONS

    gpu = cfg["device"] == "cuda"
    device = "cuda" if gpu else "cpu"
    variants = {"previous options (EXHAUSTIVE, NCHW)": {"cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": "0"},
                "cuda_graph": {**CUDA_PROVIDER_OPTIONS, "enable_cuda_graph": "1"}}
    figures = {}
    for label, options in variants.items():
        try:
            providers = [("CUDAExecutionProvider", options)] if gpu else ["CPUExecutionProvider"]
            session = ort.InferenceSession(str(engine_path), providers=providers)
            outputs = [o.name for o in session.get_outputs()]
            graph = "enable_cuda_graph" in options
            for batch in cfg["batches"][:1] if graph else cfg["batches"]:
                feeds = device_feeds(meta, [batch], device)[batch]
                binding = session.io_binding()
                for name, value in feeds.items():
                    binding.bind_ortvalue_input(name, value)
                probe = session.run(outputs, sample_inputs(meta, batch, seed=batch))
                bound = [ort.OrtValue.ortvalue_from_shape_and_type(list(value.shape), value.dtype, device, 0)
                         for value in probe]
                for name, value in zip(outputs, bound):
                    binding.bind_ortvalue_output(name, value)

                def call():
                    session.run_with_iobinding(binding)
                    return [value.numpy() for value in bound]

                figures[f"{label} b{batch}"] = time_calls(call, batch, cfg["seconds"])
                print(f"    variant {label} b{batch}: {fmt_time(figures[f'{label} b{batch}'])}", flush=True)
            if not graph:
                def run(feeds):
                    binding = session.io_binding()
                    for name, value in feeds.items():
                        binding.bind_cpu_input(name, value)
                    for name in outputs:
                        binding.bind_output(name, device, 0)
                    session.run_with_iobinding(binding)
                    return binding.copy_outputs_to_cpu()

                pool = {batch: sample_inputs(meta, batch, seed=batch) for batch in range(1, cfg["max_batch"] + 1)}
                figures[f"{label} mixed"] = mixed_sizes(run, pool, 2 * cfg["seconds"])
                print(f"    variant {label} host inputs, random batch sizes 1-{cfg['max_batch']}: "
                      f"{fmt_mixed(figures[f'{label} mixed'])}", flush=True)
                del pool
            session = None  # free the GPU memory before the next variant
        except Exception as error:
            figures[label] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(f"    variant {label} failed: {figures[label]['error']}", flush=True)
    return figures


def torch_figures(model_name: str, meta: dict, cfg: dict, half: bool) -> dict:
    """PyTorch eager on the same device, inputs already there, outputs copied to the host (as the
    executor's are)."""
    import torch
    import torchvision

    device = torch.device(cfg["device"])
    torch.manual_seed(0)
    if model_name == "resnet50":
        model = torchvision.models.resnet50(weights=None).eval().to(device)
        if half:
            model = model.half().to(memory_format=torch.channels_last)
    else:
        model = BenchBert.create(cfg, model_name == LARGE_OUTPUT_MODEL).to(device)
        if half:
            model = model.half()
    figures = {"torch": torch.__version__, "variant": ("fp16" + (" channels-last" if model_name == "resnet50" else ""))
               if half else "fp32"}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for batch in cfg["batches"]:
        host = sample_inputs(meta, batch, seed=batch)
        inputs = []
        for name, array in host.items():
            tensor = torch.from_numpy(array).to(device)
            if half and tensor.is_floating_point():
                tensor = tensor.half()
                if tensor.dim() == 4:
                    tensor = tensor.contiguous(memory_format=torch.channels_last)
            inputs.append(tensor)

        def call():
            with torch.inference_mode():
                out = model(*inputs)
            out.float().cpu()
            sync()

        figures[f"b{batch}"] = time_calls(call, batch, cfg["seconds"])
        print(f"    torch {figures['variant']} b{batch}: {fmt_time(figures[f'b{batch}'])}", flush=True)
    model = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return figures


def fmt_mixed(f: dict) -> str:
    return (f"{f['items_per_s']:.0f} items/s over {f['runs']} runs (mean batch {f['mean_batch']:.1f}, "
            f"slowest run {f['slowest_ms']:.1f} ms)")


def fmt_time(f: dict) -> str:
    return f"p50 {f['p50_ms']:.3f} ms, p99 {f['p99_ms']:.3f} ms, {f['items_per_s']:.0f} items/s ({f['iterations']} runs)"


# --------------------------------------------------------------------------- environment


def environment(cfg: dict) -> dict:
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"),
            "python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count()}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "name,driver_version,memory.total,compute_cap,clocks.max.sm,mig.mode.current"
        done = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    import onnxruntime as ort

    info["onnxruntime"] = ort.__version__
    info["onnxruntime_providers"] = ort.get_available_providers()
    info["onnxruntime_cuda"] = getattr(ort, "cuda_version", None)
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
    for name in ("transformers", "torchvision", "onnx", "numpy", "tritonclient", "grpc"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = None
    from plansmith_builder.target import detect_target

    detected = detect_target()
    info["detected_target"] = {"device": detected.target.device, "compute_capability": detected.target.compute_capability,
                               "gpu_product": detected.target.gpu_product, "driver": detected.driver_version,
                               "cpu_isa": detected.target.cpu_isa, "name": detected.target.name}
    return info


# --------------------------------------------------------------------------- build phase


def spec_yaml(name: str, model_path: Path, meta: dict, precision: str, cfg: dict, store: Path) -> str:
    inputs = []
    for tensor in meta["inputs"]:
        inputs.append({"name": tensor["name"], "minShape": [1, *tensor["shape"]],
                       "optShape": [cfg["opt_batch"], *tensor["shape"]],
                       "maxShape": [cfg["max_batch"], *tensor["shape"]]})
    doc = {"apiVersion": "plansmith.io/v1alpha1", "kind": "InferenceModel", "metadata": {"name": name},
           "spec": {"model": {"uri": f"file://{model_path}", "inputs": inputs},
                    "build": {"backend": "onnxruntime", "precision": precision,
                              "accuracy": {"minCosine": 0.99, "samples": cfg["samples"]}},
                    "serving": {"maxBatchSize": cfg["max_batch"], "dynamicBatching": {}},
                    "storage": {"uri": f"file://{store}"}}}
    return json.dumps(doc, indent=2)  # JSON is YAML


def run_build(spec_path: Path, log_path: Path) -> tuple[dict, float, str]:
    command = ["plansmith", "build", str(spec_path), "--backend", "onnxruntime", "--target", "auto",
               "--quick-benchmark"]
    started = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True)
    seconds = time.perf_counter() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {"status": "failed", "message": done.stdout}
    return result, seconds, shlex.join(command)


def build_phase(cfg: dict, state: dict, workdir: Path, models: list[str], precisions: list[str]) -> None:
    from plansmith.manifest import parse_manifest

    store = workdir / "store"
    for model_name in models:
        print(f"\n== {model_name}", flush=True)
        path = workdir / f"{model_name}.onnx"
        started = time.perf_counter()
        if model_name == "resnet50":
            meta = export_resnet50(path, cfg)
        else:
            meta = export_bert(path, cfg, hidden=model_name == LARGE_OUTPUT_MODEL)
        print(f"  exported {path.name} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s",
              flush=True)
        entry = state.setdefault("models", {}).setdefault(model_name, {})
        entry["meta"] = meta
        for precision in precisions:
            spec_path = workdir / f"{model_name}-{precision}.yaml"
            spec_path.write_text(spec_yaml(f"{model_name}-{precision}", path, meta, precision, cfg, store))
            result, seconds, command = run_build(spec_path, workdir / f"build-{model_name}-{precision}.log")
            row = entry.setdefault(precision, {})
            row.update(build=result, build_wall_s=seconds, build_command=command)
            print(f"  {command}\n    -> {result.get('status')} {result.get('reason') or ''} {result.get('message', '')[:300]}"
                  f" ({seconds:.1f} s)", flush=True)
            if result.get("status") not in ("built", "hit"):
                log_text = (workdir / f"build-{model_name}-{precision}.log").read_text()[-3000:]
                print(f"    build log tail:\n{log_text}", flush=True)
                continue
            manifest = parse_manifest(Path(result["manifestUri"].removeprefix("file://")).read_bytes())
            row["manifest_uri"] = result["manifestUri"]
            row["manifest"] = {
                "target": manifest.target.model_dump(mode="json", by_alias=True, exclude_none=True),
                "effective_precision": manifest.effective_precision or manifest.precision,
                "build_seconds": manifest.build_seconds,
                "accuracy": {"cosine": manifest.accuracy.cosine, "max_abs_error": manifest.accuracy.max_abs_error},
                "benchmark": manifest.benchmark.model_dump(mode="json", by_alias=True, exclude_none=True),
            }
            print(f"    target {row['manifest']['target']}", flush=True)
            print(f"    accuracy cosine {manifest.accuracy.cosine:.6f} max abs {manifest.accuracy.max_abs_error:.3g}; "
                  f"build {manifest.build_seconds:.1f} s", flush=True)
            try:
                row["executor"] = executor_figures(result["manifestUri"], meta, cfg,
                                                   workdir / f"engine-{model_name}-{precision}")
            except Exception as error:  # report and go on: the other figures are still worth having
                row["executor_error"] = f"{type(error).__name__}: {error}"
                print(f"    executor failed: {row['executor_error']}", flush=True)
            if precision == "fp16" and not cfg.get("skip_variants"):
                manifest_path = Path(result["manifestUri"].removeprefix("file://"))
                engine_file = manifest_path.parent / parse_manifest(manifest_path.read_bytes()).artifact("engine").name
                row["variants"] = provider_variants(engine_file, meta, cfg)
        for half in (False, True):
            if cfg.get("skip_torch") or (half and cfg["device"] == "cpu"):
                continue  # fp16 eager on the CPU is neither fast nor the baseline
            key = "torch_fp16" if half else "torch_fp32"
            try:
                entry[key] = torch_figures(model_name, meta, cfg, half)
            except Exception as error:
                entry[key] = {"error": f"{type(error).__name__}: {error}"}
                print(f"    torch {key} failed: {entry[key]['error']}", flush=True)
        save(state, workdir)


# --------------------------------------------------------------------------- serve phase


SHARED_MEMORY_KINDS = ("none", "system", "cuda")  # perf_analyzer's --shared-memory values


def infer_payload(model: str, arrays: dict, regions: dict[str, str] | None = None,
                  output_regions: dict[str, tuple[str, int]] | None = None) -> bytes:
    """A serialized ModelInferRequest built with tritonclient's service definitions: the inputs'
    bytes in raw_input_contents, or, given `regions` (input name -> registered region), a
    reference to each input's region instead (Triton's shared memory parameters); given
    `output_regions` (output name -> region, bytes), each output is asked for in its region."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import np_to_triton_dtype

    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        tensor = request.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=list(array.shape))
        if regions:
            tensor.parameters["shared_memory_region"].string_param = regions[name]
            tensor.parameters["shared_memory_byte_size"].int64_param = array.nbytes
        else:
            request.raw_input_contents.append(array.tobytes())
    for name, (region, nbytes) in (output_regions or {}).items():
        output = request.outputs.add(name=name)
        output.parameters["shared_memory_region"].string_param = region
        output.parameters["shared_memory_byte_size"].int64_param = nbytes
    return request.SerializeToString()


def output_bytes(url: str, model: str, arrays: dict) -> dict[str, int]:
    """Each output's bytes in the answer to `arrays`, from one inference (the metadata's shapes may
    leave more than the batch dimension open)."""
    from tritonclient.grpc import service_pb2

    response = service_pb2.ModelInferResponse.FromString(infer_once(url, infer_payload(model, arrays)))
    return {output.name: len(raw) for output, raw in zip(response.outputs, response.raw_output_contents)}


@contextlib.contextmanager
def tensor_regions(kind: str, url: str, arrays: dict):
    """Each input written once into a shared memory region of `kind` (system: a POSIX object; cuda:
    GPU memory on device 0 shared through a CUDA IPC handle) and a region for each output,
    registered with the server, as perf_analyzer --shared-memory does; yields (input name -> region
    name, output name -> (region name, bytes)), (None, None) for kind "none". The load's clients all
    name the same regions: the server reads the inputs' and writes the outputs' (perf_analyzer's
    clients share theirs too)."""
    if kind == "none":
        yield None, None
        return
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    tensors = {**{name: array for name, array in arrays.items()},
               **{name: np.zeros(nbytes, np.uint8) for name, nbytes in output_bytes(url, "model", arrays).items()}}
    regions = {name: f"bench-{kind}-{name}" for name in tensors}
    created = {}
    try:
        for name, array in tensors.items():
            region = regions[name]
            if kind == "system":
                import tritonclient.utils.shared_memory as shm

                key = f"/plansmith-bench-{os.getpid()}-{name}"
                created[name] = (shm, shm.create_shared_memory_region(region, key, array.nbytes))
                shm.set_shared_memory_region(created[name][1], [array])
                client.register_system_shared_memory(region, key, array.nbytes)
            else:
                import tritonclient.utils.cuda_shared_memory as cudashm

                created[name] = (cudashm, cudashm.create_shared_memory_region(region, array.nbytes, 0))
                cudashm.set_shared_memory_region(created[name][1], [array])
                client.register_cuda_shared_memory(region, cudashm.get_raw_handle(created[name][1]), 0, array.nbytes)
        yield ({name: regions[name] for name in arrays},
               {name: (regions[name], tensors[name].nbytes) for name in tensors if name not in arrays})
    finally:
        (client.unregister_system_shared_memory if kind == "system" else client.unregister_cuda_shared_memory)()
        for module, handle in created.values():
            module.destroy_shared_memory_region(handle)
        client.close()


def _load_worker(url: str, payload: bytes, concurrency: int, duration: float, start_at: float, results) -> None:
    """`concurrency` coroutines calling ModelInfer back to back on one channel with one request
    (`infer_payload`)."""
    import grpc
    from tritonclient.grpc import service_pb2

    async def main():
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        channel = grpc.aio.insecure_channel(url, options=options)
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        first = service_pb2.ModelInferResponse.FromString(await call(payload))
        assert first.raw_output_contents, "the server returned no outputs"
        response_bytes = 0
        latencies: list[float] = []
        errors = 0
        while time.time() < start_at:
            await asyncio.sleep(0.001)
        stop_at = start_at + duration

        async def loop():
            nonlocal errors, response_bytes
            while time.time() < stop_at:
                begin = time.perf_counter()
                try:
                    answer = await call(payload)
                    latencies.append(time.perf_counter() - begin)
                    response_bytes += len(answer)
                except grpc.aio.AioRpcError:
                    errors += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        await channel.close()
        results.put((latencies, errors, len(payload) * len(latencies), response_bytes))

    asyncio.run(main())


def infer_once(url: str, payload: bytes) -> bytes:
    """One ModelInfer call with a serialized request; the serialized response."""
    import grpc

    with grpc.insecure_channel(url, options=[("grpc.max_receive_message_length", 64 << 20),
                                             ("grpc.max_send_message_length", 64 << 20)]) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        return call(payload, timeout=60)


def check_payload(url: str, payload: bytes) -> None:
    """One call with the load's request before the load: a request the server refuses stops the
    benchmark with the server's message, instead of every generator failing on its own."""
    import grpc

    try:
        infer_once(url, payload)
    except grpc.RpcError as error:
        raise RuntimeError(f"the server refused the load's request: {error.code().name} {error.details()}") from None


def load(url: str, payload: bytes, batch: int, concurrency: int, duration: float, processes: int) -> dict:
    """`payload` (an infer_payload of `batch` items) sent by `concurrency` callers spread over processes."""
    check_payload(url, payload)
    processes = max(1, min(processes, concurrency))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 3.0
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    workers = [context.Process(target=_load_worker, args=(url, payload, share, duration, start_at, results))
               for share in shares]
    for worker in workers:
        worker.start()
    latencies: list[float] = []
    errors = sent = received = 0
    for _ in workers:
        part, failed, out_bytes, in_bytes = results.get(timeout=duration + 120)
        latencies += part
        errors += failed
        sent += out_bytes
        received += in_bytes
    for worker in workers:
        worker.join()
    p50, p95, p99 = serve_bench.percentiles(latencies)
    return {"rps": len(latencies) / duration, "items_per_s": batch * len(latencies) / duration, "p50": p50,
            "p99": p99, "errors": errors, "payload_bytes_per_s": (sent + received) / duration,
            "request_bytes": sent // max(1, len(latencies)), "response_bytes": received // max(1, len(latencies))}


def gpu_summary(gpus: dict[str, dict[str, float]], items_per_s: float) -> str:
    """What the served GPU was doing at the end of a load, from the server's nv_gpu_* metrics."""
    parts = []
    for uuid, reading in gpus.items():
        text = f"{uuid[:12]}: {reading.get('nv_gpu_utilization', float('nan')):.0%} busy"
        power = reading.get("nv_gpu_power_usage")
        if power is not None:
            text += f", {power:.0f} W" + (f" = {power / items_per_s * 1000:.1f} mJ an item" if items_per_s else "")
        used = reading.get("nv_gpu_memory_used_bytes")
        if used is not None:
            text += f", {used / 2**30:.1f} GiB used"
        parts.append(text)
    return ("  GPU " + "; ".join(parts)) if parts else ""


def trace_arguments(trace_file: Path, rate: int) -> list[str]:
    """`plansmith serve` flags tracing every `rate`-th request into `trace_file` (none for rate 0)."""
    if not rate:
        return []
    return ["--trace-config", f"triton,file={trace_file}", "--trace-config", "level=TIMESTAMPS",
            "--trace-config", f"rate={rate}"]


def traced_spans(trace_file: Path, windows: dict[str, tuple[int, int]]) -> dict[str, dict]:
    """Per load (a window of time.monotonic_ns(), the server's trace clock: both are the machine's
    CLOCK_MONOTONIC), the traced requests' span statistics (plansmith trace-summary's)."""
    from plansmith_runtime.trace_summary import read_traces, span_statistics, summarize

    if not trace_file.is_file():
        return {}
    requests = read_traces([trace_file])
    spans = {}
    for load, (start, end) in windows.items():
        inside = [request for request in requests if start <= request.timestamps.get("REQUEST_START", -1) <= end]
        for group in summarize(inside):
            spans[load] = {"traces": group.traces, **span_statistics(group)}
    return spans


def trace_line(spans: dict) -> str:
    names = ("receive", "queue", "input", "infer", "output", "overhead", "send")
    return (f"{spans['traces']} traced: p50 / p99 us " +
            ", ".join(f"{name} {spans[name]['p50']:.0f} / {spans[name]['p99']:.0f}" for name in names if name in spans))


def serve_phase(cfg: dict, state: dict, workdir: Path, models: list[str], precisions: list[str]) -> None:
    serve_bench.PLANSMITH = shutil.which("plansmith") or serve_bench.PLANSMITH
    # the batch limit and instances asked for (bench/serve.py's default layout has its own), within the engines'
    layout = serve_bench.Layout("gpu", max_batch_size=min(cfg["serve_max_batch"], cfg["max_batch"]),
                                instances=cfg["instances"])
    for model_name in models:
        entry = state.get("models", {}).get(model_name)
        if not entry:
            continue
        arrays = sample_inputs(entry["meta"], 1, seed=5)
        for precision in precisions:
            row = entry.get(precision, {})
            if "manifest_uri" not in row:
                continue
            served = row.setdefault("served", {})
            for mode, batching, pool_arguments in serve_modes(cfg["compare_pinned"]):
                log_path = workdir / f"serve-{model_name}-{precision}-{mode}.log"
                trace_file = workdir / f"trace-{model_name}-{precision}-{mode}.json"
                trace_file.unlink(missing_ok=True)
                windows: dict[str, tuple[int, int]] = {}
                try:
                    server = serve_bench.Server(row["manifest_uri"], batching, log_path,
                                                trace_arguments(trace_file, cfg["trace_rate"]) + pool_arguments, layout)
                except RuntimeError as error:
                    served[mode] = {"error": str(error)[-2000:]}
                    print(f"  {model_name} {precision} batching {mode}: server failed: {str(error)[-2000:]}", flush=True)
                    continue
                url = f"127.0.0.1:{server.grpc}"
                try:
                    for kind in cfg["shared_memory"]:
                        with tensor_regions(kind, url, arrays) as (regions, output_regions):
                            payload = infer_payload("model", arrays, regions, output_regions)
                            batch = next(iter(arrays.values())).shape[0]
                            for concurrency in cfg["concurrency"]:
                                load_name = load_key(concurrency, kind)
                                before = server.counters()
                                started = time.monotonic_ns()
                                figures = load(url, payload, batch, concurrency, cfg["serve_seconds"], cfg["processes"])
                                windows[load_name] = (started, time.monotonic_ns())
                                figures["mean_batch"] = mean_batch(before, server.counters())
                                # the server's last poll of Triton's GPU metrics, taken during the load
                                figures["gpus"] = server.gpu_metrics()
                                served.setdefault(mode, {})[load_name] = figures
                                print(f"  {model_name:8s} {precision} batching {mode:3s} {load_name:<13s} "
                                      f"{figures['items_per_s']:8.0f} items/s  p50 {figures['p50']:7.2f} ms  p99 "
                                      f"{figures['p99']:7.2f} ms  {figures['payload_bytes_per_s'] / 1e6:8.1f} MB/s "
                                      f"payload  mean batch {figures['mean_batch']:.1f}  errors {figures['errors']}"
                                      f"{gpu_summary(figures['gpus'], figures['items_per_s'])}", flush=True)
                finally:
                    server.stop()  # the server writes the traces it holds as it stops
                for load_name, spans in traced_spans(trace_file, windows).items():
                    served[mode][load_name]["trace"] = spans
                    print(f"  {model_name:8s} {precision} batching {mode:3s} {load_name}: {trace_line(spans)}", flush=True)
            for load_name in (f"c{c}" for c in cfg["concurrency"]):
                pinned = _get(served, "on", load_name, "items_per_s")
                pageable = _get(served, PAGEABLE, load_name, "items_per_s")
                if pinned and pageable:
                    print(f"  {model_name:8s} {precision} batching on {load_name}: pinned {pinned:,.0f} against pageable "
                          f"{pageable:,.0f} items/s = {pinned / pageable:.2f}x", flush=True)
            for mode, concurrency, kind in ((m, c, k) for m in served for c in cfg["concurrency"]
                                            for k in cfg["shared_memory"] if k != "none"):
                in_request, in_region = _get(served, mode, f"c{concurrency}"), _get(served, mode, load_key(concurrency, kind))
                if in_request and in_region:
                    print(f"  {model_name:8s} {precision} batching {mode} c={concurrency}: tensors in {kind} shared memory "
                          f"{in_region['items_per_s']:,.0f} items/s, p50 {in_region['p50']:.2f} ms against "
                          f"{in_request['items_per_s']:,.0f}, {in_request['p50']:.2f} ms in the messages = "
                          f"{in_region['items_per_s'] / in_request['items_per_s']:.2f}x", flush=True)
        save(state, workdir)


PAGEABLE = "on-pageable"


def load_key(concurrency: int, shared_memory: str) -> str:
    """A load's name in the results: c64 with the inputs in the requests, c64-cuda-shm with them in CUDA shared memory."""
    return f"c{concurrency}" if shared_memory == "none" else f"c{concurrency}-{shared_memory}-shm"


def serve_modes(compare_pinned: bool) -> list[tuple[str, bool, list[str]]]:
    """(name, batching, extra arguments) of each server the serve phase starts: batching on and off,
    and with --compare-pinned batching on without pinned memory too, between the two."""
    pageable = [(PAGEABLE, True, ["--pinned-memory-pool-byte-size", "0"])] if compare_pinned else []
    return [("on", True, []), *pageable, ("off", False, [])]


# --------------------------------------------------------------------------- table


def _get(d: dict | None, *keys, default=None):
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def table(state: dict, cfg: dict) -> str:
    small, mid, big = cfg["batches"][0], cfg["batches"][1], cfg["batches"][-1]
    top = max(cfg["concurrency"])
    header = (f"| model | engine | build s | cosine | max abs err | b{small} p50 / p99 ms | b{mid} items/s | "
              f"b{big} items/s | × PyTorch FP32 b{mid} / b{big} | × PyTorch FP16 b{mid} / b{big} | "
              f"served c={top} batching on items/s | off items/s | on/off | payload MB/s on / off |")
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]

    def num(value, digits=0):
        return "-" if value is None else f"{value:,.{digits}f}"

    def ratio(a, b):
        return "-" if a is None or not b else f"{a / b:.2f}"

    for model_name, entry in state.get("models", {}).items():
        t32, t16 = entry.get("torch_fp32"), entry.get("torch_fp16")
        for label, figures in (("PyTorch eager FP32", t32), ("PyTorch eager FP16" + (" channels-last" if model_name == "resnet50" else ""), t16)):
            if not figures or "error" in figures:
                if figures:
                    lines.append(f"| {model_name} | {label} | | | | error: {figures['error'][:80]} | | | | | | | | |")
                continue
            lines.append(f"| {model_name} | {label} | | | | {num(_get(figures, f'b{small}', 'p50_ms'), 2)} / "
                         f"{num(_get(figures, f'b{small}', 'p99_ms'), 2)} | {num(_get(figures, f'b{mid}', 'items_per_s'))} | "
                         f"{num(_get(figures, f'b{big}', 'items_per_s'))} | | | | | | |")
        for precision in PRECISIONS:
            row = entry.get(precision)
            if not row:
                continue
            if "manifest" not in row:
                lines.append(f"| {model_name} | plansmith ORT {precision} | build {row['build'].get('status')}: "
                             f"{row['build'].get('reason')} | | | | | | | | | | | |")
                continue
            m = row["manifest"]
            ex = row.get("executor", {})
            ex_mid, ex_big = _get(ex, f"b{mid}", "items_per_s"), _get(ex, f"b{big}", "items_per_s")
            on = _get(row, "served", "on", f"c{top}")
            off = _get(row, "served", "off", f"c{top}")
            on_rate, off_rate = _get(on, "items_per_s"), _get(off, "items_per_s")
            lines.append(
                f"| {model_name} | plansmith ORT {precision} ({m['effective_precision']}) | {m['build_seconds']:.1f} | "
                f"{m['accuracy']['cosine']:.6f} | {m['accuracy']['max_abs_error']:.3g} | "
                f"{num(_get(ex, f'b{small}', 'p50_ms'), 2)} / {num(_get(ex, f'b{small}', 'p99_ms'), 2)} | "
                f"{num(ex_mid)} | {num(ex_big)} | "
                f"{ratio(ex_mid, _get(t32, f'b{mid}', 'items_per_s'))} / {ratio(ex_big, _get(t32, f'b{big}', 'items_per_s'))} | "
                f"{ratio(ex_mid, _get(t16, f'b{mid}', 'items_per_s'))} / {ratio(ex_big, _get(t16, f'b{big}', 'items_per_s'))} | "
                f"{num(on_rate)} | {num(off_rate)} | {ratio(on_rate, off_rate)} | "
                f"{num(_get(on, 'payload_bytes_per_s', default=0) / 1e6 if on else None, 1)} / "
                f"{num(_get(off, 'payload_bytes_per_s', default=0) / 1e6 if off else None, 1)} |")
    variants = []
    for model_name, entry in state.get("models", {}).items():
        for precision in PRECISIONS:
            mixed = _get(entry, precision, "executor", "mixed")
            if mixed:
                variants.append(f"- {model_name} {precision} executor, host inputs, random batch sizes 1-{cfg['max_batch']}: "
                                f"{mixed['items_per_s']:,.0f} items/s (slowest run {mixed['slowest_ms']:.1f} ms)")
        for label, figures in _get(entry, "fp16", "variants", default={}).items():
            if "error" in figures:
                variants.append(f"- {model_name} fp16 engine, {label}: failed: {figures['error']}")
            elif "p50_ms" in figures:
                variants.append(f"- {model_name} fp16 engine, {label}: p50 {figures['p50_ms']:.2f} ms, "
                                f"{figures['items_per_s']:,.0f} items/s")
            else:
                variants.append(f"- {model_name} fp16 engine, {label}: {figures['items_per_s']:,.0f} items/s "
                                f"(slowest run {figures['slowest_ms']:.1f} ms)")
    if variants:
        lines += ["", "Executor with random batch sizes (as the dynamic batcher forms them), and raw ONNX Runtime "
                      "sessions on the fp16 engine with other CUDA provider options (inputs and outputs on the device):",
                  *variants]
    return "\n".join(lines)


def save(state: dict, workdir: Path) -> None:
    (workdir / "state.json").write_text(json.dumps(state, indent=1, default=str))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="small shapes on the CPU: a rehearsal, not a measurement")
    parser.add_argument("--phase", choices=("all", "build", "serve"), default="all")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/plansmith-gpu-bench"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/plansmith-gpu-out")))
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)} and "
                        f"{LARGE_OUTPUT_MODEL} (BERT answering with its last hidden state)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--concurrency", help="comma-separated concurrencies (default: 1,64; smoke 1,8)")
    parser.add_argument("--skip-torch", action="store_true", help="no PyTorch baseline (kept from an earlier run)")
    parser.add_argument("--skip-variants", action="store_true", help="no raw-session provider-option variants")
    parser.add_argument("--serve-max-batch", type=int, default=32, help="serve: maxBatchSize (default 32, as runs 10-14 "
                        "served; the engines take 64, which at c=64 halves the throughput: docs/benchmarks.md)")
    parser.add_argument("--instances", type=int, default=1, help="serve: execution instances (each its own sessions "
                        "and CUDA stream), batches running concurrently")
    parser.add_argument("--compare-pinned", action="store_true", help="serve: batching on also without pinned memory "
                        "(--pinned-memory-pool-byte-size 0), and print the ratio")
    parser.add_argument("--shared-memory", default="none", help="serve: where the inputs are, comma-separated, each "
                        "load run once per kind: none (in the request), system, cuda (perf_analyzer's --shared-memory; "
                        "outputs come back in the response)")
    parser.add_argument("--trace-rate", type=int, default=0, help="serve: trace every N-th request and show where "
                        "the traced requests spent their time (0: no tracing)")
    args = parser.parse_args()
    cfg = settings(args.cpu_smoke)
    cfg.update(skip_torch=args.skip_torch, skip_variants=args.skip_variants, trace_rate=args.trace_rate,
               instances=args.instances, serve_max_batch=args.serve_max_batch, compare_pinned=args.compare_pinned,
               shared_memory=args.shared_memory.split(","))
    unknown = set(cfg["shared_memory"]) - set(SHARED_MEMORY_KINDS)
    if unknown:
        parser.error(f"--shared-memory takes {', '.join(SHARED_MEMORY_KINDS)}, not {', '.join(sorted(unknown))}")
    if args.concurrency:
        cfg["concurrency"] = [int(c) for c in args.concurrency.split(",")]
    models, precisions = args.models.split(","), args.precisions.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    state_path = args.workdir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}  # runs for other models add to it
    state["settings"] = cfg
    if args.phase in ("all", "build"):
        state["environment"] = environment(cfg)
        print(json.dumps(state["environment"], indent=1), flush=True)
        detected = state["environment"]["detected_target"]
        if not args.cpu_smoke and detected["compute_capability"] != "9.0":
            print(f"WARNING: NVML target is {detected}, not compute capability 9.0", flush=True)
        build_phase(cfg, state, args.workdir, models, precisions)
    if args.phase in ("all", "serve"):
        serve_phase(cfg, state, args.workdir, models, precisions)
    save(state, args.workdir)
    text = table(state, cfg)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(state, indent=1, default=str))
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
