"""Does an engine fit this machine? A pure check of a manifest against a description of the
machine (`Machine`), plus the adapter that describes the machine we run on.

Rules:
- the backend must be one this runtime has, at the version that built the engine for TensorRT
  (plans are bound to the TensorRT version); ONNX Runtime engines (optimized .onnx files) load in
  any ONNX Runtime at least as new as the one that wrote them, so only an older one is refused;
- CPU engines record the widest SIMD extension they were optimized for as "<arch>-<extension>"
  (e.g. "x86_64-avx2"); the machine must have that architecture and that extension;
- GPU engines need the GPU they will run on, CUDA device 0 (the first that CUDA_VISIBLE_DEVICES
  lets this process see, in CUDA's order), to have the recorded compute capability, unless built
  with hardware compatibility "ampere+", which runs on any compute capability >= 8.0. Another
  visible GPU that matches does not help: the executors use device 0.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path

from plansmith.manifest import Manifest

log = logging.getLogger(__name__)


class IncompatibleEngine(RuntimeError):
    """The engine cannot run on this machine (backend, CPU or GPU mismatch)."""


@dataclass(frozen=True)
class Machine:
    arch: str  # platform.machine(): x86_64, aarch64
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    gpu_compute_capabilities: tuple[str, ...] = ()  # one per usable GPU in CUDA's device order, e.g. ("9.0",)
    backend_versions: dict[str, str] = field(default_factory=dict)  # installed backends


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def problems(manifest: Manifest, machine: Machine) -> list[str]:
    """Why this engine cannot run here; empty when it can."""
    found: list[str] = []
    installed = machine.backend_versions.get(manifest.backend)
    if installed is None:
        found.append(f"engine backend {manifest.backend} is not installed in this runtime")
    elif manifest.backend == "tensorrt" and installed != manifest.backend_version:
        found.append(f"engine was built by TensorRT {manifest.backend_version}, this runtime has TensorRT {installed}")
    elif manifest.backend == "onnxruntime" and _version_tuple(installed)[:2] < _version_tuple(manifest.backend_version)[:2]:
        found.append(f"engine was written by ONNX Runtime {manifest.backend_version}, this runtime has older {installed}")

    target = manifest.target
    # an engine keyed for a GPU type but built for the CPU (`plansmith build --simulated-gpu` on a dev
    # cluster's simulated GPU nodes) needs the CPU it was built for, not a GPU
    runs_on_cpu = target.device == "cpu" or target.execution_provider == "CPUExecutionProvider"
    if runs_on_cpu:
        if target.cpu_isa:
            arch, _, extension = target.cpu_isa.partition("-")
            if arch != machine.arch:
                found.append(f"engine is for CPU architecture {arch}, this machine is {machine.arch}")
            elif extension not in ("", "generic") and extension not in machine.cpu_flags:
                found.append(f"engine is optimized for {target.cpu_isa}, this CPU lacks {extension}")
    else:
        capabilities = machine.gpu_compute_capabilities
        if not capabilities:
            found.append("engine needs a GPU, none is visible (no CUDA device)")
            return found
        runs_on = capabilities[0]  # CUDA device 0, the executors' device
        where = "this GPU" if len(capabilities) == 1 else "the GPU it would run on (CUDA device 0)"
        if target.hardware_compatibility == "ampere+":
            if _version_tuple(runs_on) < (8, 0):
                found.append(f"engine is built for Ampere or newer (ampere+), {where} has compute capability {runs_on}")
        elif target.compute_capability != runs_on:
            found.append(f"engine is built for compute capability {target.compute_capability}, {where} has {runs_on}")
    return found


# --------------------------------------------------------------------------- this machine


def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def gpu_compute_capabilities() -> tuple[str, ...]:
    """Compute capabilities of the GPUs this process can use, in CUDA's device order (what
    CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER make it), through the CUDA runtime; without
    cuda-python, NVML's, which lists every GPU of the container in PCI order. () without a driver."""
    through_cuda = cuda_compute_capabilities()
    return through_cuda if through_cuda is not None else nvml_compute_capabilities()


def cuda_compute_capabilities() -> tuple[str, ...] | None:
    """The CUDA devices' compute capabilities, device 0 first; None without cuda-python, () when
    CUDA finds no device (no driver, or CUDA_VISIBLE_DEVICES hides them all)."""
    from plansmith_runtime.executors.cuda import CudaUnavailable, check_cuda, cuda_runtime

    try:
        cudart = cuda_runtime()
    except CudaUnavailable:
        return None
    error, count = cudart.cudaGetDeviceCount()
    if int(error) != 0:
        return ()
    attribute = cudart.cudaDeviceAttr
    return tuple(f"{check_cuda(cudart.cudaDeviceGetAttribute(attribute.cudaDevAttrComputeCapabilityMajor, device))}."
                 f"{check_cuda(cudart.cudaDeviceGetAttribute(attribute.cudaDevAttrComputeCapabilityMinor, device))}"
                 for device in range(count))


def nvml_compute_capabilities() -> tuple[str, ...]:
    """Every GPU NVML sees, in its (PCI) order; () without a driver."""
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except Exception:  # pynvml.NVMLError: no driver, no device
        return ()
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            found.append(f"{major}.{minor}")
        return tuple(found)
    finally:
        pynvml.nvmlShutdown()


def installed_backends() -> dict[str, str]:
    """Backends importable here with their versions. A module without a version (an empty
    namespace package or a stub, as some machines carry for `tensorrt`) does not count."""
    import importlib

    versions = {}
    for name in ("onnxruntime", "tensorrt"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        version = getattr(module, "__version__", None)
        if isinstance(version, str) and version:
            versions[name] = version
    return versions


def this_machine() -> Machine:
    return Machine(arch=platform.machine(), cpu_flags=cpu_flags(),
                   gpu_compute_capabilities=gpu_compute_capabilities(), backend_versions=installed_backends())
