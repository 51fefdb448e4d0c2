"""Which hardware this build is for: the GPU through NVML, else the CPU.

`detect_target()` is the adapter (NVML, /proc/cpuinfo); the decisions are pure functions
(`widest_isa`, `parse_cpuinfo`, `target_from_override`) so they are tested without a GPU.
The engine key uses the compute capability for GPUs and "<arch>-<widest ISA>" for CPUs:
ONNX Runtime bakes ISA-specific kernels and layouts into an optimized model (GUIDE.md §1).
"""

from __future__ import annotations

import logging
import platform
import re
from dataclasses import dataclass, replace
from pathlib import Path

from plansmith.engine_key import EngineTarget
from plansmith.spec import COMPUTE_CAPABILITY_PATTERN

log = logging.getLogger(__name__)

# Widest first: the first flag a CPU has names its ISA level in the key.
ISA_LEVELS = ("avx512_vnni", "avx512f", "avx2", "sse4_2")
# ARM servers: ONNX Runtime picks dot-product / SVE kernels when present.
ARM_ISA_LEVELS = ("sve2", "sve", "asimddp", "asimd")


@dataclass(frozen=True)
class DetectedTarget:
    """The engine target plus facts that go into the manifest but not the key."""

    target: EngineTarget
    driver_version: str | None = None
    cpu_vendor: str | None = None


def widest_isa(flags: set[str], arch: str) -> str:
    """'x86_64-avx512_vnni' from the CPU's flags; '<arch>-generic' when none is known."""
    levels = ARM_ISA_LEVELS if arch in ("aarch64", "arm64") else ISA_LEVELS
    for level in levels:
        if level in flags:
            return f"{arch}-{level}"
    return f"{arch}-generic"


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(vendor, flags) of the first processor in /proc/cpuinfo text (x86 'flags', ARM 'Features')."""
    vendor = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("vendor_id", "CPU implementer") and vendor is None:
            vendor = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return vendor, flags


def cpu_target() -> DetectedTarget:
    arch = platform.machine() or "unknown"
    try:
        vendor, flags = parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        vendor, flags = None, set()
    return DetectedTarget(EngineTarget(device="cpu", cpu_isa=widest_isa(flags, arch)), cpu_vendor=vendor)


def gpu_target() -> DetectedTarget | None:
    """The first GPU seen by NVML, or None when there is no NVIDIA driver or GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as error:  # pynvml.NVMLError_*: no driver / library on this machine
        log.debug("NVML unavailable: %s", error)
        return None
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        driver = pynvml.nvmlSystemGetDriverVersion()
        name = name.decode() if isinstance(name, bytes) else name
        driver = driver.decode() if isinstance(driver, bytes) else driver
        return DetectedTarget(
            EngineTarget(device="gpu", compute_capability=f"{major}.{minor}", gpu_product=gpu_product_label(name)),
            driver_version=driver,
        )
    finally:
        pynvml.nvmlShutdown()


def gpu_product_label(name: str) -> str:
    """NVML's 'NVIDIA H100 80GB HBM3' as GPU Feature Discovery labels it: 'NVIDIA-H100-80GB-HBM3'."""
    return re.sub(r"\s+", "-", name.strip())


def detect_target() -> DetectedTarget:
    """The GPU when one is present, else the CPU."""
    return gpu_target() or cpu_target()


def target_from_override(value: str, detected: DetectedTarget) -> DetectedTarget:
    """Apply `--target`: 'auto' keeps what was detected, 'cpu' forces the CPU, 'cpu:<isa>' names the CPU
    target as the operator does (e.g. cpu:x86_64 for any x86-64 node), '9.0' forces a GPU compute
    capability (a cross-build; the product name is kept only when the detected GPU has it)."""
    if value in ("", "auto"):
        return detected
    if value == "cpu":
        return detected if detected.target.device == "cpu" else cpu_target()
    if value.startswith("cpu:"):
        isa = value[4:]
        if not re.fullmatch(r"[A-Za-z0-9_]+(-[A-Za-z0-9_]+)?", isa):
            raise ValueError(f"--target cpu:<isa> needs an ISA such as cpu:x86_64 or cpu:x86_64-avx2, got {value!r}")
        cpu = detected if detected.target.device == "cpu" else cpu_target()
        here = cpu.target.cpu_isa or ""
        arch, _, extension = isa.partition("-")
        # an arch-only target is built portable; one that names an extension is optimized at ONNX
        # Runtime's full level, whose layouts (NCHWc blocks) are this CPU's SIMD width: only this
        # CPU's own extension describes such an engine
        if arch != here.partition("-")[0] or (extension and isa != here):
            raise ValueError(f"--target {value} cannot be built on this {here or 'unknown'} CPU: an engine optimized "
                             f"for a CPU is optimized for the one that builds it; build on such a CPU, or for "
                             f"cpu:{arch} (portable)")
        return replace(cpu, target=EngineTarget(device="cpu", cpu_isa=isa))
    if not re.fullmatch(COMPUTE_CAPABILITY_PATTERN, value):
        raise ValueError(f"--target must be auto, cpu, cpu:<isa> or a compute capability such as 9.0, got {value!r}")
    same = detected.target.device == "gpu" and detected.target.compute_capability == value
    product = detected.target.gpu_product if same else None
    return replace(
        detected,
        target=EngineTarget(device="gpu", compute_capability=value, gpu_product=product),
        driver_version=detected.driver_version if same else None,
    )
