"""A reconcile that was waiting for a model's lock while the model was deleted must not act on it:
without a finalizer nothing else marks the model as gone, and the reconcile would launch Jobs (and
Deployments) owned by an object that no longer exists. Deterministic here, in process, against the
real API server; the race itself showed up in bench/operator.py."""

from __future__ import annotations

import asyncio
import logging

import pytest
from kubernetes import client

from plansmith import testmodels
from plansmith.controller import handlers
from plansmith.controller.targets import node_info
from plansmith.spec import API_GROUP, API_VERSION

NAMESPACE = "deleted-model-tests"
GPU_NODE = {"metadata": {"name": "gpu-node", "labels": {
    "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.compute.major": "9", "nvidia.com/gpu.compute.minor": "0", "kubernetes.io/arch": "amd64"}},
    "status": {"allocatable": {"nvidia.com/gpu": "8"}, "conditions": [{"type": "Ready", "status": "True"}]}}


@pytest.fixture
def operator_state(control_plane, kube_client, monkeypatch):
    from plansmith.controller.kube import KubeApi

    monkeypatch.setattr(handlers, "KubeApi", lambda: KubeApi(str(control_plane.kubeconfig)))
    client.CoreV1Api(kube_client).create_namespace({"metadata": {"name": NAMESPACE}})
    handlers.OPERATOR = handlers.Operator()
    yield handlers.OPERATOR
    handlers.OPERATOR = None


def test_a_reconcile_queued_behind_a_deleted_model_creates_nothing(operator_state, kube_client, tmp_path):
    source = testmodels.mlp(tmp_path / "mlp.onnx")
    model = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "InferenceModel",
             "metadata": {"name": "gone", "namespace": NAMESPACE, "uid": "0b6c1a52-1d7e-4f0e-9d7a-000000000001",
                          "generation": 1},
             "spec": {"model": {"uri": source.path.as_uri(), "inputs": source.spec_inputs()},
                      "storage": {"uri": (tmp_path / "engines").as_uri()}},
             "status": {}}
    indexes = handlers.Indexes(nodes={handlers.NODES: [node_info(GPU_NODE)]}, build_jobs={}, serving={},
                               service_endpoints={})

    async def scenario():
        lock = operator_state.lock(NAMESPACE, "gone")
        await lock.acquire()  # a reconcile of the model is running
        queued = asyncio.create_task(handlers.reconcile(NAMESPACE, "gone", model, logging.getLogger("test"), indexes))
        await asyncio.sleep(0.1)  # another one queues behind it
        handlers.model_deleted(uid=model["metadata"]["uid"])  # kopf calls it for DELETED events
        lock.release()
        try:
            await queued
        except Exception as error:  # noqa: BLE001 - acting on a deleted model fails further on: report the Jobs first
            return error
        return None

    error = asyncio.run(scenario())
    jobs = client.BatchV1Api(kube_client).list_namespaced_job(NAMESPACE).items
    assert [job.metadata.name for job in jobs] == [], "a Job was launched for a model deleted meanwhile"
    assert error is None
