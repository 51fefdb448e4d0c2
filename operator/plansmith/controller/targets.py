"""Which GPU types to build and serve for: a pure function over the cluster's Node objects.

Nodes are grouped by the labels NVIDIA GPU Feature Discovery publishes (product, compute
capability) and by the resource a pod must request there (`nvidia.com/gpu`, or a MIG slice
`nvidia.com/mig-<profile>` under the mixed strategy). Only nodes a plansmith pod could land on
count: schedulable, Ready, matching `serving.nodeSelector`, every NoSchedule/NoExecute taint
tolerated, and with that resource allocatable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from plansmith.controller.settings import OperatorSettings
from plansmith.engine_key import EngineTarget
from plansmith.spec import InferenceModelSpec, Toleration

GPU_RESOURCE = "nvidia.com/gpu"
ARCHITECTURES = {"amd64": "x86_64", "arm64": "aarch64"}


@dataclass(frozen=True)
class Taint:
    key: str
    value: str | None
    effect: str


@dataclass(frozen=True)
class NodeInfo:
    """What target discovery needs of a Node; built from the Node object by `node_info`."""

    name: str
    labels: dict[str, str]
    allocatable: dict[str, str]
    taints: tuple[Taint, ...] = ()
    unschedulable: bool = False
    ready: bool = True


def node_info(node: dict[str, Any]) -> NodeInfo:
    metadata, spec, status = node.get("metadata", {}), node.get("spec", {}) or {}, node.get("status", {}) or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return NodeInfo(
        name=metadata.get("name", ""),
        labels=dict(metadata.get("labels") or {}),
        allocatable={k: str(v) for k, v in (status.get("allocatable") or {}).items()},
        taints=tuple(Taint(t.get("key", ""), t.get("value"), t.get("effect", "")) for t in spec.get("taints") or []),
        unschedulable=bool(spec.get("unschedulable")),
        ready=conditions.get("Ready") == "True",
    )


@dataclass(frozen=True)
class Target:
    """One GPU type (or the CPU fallback) and the nodes of that type a pod can land on."""

    device: Literal["gpu", "cpu"]
    gpu_product: str | None
    compute_capability: str | None
    resource: str | None
    nodes: tuple[str, ...] = field(default=(), compare=False)
    cpu_arch: str | None = None

    @property
    def slug(self) -> str:
        """DNS-label-safe short name used in Job and Deployment names: sm90-nvidia-h100-80gb-hbm3, cpu-x86-64."""
        if self.device == "cpu":
            raw = f"cpu-{self.cpu_arch}"
        else:
            raw = f"sm{(self.compute_capability or '').replace('.', '')}-{self.gpu_product or 'gpu'}"
        return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")

    def engine_target(self, simulated: bool = False) -> EngineTarget:
        """The key's target; `simulated`: the cluster's GPUs are simulated (its builds run on the CPU)."""
        if self.device == "cpu":
            return EngineTarget(device="cpu", cpu_isa=self.cpu_arch)
        return EngineTarget(device="gpu", compute_capability=self.compute_capability, gpu_product=self.gpu_product,
                            simulated=simulated)

    @property
    def builder_target_arg(self) -> str:
        """How `plansmith build --target` names this target."""
        return f"cpu:{self.cpu_arch}" if self.device == "cpu" else str(self.compute_capability)


@dataclass(frozen=True)
class Discovery:
    targets: list[Target]
    unmatched: list[str]  # one message per spec.targets entry no node satisfies
    # the types the spec selects that have nodes at all, new pods allowed there or not (cordoned,
    # NotReady): Kubernetes leaves running pods on such nodes, and their Deployments stay
    present: tuple[Target, ...] = ()

    @property
    def still_present(self) -> frozenset[str]:
        return frozenset(t.slug for t in self.present)


def tolerates(tolerations: Iterable[Toleration], taint: Taint) -> bool:
    """Kubernetes' toleration matching rules for one taint."""
    for t in tolerations:
        if t.effect and t.effect != taint.effect:
            continue
        if t.operator == "Exists":
            if not t.key or t.key == taint.key:
                return True
        elif t.key == taint.key and (t.value or "") == (taint.value or ""):
            return True
    return False


