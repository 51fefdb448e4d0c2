"""Target discovery over Node objects: GPU types from GFD labels, eligibility, MIG, spec.targets, CPU fallback."""

from __future__ import annotations

from plansmith.controller.settings import OperatorSettings
from plansmith.controller.targets import NodeInfo, Taint, discover_targets, hardware_compatibility_problem, node_info
from plansmith.validation import parse_spec

SETTINGS = OperatorSettings(builder_backend_version="1.0")
H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.compute.major": "9",
        "nvidia.com/gpu.compute.minor": "0"}
A100 = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB", "nvidia.com/gpu.compute.major": "8",
        "nvidia.com/gpu.compute.minor": "0"}


def gpu_node(name, labels, gpus="4", **kw) -> NodeInfo:
    return NodeInfo(name=name, labels={"kubernetes.io/arch": "amd64", **labels},
                    allocatable={"cpu": "8", "nvidia.com/gpu": gpus, **kw.pop("extra", {})}, **kw)


def spec(**serving_and_more):
    raw = {"model": {"uri": "s3://models/m.onnx"}, **serving_and_more}
    return parse_spec(raw)


def test_groups_nodes_by_gpu_type():
    nodes = [gpu_node("h1", H100), gpu_node("h2", H100), gpu_node("a1", A100), NodeInfo("cpu1", {}, {"cpu": "4"})]
    found = discover_targets(nodes, spec(), SETTINGS)
    assert [(t.gpu_product, t.compute_capability, t.nodes) for t in found.targets] == [
        ("NVIDIA-A100-SXM4-40GB", "8.0", ("a1",)),
        ("NVIDIA-H100-80GB-HBM3", "9.0", ("h1", "h2")),
    ]
    assert {t.slug for t in found.targets} == {"sm80-nvidia-a100-sxm4-40gb", "sm90-nvidia-h100-80gb-hbm3"}
    assert found.unmatched == []


