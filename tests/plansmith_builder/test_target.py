"""Target identification: ISA levels from CPU flags, NVML names as node labels, --target overrides."""

from __future__ import annotations

import pytest

from plansmith.engine_key import EngineTarget
from plansmith_builder.target import (
    DetectedTarget,
    detect_target,
    gpu_product_label,
    parse_cpuinfo,
    target_from_override,
    widest_isa,
)

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R)
flags\t\t: fpu sse4_2 avx2 avx512f avx512_vnni
processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu
"""


def test_widest_isa_wins():
    assert widest_isa({"sse4_2", "avx2", "avx512f", "avx512_vnni"}, "x86_64") == "x86_64-avx512_vnni"
    assert widest_isa({"sse4_2", "avx2", "avx512f"}, "x86_64") == "x86_64-avx512f"
    assert widest_isa({"sse4_2", "avx2"}, "x86_64") == "x86_64-avx2"
    assert widest_isa({"asimd", "asimddp"}, "aarch64") == "aarch64-asimddp"
    assert widest_isa(set(), "riscv64") == "riscv64-generic"


def test_parse_cpuinfo_reads_the_first_processor():
    vendor, flags = parse_cpuinfo(CPUINFO)
    assert vendor == "GenuineIntel" and "avx512_vnni" in flags


def test_gpu_product_label_matches_feature_discovery():
    assert gpu_product_label("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"


def test_this_machine_is_identified():
    detected = detect_target()
    assert detected.target.device in ("cpu", "gpu")
    if detected.target.device == "cpu":
        assert detected.target.cpu_isa.split("-")[0] in ("x86_64", "aarch64")


def test_overrides():
    cpu = DetectedTarget(EngineTarget(device="cpu", cpu_isa="x86_64-avx2"), cpu_vendor="GenuineIntel")
    h100 = DetectedTarget(EngineTarget(device="gpu", compute_capability="9.0", gpu_product="NVIDIA-H100"),
                          driver_version="580.1")
    assert target_from_override("auto", cpu) == cpu
    forced = target_from_override("8.0", cpu).target
    assert (forced.device, forced.compute_capability, forced.gpu_product) == ("gpu", "8.0", None)
    assert target_from_override("9.0", h100) == h100  # same GPU: product and driver kept
    assert target_from_override("8.6", h100).driver_version is None
    assert target_from_override("cpu", h100).target.device == "cpu"
    with pytest.raises(ValueError, match="compute capability"):
        target_from_override("h100", cpu)


def test_a_cpu_target_naming_an_extension_is_built_on_a_cpu_with_that_extension_only():
    """ONNX Runtime's full optimization lays tensors out for the building CPU's SIMD width (NCHWc
    blocks): an AVX-512 builder's engine labelled x86_64-avx2 would be served on AVX2-only nodes."""
    avx512 = DetectedTarget(EngineTarget(device="cpu", cpu_isa="x86_64-avx512_vnni"), cpu_vendor="GenuineIntel")
    assert target_from_override("cpu:x86_64-avx512_vnni", avx512).target.cpu_isa == "x86_64-avx512_vnni"
    assert target_from_override("cpu:x86_64", avx512).target.cpu_isa == "x86_64"  # portable: any x86-64 CPU
    for other in ("cpu:x86_64-avx2", "cpu:aarch64", "cpu:aarch64-sve"):
        with pytest.raises(ValueError, match=f"--target {other} cannot be built on this x86_64-avx512_vnni CPU"):
            target_from_override(other, avx512)
