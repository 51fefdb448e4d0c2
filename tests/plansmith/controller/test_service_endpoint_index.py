"""What the operator reads from its Services' EndpointSlices: the serving pods each routes to."""

from __future__ import annotations

from plansmith.controller import handlers, rendering

NAMESPACE = "ml"


def endpoint_slice(*endpoints: dict) -> dict:
    """An EndpointSlice as the EndpointSlice controller writes it for a model's Service (discovery.k8s.io/v1)."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": "cnn-x7k2p", "namespace": NAMESPACE,
                         "labels": {**handlers.SERVING_LABELS, rendering.MODEL_LABEL: "cnn",
                                    "kubernetes.io/service-name": "cnn"}},
            "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}], "endpoints": list(endpoints)}


def pod_endpoint(pod: str, address: str, **conditions: bool) -> dict:
    return {"addresses": [address], "conditions": conditions, "targetRef": {"kind": "Pod", "name": pod}}


def test_ready_endpoints_and_those_of_unknown_readiness_count_terminating_and_unready_ones_do_not():
    body = endpoint_slice(pod_endpoint("cnn-a-1", "10.0.0.1", ready=True),
                          pod_endpoint("cnn-a-2", "10.0.0.2"),  # readiness unknown: the API says to take it as ready
                          pod_endpoint("cnn-a-3", "10.0.0.3", ready=False, serving=True, terminating=True),
                          pod_endpoint("cnn-a-4", "10.0.0.4", ready=False),
                          {"addresses": ["10.0.0.5"], "conditions": {"ready": True}})  # not a pod's
    indexed = handlers.service_endpoint_index(namespace=NAMESPACE, labels=body["metadata"]["labels"], body=body)
    assert indexed == {(NAMESPACE, "cnn"): ["cnn-a-1", "cnn-a-2", "10.0.0.5"]}


def test_a_service_with_no_endpoints_yet_routes_to_no_pod():
    body = endpoint_slice()
    body["endpoints"] = None  # how the API returns a slice without endpoints
    indexes = handlers.Indexes(nodes={}, build_jobs={}, serving={}, service_endpoints={
        (NAMESPACE, "cnn"): [handlers.service_endpoint_index(namespace=NAMESPACE, labels=body["metadata"]["labels"],
                                                             body=body)[(NAMESPACE, "cnn")]]})
    assert indexes.routed_pods(NAMESPACE, "cnn") == 0
    assert indexes.routed_pods(NAMESPACE, "other") == 0


def test_a_pod_in_two_slices_is_routed_to_once():
    ipv4 = ["cnn-a-1", "cnn-a-2"]
    ipv6 = ["cnn-a-1", "cnn-a-2"]  # a dual-stack Service: one slice per address family
    indexes = handlers.Indexes(nodes={}, build_jobs={}, serving={},
                               service_endpoints={(NAMESPACE, "cnn"): [ipv4, ipv6]})
    assert indexes.routed_pods(NAMESPACE, "cnn") == 2
