"""Simulated GPUs look to the operator like NVIDIA's device plugin + GPU Feature Discovery."""

from __future__ import annotations

from plansmith.devcluster.cluster import NODES
from plansmith.devcluster.gpus import H100, status_patch


def test_gpu_feature_discovery_labels_and_status_patch():
    labels = H100.labels()
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert (labels["nvidia.com/gpu.compute.major"], labels["nvidia.com/gpu.compute.minor"]) == ("9", "0")
    assert labels["nvidia.com/gpu.count"] == "8" and labels["nvidia.com/mig.strategy"] == "mixed"
    assert labels["plansmith.io/simulated-gpus"] == "true"
    ops = {op["path"]: op["value"] for op in status_patch(H100)}
    assert ops == {"/status/capacity/nvidia.com~1gpu": "8", "/status/allocatable/nvidia.com~1gpu": "8",
                   "/status/capacity/nvidia.com~1mig-1g.10gb": "7", "/status/allocatable/nvidia.com~1mig-1g.10gb": "7"}


def test_the_two_nodes_offer_two_gpu_types_on_separate_networks_and_ports():
    products = {spec.gpus.product for spec in NODES}
    capabilities = {(spec.gpus.compute_major, spec.gpus.compute_minor) for spec in NODES}
    assert len(products) == 2 and len(capabilities) == 2
    for attribute in ("pod_subnet", "bridge", "kubelet_port", "kubelet_healthz_port", "cgroup_root", "cni_network"):
        assert len({getattr(spec, attribute) for spec in NODES}) == len(NODES), attribute
