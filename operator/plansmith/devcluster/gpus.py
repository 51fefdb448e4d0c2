"""Simulated GPUs: what a node would advertise if NVIDIA's device plugin and GPU Feature Discovery
ran on it. There are no GPUs here; the scheduler and the kubelet only count them, containers get
no devices, and engines built on these nodes use the onnxruntime CPU backend."""

from __future__ import annotations

from dataclasses import dataclass, field

GPU_RESOURCE = "nvidia.com/gpu"
SIMULATED_LABEL = "plansmith.io/simulated-gpus"


@dataclass(frozen=True)
class GpuProfile:
    product: str  # GFD's nvidia.com/gpu.product, e.g. NVIDIA-H100-80GB-HBM3
    compute_major: int
    compute_minor: int
    memory_mib: int
    count: int
    mig_strategy: str = "none"  # none, single, mixed
    mig_devices: dict[str, int] = field(default_factory=dict)  # e.g. {"mig-1g.10gb": 7} under mixed

    def labels(self) -> dict[str, str]:
        """The GPU Feature Discovery labels of a node with these GPUs."""
        labels = {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": self.product,
            "nvidia.com/gpu.compute.major": str(self.compute_major),
            "nvidia.com/gpu.compute.minor": str(self.compute_minor),
            "nvidia.com/gpu.count": str(self.count),
            "nvidia.com/gpu.memory": str(self.memory_mib),
            "nvidia.com/mig.strategy": self.mig_strategy,
            SIMULATED_LABEL: "true",
        }
        for profile, count in self.mig_devices.items():
            labels[f"nvidia.com/{profile}.count"] = str(count)
        return labels

    def capacity(self) -> dict[str, str]:
        """Extended resources for the node's status (capacity and allocatable)."""
        capacity = {GPU_RESOURCE: str(self.count)}
        capacity.update({f"nvidia.com/{profile}": str(count) for profile, count in self.mig_devices.items()})
        return capacity


# 8 GPUs a node, as on a DGX H100 or an AWS g5.48xlarge: room for several models' build and serving pods
H100 = GpuProfile("NVIDIA-H100-80GB-HBM3", 9, 0, 81559, count=8, mig_strategy="mixed", mig_devices={"mig-1g.10gb": 7})
A10G = GpuProfile("NVIDIA-A10G", 8, 6, 23028, count=8)


def status_patch(profile: GpuProfile) -> list[dict]:
    """A JSON patch for /api/v1/nodes/<name>/status adding the GPUs to capacity and allocatable
    (the kubelet keeps extended resources it does not manage, until it re-registers the node)."""
    ops = []
    for name, value in profile.capacity().items():
        escaped = name.replace("~", "~0").replace("/", "~1")
        ops.append({"op": "add", "path": f"/status/capacity/{escaped}", "value": value})
        ops.append({"op": "add", "path": f"/status/allocatable/{escaped}", "value": value})
    return ops
