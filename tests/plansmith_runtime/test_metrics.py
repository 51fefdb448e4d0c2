"""Metrics are exposed under Triton's names, so Triton dashboards and alerts work unchanged."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from plansmith_runtime.metrics import Metrics


def test_triton_counters_keep_their_names_without_total_suffix():
    metrics = Metrics("resnet", "1")
    metrics.stats.success, metrics.stats.inference_count, metrics.stats.exec_count = 3, 12, 2
    metrics.batch_size.observe(8)
    metrics.set_queue_depth(5)
    text = metrics.render().decode()
    assert "# TYPE nv_inference_count counter\n" in text
    assert 'nv_inference_request_success{model="resnet",version="1"} 3\n' in text
    assert 'nv_inference_exec_count{model="resnet",version="1"} 2\n' in text
    assert 'nv_inference_pending_request_count{model="resnet",version="1"} 5\n' in text
    assert "nv_inference_count_total" not in text
    families = {family.name: family for family in text_string_to_metric_families(text)}  # parses as Prometheus text
    assert families["plansmith_batch_size"].type == "histogram"
    assert families["plansmith_queue_depth"].samples[0].value == 5


def test_model_statistics_read_as_tritons_protobuf_message_and_charge_each_request_its_batch():
    from google.protobuf import json_format
    from tritonclient.grpc import service_pb2

    from plansmith_runtime.metrics import model_statistics

    metrics = Metrics("resnet", "1")
    metrics.record_execution(items=4, requests=3, input_us=10, infer_us=200, output_us=5)  # one request had 2 items
    metrics.record_execution(items=1, requests=1, input_us=1, infer_us=50, output_us=1)
    metrics.record_execution(items=4, requests=2, input_us=10, infer_us=220, output_us=5)
    stats = metrics.stats
    stats.success, stats.request_us, stats.queue_us = 6, 2000, 300
    document = model_statistics("resnet", "1", stats)
    # ParseDict rejects any field name or type the message does not have
    message = json_format.ParseDict({"model_stats": [document]}, service_pb2.ModelStatisticsResponse()).model_stats[0]
    assert (message.inference_count, message.execution_count) == (9, 3)
    assert message.inference_stats.compute_infer.ns == (200 * 3 + 50 + 220 * 2) * 1000
    assert message.inference_stats.success.count == message.inference_stats.queue.count == 6
    assert [(b.batch_size, b.compute_infer.count, b.compute_infer.ns) for b in message.batch_stats] == [
        (1, 1, 50_000), (4, 2, 420_000)]
    assert message.last_inference > 0
    text = metrics.render().decode()
    assert 'nv_inference_compute_input_duration_us{model="resnet",version="1"} ' in text
    assert 'nv_inference_compute_output_duration_us{model="resnet",version="1"} ' in text


def test_latency_summaries_appear_only_when_asked_with_tritons_names_and_quantile_labels():
    assert "summary" not in Metrics("resnet", "1").render().decode()  # Triton's default: off
    metrics = Metrics("resnet", "1", ((0.5, 0.05), (0.99, 0.001)))
    empty = {family.name: family for family in text_string_to_metric_families(metrics.render().decode())}
    assert [sample.value for sample in empty["nv_inference_request_summary_us"].samples][:2] == [0, 0]  # count, sum
    for request_us in range(1, 101):  # 1..100 us
        metrics.record_success(float(request_us), queue_us=10.0)
    metrics.record_execution(items=8, requests=5, input_us=3.0, infer_us=400.0, output_us=2.0)
    text = metrics.render().decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    names = [name for name in families if name.endswith("_summary_us")]
    assert names == ["nv_inference_request_summary_us", "nv_inference_queue_summary_us", "nv_inference_compute_input_summary_us",
                     "nv_inference_compute_infer_summary_us", "nv_inference_compute_output_summary_us"]
    assert all(families[name].type == "summary" for name in names)

    def samples(name):
        return {sample.labels.get("quantile", sample.name.rsplit("_", 1)[-1]): sample.value for sample in families[name].samples}

    request = samples("nv_inference_request_summary_us")
    assert (request["count"], request["sum"]) == (100, 5050.0)
    assert request["0.5"] == pytest.approx(50, rel=0.01) and request["0.99"] == pytest.approx(99, rel=0.01)
    assert samples("nv_inference_queue_summary_us")["sum"] == 1000.0
    infer = samples("nv_inference_compute_infer_summary_us")
    assert (infer["count"], infer["sum"]) == (5, 2000.0)  # each of the batch's 5 requests took its 400 us
    assert metrics.stats.success == 100 and metrics.stats.request_us == 5050.0  # the counters as before
    assert 'nv_inference_request_summary_us{model="resnet",version="1",quantile="0.99"} ' in text
