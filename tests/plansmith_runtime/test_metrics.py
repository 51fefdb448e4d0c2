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