def test_nodes_a_pod_cannot_use_are_ignored():
    nodes = [
        gpu_node("cordoned", H100, unschedulable=True),
        gpu_node("notready", H100, ready=False),
        gpu_node("full", H100, gpus="0"),
        gpu_node("tainted", A100, taints=(Taint("dedicated", "ml", "NoSchedule"),)),
    ]
    found = discover_targets(nodes, spec(), SETTINGS)
    assert found.targets == []
    # the H100s exist, cordoned or not Ready: present (the reconcile tells whether they still serve), not unmatched
    assert found.unmatched == [] and found.still_present == {"sm90-nvidia-h100-80gb-hbm3"}
    assert discover_targets(nodes[2:], spec(), SETTINGS).unmatched == [
        "no schedulable GPU node matches serving.nodeSelector/tolerations/mig"]
    tolerant = spec(serving={"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]})
    assert [t.nodes for t in discover_targets(nodes, tolerant, SETTINGS).targets] == [("tainted",)]


def test_a_gpu_type_whose_nodes_take_no_new_pods_is_no_target_but_still_present():
    """Cordoned or NotReady nodes get no new build or pod, but the type's serving Deployment stays
    (Kubernetes leaves running pods there); a type the spec no longer selects, or whose nodes the
    pods cannot use at all, is gone."""
    nodes = [gpu_node("h1", H100, unschedulable=True), gpu_node("a1", A100, ready=False),
             gpu_node("t1", {**A100, "nvidia.com/gpu.product": "NVIDIA-A100-PCIE-40GB"},
                      taints=(Taint("dedicated", "ml", "NoSchedule"),))]
    found = discover_targets(nodes, spec(), SETTINGS)
    assert found.targets == []
    assert found.still_present == {"sm90-nvidia-h100-80gb-hbm3", "sm80-nvidia-a100-sxm4-40gb"}
    only_hopper = discover_targets(nodes, spec(targets=[{"computeCapability": "9.0"}]), SETTINGS)
    assert only_hopper.targets == [] and only_hopper.still_present == {"sm90-nvidia-h100-80gb-hbm3"}
    uncordoned = discover_targets([gpu_node("h1", H100), *nodes[1:]], spec(), SETTINGS)
    assert [t.slug for t in uncordoned.targets] == ["sm90-nvidia-h100-80gb-hbm3"]
    assert uncordoned.still_present == {"sm90-nvidia-h100-80gb-hbm3", "sm80-nvidia-a100-sxm4-40gb"}


def test_node_selector_narrows_the_nodes():
    nodes = [gpu_node("h1", {**H100, "pool": "a"}), gpu_node("h2", {**H100, "pool": "b"})]
    found = discover_targets(nodes, spec(serving={"nodeSelector": {"pool": "b"}}), SETTINGS)
    assert [t.nodes for t in found.targets] == [("h2",)]


def test_spec_targets_select_and_report_what_is_missing():
    nodes = [gpu_node("h1", H100), gpu_node("a1", A100)]
    found = discover_targets(nodes, spec(targets=[{"computeCapability": "9.0"}, {"gpuProduct": "NVIDIA-L4"}]), SETTINGS)
    assert [t.compute_capability for t in found.targets] == ["9.0"]
    assert found.unmatched == ["no schedulable node with gpuProduct=NVIDIA-L4"]


def test_mig_mixed_needs_the_slice_resource_single_needs_the_mig_product():
    mixed = gpu_node("m", {**A100, "nvidia.com/mig.strategy": "mixed"}, gpus="0", extra={"nvidia.com/mig-1g.10gb": "7"})
    whole = gpu_node("w", A100)
    found = discover_targets([mixed, whole], spec(serving={"mig": {"profile": "1g.10gb"}}), SETTINGS)
    assert [(t.nodes, t.resource) for t in found.targets] == [(("m",), "nvidia.com/mig-1g.10gb")]

    single = gpu_node("s", {**A100, "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.10gb",
                            "nvidia.com/mig.strategy": "single"})
    found = discover_targets([single, whole], spec(serving={"mig": {"profile": "1g.10gb"}}), SETTINGS)
    assert [(t.nodes, t.resource) for t in found.targets] == [(("s",), "nvidia.com/gpu")]


def test_cpu_only_cluster_gets_a_cpu_target_unless_tensorrt_is_required():
    nodes = [NodeInfo("c1", {"kubernetes.io/arch": "amd64"}, {"cpu": "4"})]
    found = discover_targets(nodes, spec(), SETTINGS)
    assert [(t.device, t.cpu_arch, t.builder_target_arg) for t in found.targets] == [("cpu", "x86_64", "cpu:x86_64")]
    found = discover_targets(nodes, spec(build={"backend": "tensorrt"}), SETTINGS)
    assert found.targets == [] and "no GPU node" in found.unmatched[0]


def test_node_info_reads_a_node_object():
    node = {"metadata": {"name": "n", "labels": H100},
            "spec": {"taints": [{"key": "k", "effect": "NoExecute"}], "unschedulable": True},
            "status": {"allocatable": {"nvidia.com/gpu": 2}, "conditions": [{"type": "Ready", "status": "True"}]}}
    info = node_info(node)
    assert info.ready and info.unschedulable and info.allocatable["nvidia.com/gpu"] == "2"
    assert info.taints == (Taint("k", None, "NoExecute"),)


def test_ampere_plus_plans_are_for_ampere_or_newer_only():
    t4 = {"nvidia.com/gpu.product": "Tesla-T4", "nvidia.com/gpu.compute.major": "7", "nvidia.com/gpu.compute.minor": "5"}
    nodes = [gpu_node("a1", A100), gpu_node("t1", t4)]
    ampere_plus = spec(build={"backend": "tensorrt", "hardwareCompatibility": "ampere+"})
    found = {t.gpu_product: t for t in discover_targets(nodes, ampere_plus, SETTINGS).targets}
    assert hardware_compatibility_problem(ampere_plus, found["NVIDIA-A100-SXM4-40GB"], "tensorrt") is None
    problem = hardware_compatibility_problem(ampere_plus, found["Tesla-T4"], "tensorrt")
    assert problem.startswith("hardwareCompatibility ampere+ needs compute capability 8.0 or newer; Tesla-T4 has 7.5")
    assert hardware_compatibility_problem(spec(), found["Tesla-T4"], "tensorrt") is None
    # backend auto on the ONNX Runtime builder: the setting means nothing there, every GPU type builds
    auto = spec(build={"hardwareCompatibility": "ampere+"})
    assert hardware_compatibility_problem(auto, found["Tesla-T4"], "onnxruntime") is None


def test_no_cpu_fallback_with_a_tensorrt_builder_image():
    """A CPU engine is ONNX Runtime's: with the TensorRT builder its Job could only fail."""
    from dataclasses import replace

    cpu_only = [NodeInfo("cpu1", {"kubernetes.io/arch": "amd64"}, {"cpu": "4"})]
    assert [t.slug for t in discover_targets(cpu_only, spec(), SETTINGS).targets] == ["cpu-x86-64"]
    tensorrt_builder = replace(SETTINGS, builder_backend="tensorrt")
    found = discover_targets(cpu_only, spec(), tensorrt_builder)
    assert found.targets == [] and found.unmatched == ["the cluster has no GPU node (nvidia.com/gpu.product label)"]