def _quantity(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def _compute_capability(node: NodeInfo, settings: OperatorSettings) -> str | None:
    major = node.labels.get(settings.gpu_compute_major_label)
    minor = node.labels.get(settings.gpu_compute_minor_label)
    return f"{major}.{minor}" if major is not None and minor is not None else None


def gpu_resource_on(node: NodeInfo, spec: InferenceModelSpec, settings: OperatorSettings) -> str | None:
    """The resource a plansmith pod must request on this node, if the node can host one."""
    mig = spec.serving.mig
    if mig is None:
        return GPU_RESOURCE if _quantity(node.allocatable.get(GPU_RESOURCE)) > 0 else None
    strategy = node.labels.get(settings.mig_strategy_label, settings.mig_strategy)
    if strategy == "mixed":
        resource = f"nvidia.com/mig-{mig.profile}"
        return resource if _quantity(node.allocatable.get(resource)) > 0 else None
    if strategy == "single":
        # GFD's single strategy advertises MIG slices as nvidia.com/gpu and names the product <GPU>-MIG-<profile>
        product = node.labels.get(settings.gpu_product_label, "")
        if product.endswith(f"-MIG-{mig.profile}") and _quantity(node.allocatable.get(GPU_RESOURCE)) > 0:
            return GPU_RESOURCE
    return None


def takes_new_pods(node: NodeInfo) -> bool:
    """Not cordoned and Ready: the scheduler places new pods there."""
    return not node.unschedulable and node.ready


def accepts(node: NodeInfo, spec: InferenceModelSpec) -> bool:
    """The model's pods may run there: serving.nodeSelector matches, NoSchedule/NoExecute taints tolerated."""
    if any(node.labels.get(k) != v for k, v in spec.serving.node_selector.items()):
        return False
    return all(tolerates(spec.serving.tolerations, t) for t in node.taints if t.effect in ("NoSchedule", "NoExecute"))


def hardware_compatibility_problem(spec: InferenceModelSpec, target: Target, backend: str) -> str | None:
    """Why `target` can get no engine with the spec's hardware compatibility level: TensorRT builds
    and runs an ampere+ plan on compute capability 8.0 or newer only, and every target of such a
    model shares one engine key, so a pre-Ampere GPU would be handed the Ampere build."""
    if spec.build.hardware_compatibility != "ampere+" or target.device != "gpu" or backend != "tensorrt":
        return None
    major = int((target.compute_capability or "0").split(".")[0])
    if major >= 8:
        return None
    return (f"hardwareCompatibility ampere+ needs compute capability 8.0 or newer; {target.gpu_product} has "
            f"{target.compute_capability}: leave it out with spec.targets, or build with hardwareCompatibility none")


def discover_targets(nodes: Iterable[NodeInfo], spec: InferenceModelSpec, settings: OperatorSettings) -> Discovery:
    nodes = sorted(nodes, key=lambda n: n.name)
    found, any_gpu_node = _gpu_targets(nodes, spec, settings, only_taking_new_pods=True)
    present, _ = _gpu_targets(nodes, spec, settings, only_taking_new_pods=False)

    # `unmatched` says what has no node at all: a type whose nodes take no new pods is in `present`,
    # and the reconcile says whether its Deployment still serves it
    if not spec.targets:
        if found or any_gpu_node:
            return Discovery(found, [] if present else ["no schedulable GPU node matches serving.nodeSelector/tolerations/mig"],
                             tuple(present))
        # a CPU engine is ONNX Runtime's: not with a TensorRT builder image, nor a spec that asks for TensorRT
        if (settings.cpu_fallback and settings.builder_backend != "tensorrt" and spec.build.backend != "tensorrt"
                and spec.serving.mig is None):
            return Discovery(_cpu_targets(nodes, spec, only_taking_new_pods=True), [],
                             tuple(_cpu_targets(nodes, spec, only_taking_new_pods=False)))
        return Discovery([], ["the cluster has no GPU node (nvidia.com/gpu.product label)"])

    chosen, _ = _selected(found, spec)
    selected_present, unmatched = _selected(present, spec)
    return Discovery(chosen, unmatched, tuple(selected_present))


def _gpu_targets(nodes: list[NodeInfo], spec: InferenceModelSpec, settings: OperatorSettings, *,
                 only_taking_new_pods: bool) -> tuple[list[Target], bool]:
    """The GPU types of the nodes that accept the model's pods (and take new pods, if asked), and
    whether the cluster has any GPU node."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    any_gpu_node = False
    for node in nodes:
        product = node.labels.get(settings.gpu_product_label)
        capability = _compute_capability(node, settings)
        if product is None or capability is None:
            continue
        any_gpu_node = True
        resource = gpu_resource_on(node, spec, settings)
        if resource and accepts(node, spec) and (takes_new_pods(node) or not only_taking_new_pods):
            groups.setdefault((product, capability, resource), []).append(node.name)
    targets = [Target("gpu", product, capability, resource, tuple(names))
               for (product, capability, resource), names in sorted(groups.items())]
    return targets, any_gpu_node


def _selected(found: list[Target], spec: InferenceModelSpec) -> tuple[list[Target], list[str]]:
    """The targets spec.targets selects, and a message for each selector that matches none."""
    chosen: list[Target] = []
    unmatched: list[str] = []
    for selector in spec.targets:
        matches = [
            t for t in found
            if (selector.gpu_product is None or t.gpu_product == selector.gpu_product)
            and (selector.compute_capability is None or t.compute_capability == selector.compute_capability)
        ]
        if not matches:
            wanted = ", ".join(f"{k}={v}" for k, v in (("gpuProduct", selector.gpu_product),
                                                      ("computeCapability", selector.compute_capability)) if v)
            unmatched.append(f"no schedulable node with {wanted}")
        chosen.extend(t for t in matches if t not in chosen)
    return chosen, unmatched


def _cpu_targets(nodes: list[NodeInfo], spec: InferenceModelSpec, *, only_taking_new_pods: bool) -> list[Target]:
    groups: dict[str, list[str]] = {}
    for node in nodes:
        if accepts(node, spec) and (takes_new_pods(node) or not only_taking_new_pods):
            arch = ARCHITECTURES.get(node.labels.get("kubernetes.io/arch", "amd64"), node.labels.get("kubernetes.io/arch"))
            groups.setdefault(arch, []).append(node.name)
    return [Target("cpu", None, None, None, tuple(names), cpu_arch=arch) for arch, names in sorted(groups.items())]
