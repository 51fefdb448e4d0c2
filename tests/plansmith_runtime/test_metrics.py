"""Metrics are exposed under Triton's names, so Triton dashboards and alerts work unchanged."""

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
