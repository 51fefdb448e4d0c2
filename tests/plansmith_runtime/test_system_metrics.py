"""Triton's GPU and CPU metrics: /proc parsing, CUDA's device selection, the exposition, and the poller."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from plansmith_runtime.system_metrics import (CpuTimes, GpuReading, MemoryUse, NvmlGpus, PinnedMemoryUse, Poll,
                                              ProcParseError, SystemMetrics, cpu_utilization, parse_meminfo,
                                              parse_proc_stat, render, visible_devices)

STAT = "cpu  100 5 40 800 20 3 2 10 0 0\ncpu0 50 2 20 400 10 1 1 5 0 0\nintr 12345\n"
MEMINFO = "MemTotal:       16384 kB\nMemFree:         1024 kB\nMemAvailable:    4096 kB\nBuffers:    1 kB\nHugePages_Total:       0\n"


def test_proc_stat_splits_busy_and_idle_jiffies_as_triton():
    times = parse_proc_stat(STAT)
    assert times == CpuTimes(busy=100 + 5 + 40 + 3 + 2 + 10, idle=800 + 20)  # guest time is inside user already


@pytest.mark.parametrize("text", ["", "cpu0 1 2 3 4 5 6 7 8\n", "cpu  1 2 3\n", "cpu  1 2 x 4 5 6 7 8\n"])
def test_a_proc_stat_without_an_aggregate_cpu_line_is_refused(text):
    with pytest.raises(ProcParseError):
        parse_proc_stat(text)


def test_cpu_utilization_is_the_busy_share_of_the_jiffies_between_two_readings():
    assert cpu_utilization(CpuTimes(100, 300), CpuTimes(130, 370)) == pytest.approx(0.3)
    assert cpu_utilization(CpuTimes(100, 300), CpuTimes(100, 300)) == 0.0  # no time passed
    assert cpu_utilization(CpuTimes(100, 300), CpuTimes(90, 330)) == 0.0  # a counter that went back counts as 0


def test_meminfo_used_is_total_minus_available():
    assert parse_meminfo(MEMINFO) == MemoryUse(total_bytes=16384 * 1024, used_bytes=(16384 - 4096) * 1024)


@pytest.mark.parametrize("text, message", [
    ("MemTotal: 16384 kB\nMemFree: 1 kB\n", "no MemTotal or MemAvailable"),
    ("MemTotal: 1 kB\nMemAvailable: 2 kB\n", "larger than MemTotal"),
])
def test_a_meminfo_without_what_triton_reads_is_refused(text, message):
    with pytest.raises(ProcParseError, match=message):
        parse_meminfo(text)


UUIDS = ["GPU-aaaa-1111", "GPU-aabb-2222", "GPU-cccc-3333"]


@pytest.mark.parametrize("setting, chosen", [
    (None, UUIDS),
    ("", []),
    ("2,0", ["GPU-cccc-3333", "GPU-aaaa-1111"]),  # CUDA's order is the variable's
    ("GPU-cccc", ["GPU-cccc-3333"]),  # a unique prefix of a UUID
    ("1,GPU-aa,0", ["GPU-aabb-2222"]),  # an ambiguous prefix ends the list, as in CUDA
    ("0,7,1", ["GPU-aaaa-1111"]),  # so does an index with no device
    ("0,0", ["GPU-aaaa-1111"]),  # and a device named twice
    ("MIG-5f1c-77, 2", ["MIG-5f1c-77", "GPU-cccc-3333"]),  # a MIG instance is looked up by its UUID
])
def test_the_gpus_reported_are_the_ones_cuda_may_use(setting, chosen):
    assert visible_devices(UUIDS, setting) == chosen


def test_the_exposition_has_tritons_names_types_labels_and_leaves_out_what_nvml_cannot_say():
    poll = Poll(cpu_utilization=0.25, memory=MemoryUse(4096, 1024),
                gpus=(GpuReading("GPU-aaaa", 0.5, 80 << 30, 2 << 30, 301.5, 700.0, 5_000_000),
                      GpuReading("MIG-bbbb", None, 10 << 30, 1 << 30, None, None, None)),
                energy_joules=(("GPU-aaaa", 12.5),), pinned=PinnedMemoryUse(256 << 20, 38 << 20))
    families = {family.name: family for family in text_string_to_metric_families(render(poll))}
    assert set(families) == {"nv_gpu_utilization", "nv_gpu_memory_total_bytes", "nv_gpu_memory_used_bytes",
                             "nv_gpu_power_usage", "nv_gpu_power_limit", "nv_energy_consumption",
                             "nv_cpu_utilization", "nv_cpu_memory_total_bytes", "nv_cpu_memory_used_bytes",
                             "nv_pinned_memory_pool_total_bytes", "nv_pinned_memory_pool_used_bytes"}

    def samples(name):
        return {sample.labels.get("gpu_uuid"): sample.value for sample in families[name].samples}

    assert samples("nv_gpu_utilization") == {"GPU-aaaa": 0.5}  # no utilization of a MIG instance: no sample, not 0
    assert samples("nv_gpu_memory_used_bytes") == {"GPU-aaaa": 2 << 30, "MIG-bbbb": 1 << 30}
    assert samples("nv_gpu_power_usage") == {"GPU-aaaa": 301.5}
    assert samples("nv_energy_consumption") == {"GPU-aaaa": 12.5}
    assert samples("nv_cpu_utilization") == {None: 0.25}
    assert samples("nv_cpu_memory_total_bytes") == {None: 4096}
    assert samples("nv_pinned_memory_pool_total_bytes") == {None: 256 << 20}
    assert samples("nv_pinned_memory_pool_used_bytes") == {None: 38 << 20}
    assert "# HELP nv_pinned_memory_pool_used_bytes Pinned memory pool used memory size, in bytes\n" in render(poll)
    # prometheus_client's parser names a counter without `_total`; the exposed line keeps Triton's name
    assert families["nv_energy_consumption"].type == "counter"
    assert 'nv_energy_consumption{gpu_uuid="GPU-aaaa"} 12.500000\n' in render(poll)
    assert families["nv_gpu_utilization"].type == "gauge"
    assert render(Poll()) == ""


class ScriptedGpus:
    """The readings NVML would give, one list per poll."""

    def __init__(self, polls: list[list[GpuReading]]) -> None:
        self.polls = polls

    def read(self) -> list[GpuReading]:
        return self.polls.pop(0)


def test_the_poller_measures_the_cpu_between_polls_and_energy_from_the_first(tmp_path):
    (tmp_path / "stat").write_text("cpu  100 0 0 300 0 0 0 0 0 0\n")
    (tmp_path / "meminfo").write_text(MEMINFO)
    gpus = ScriptedGpus([[GpuReading("GPU-a", energy_millijoules=7_000), GpuReading("GPU-b")],
                         [GpuReading("GPU-a", energy_millijoules=9_500), GpuReading("GPU-b")]])
    pinned = iter([None, PinnedMemoryUse(1024, 512)])  # before and after the model's loading began
    metrics = SystemMetrics(gpus, interval_ms=60_000, proc=tmp_path, pinned=lambda: next(pinned))
    first = metrics.poll()
    assert first.pinned is None
    assert first.cpu_utilization is None  # one reading measures no interval
    assert first.memory == parse_meminfo(MEMINFO)
    assert first.energy_joules == (("GPU-a", 0.0),)  # since the server started; GPU-b has no energy counter
    (tmp_path / "stat").write_text("cpu  160 0 0 340 0 0 0 0 0 0\n")
    second = metrics.poll()
    assert second.cpu_utilization == pytest.approx(60 / 100)
    assert second.energy_joules == (("GPU-a", 2.5),)
    assert second.pinned == PinnedMemoryUse(1024, 512)
    assert metrics.render() == render(second)


def test_an_unreadable_proc_leaves_the_cpu_figures_out_and_keeps_polling(tmp_path):
    metrics = SystemMetrics(ScriptedGpus([[], []]), proc=tmp_path)  # no stat, no meminfo
    assert metrics.poll() == Poll()
    (tmp_path / "stat").write_text(STAT)
    assert metrics.poll().cpu_utilization is None  # the first reading that worked
    assert "nv_cpu_utilization" not in metrics.render()


def test_without_nvml_there_are_no_gpus_to_read():
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is a runtime dependency")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        assert NvmlGpus(None).read() == []
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver: the GPU benchmark (bench/gpu) checks the readings")
