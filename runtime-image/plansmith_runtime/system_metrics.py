"""Triton's GPU, CPU and pinned memory metrics on the metrics port: `nv_gpu_utilization`,
`nv_gpu_memory_total_bytes`, `nv_gpu_memory_used_bytes`, `nv_gpu_power_usage`, `nv_gpu_power_limit`,
`nv_energy_consumption` (label `gpu_uuid`), `nv_cpu_utilization`, `nv_cpu_memory_total_bytes`,
`nv_cpu_memory_used_bytes` and `nv_pinned_memory_pool_total_bytes`, `nv_pinned_memory_pool_used_bytes`
(Triton's since 24.01: the `--pinned-memory-pool-byte-size` budget and what the GPU executors hold of
it), with Triton's names, help texts and types, so its Grafana dashboards and alerts work unchanged.

As in Triton, a thread polls them every `--metrics-interval-ms` (2000 by default) and a scrape shows
the latest poll. The CPU figures are the machine's, as Triton reads them (/proc/stat: busy over busy
plus idle jiffies since the previous poll; /proc/meminfo: used = MemTotal - MemAvailable). The GPU
figures come from NVML (nvidia-ml-py, already a dependency; Triton reads them from DCGM, a service
of its own that a serving image does not carry) for the GPUs CUDA may use here (CUDA_VISIBLE_DEVICES, indices or UUIDs). A figure NVML cannot read
for a device (a MIG instance has no utilization or power of its own) is left out, not reported as 0.
The parsing and rendering are pure functions; `NvmlGpus` and `SystemMetrics` are the I/O.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_MS = 2000  # Triton's --metrics-interval-ms


class ProcParseError(ValueError):
    """/proc/stat or /proc/meminfo is not what Linux writes."""


@dataclass(frozen=True)
class CpuTimes:
    """The aggregate `cpu` line of /proc/stat, in jiffies, as Triton splits it."""

    busy: int  # user + nice + system + irq + softirq + steal
    idle: int  # idle + iowait


def parse_proc_stat(text: str) -> CpuTimes:
    first = text.split("\n", 1)[0].split()
    if len(first) < 9 or first[0] != "cpu":
        raise ProcParseError("no aggregate cpu line at the top of /proc/stat")
    try:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(field) for field in first[1:9])
    except ValueError:
        raise ProcParseError(f"unreadable cpu line in /proc/stat: {' '.join(first)}") from None
    return CpuTimes(busy=user + nice + system + irq + softirq + steal, idle=idle + iowait)


def cpu_utilization(before: CpuTimes, after: CpuTimes) -> float:
    """Busy share of the jiffies between two readings, 0.0 to 1.0 (0.0 when none passed)."""
    busy, idle = max(after.busy - before.busy, 0), max(after.idle - before.idle, 0)
    return busy / (busy + idle) if busy + idle else 0.0


@dataclass(frozen=True)
class MemoryUse:
    total_bytes: int
    used_bytes: int


def parse_meminfo(text: str) -> MemoryUse:
    """Total and used RAM; used is MemTotal - MemAvailable, Triton's choice."""
    kilobytes = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            kilobytes[name] = int(fields[0])
    if "MemTotal" not in kilobytes or "MemAvailable" not in kilobytes:
        raise ProcParseError("/proc/meminfo has no MemTotal or MemAvailable")
    total, available = kilobytes["MemTotal"] * 1024, kilobytes["MemAvailable"] * 1024
    if available > total:
        raise ProcParseError("/proc/meminfo: MemAvailable is larger than MemTotal")
    return MemoryUse(total, total - available)


def visible_devices(uuids: Sequence[str], cuda_visible_devices: str | None) -> list[str]:
    """The UUIDs of the devices CUDA may use, in CUDA's order, from the UUIDs of the GPUs by NVML
    index. CUDA_VISIBLE_DEVICES unset: every GPU; otherwise its comma-separated entries: an index,
    a GPU UUID or a unique prefix of one, or a MIG instance's UUID (MIG-...), up to the first entry
    that names no device (CUDA ignores the rest too)."""
    if cuda_visible_devices is None:
        return list(uuids)
    chosen: list[str] = []
    for entry in (part.strip() for part in cuda_visible_devices.split(",")):
        if entry.isdigit():
            found = [uuids[int(entry)]] if int(entry) < len(uuids) else []
        elif entry.startswith("MIG-"):
            found = [entry]
        else:
            found = [uuid for uuid in uuids if entry and uuid.startswith(entry)]
        if len(found) != 1 or found[0] in chosen:
            break
        chosen.append(found[0])
    return chosen


@dataclass(frozen=True)
class GpuReading:
    """One poll of one GPU; None where NVML cannot say."""

    uuid: str
    utilization: float | None = None  # 0.0 to 1.0
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    energy_millijoules: int | None = None  # the driver's counter; reported from the server's start


@dataclass(frozen=True)
class PinnedMemoryUse:
    total_bytes: int  # the pool's budget
    used_bytes: int


@dataclass(frozen=True)
class Poll:
    """What a scrape shows: the latest poll, and each GPU's energy since the first."""

    cpu_utilization: float | None = None
    memory: MemoryUse | None = None
    gpus: tuple[GpuReading, ...] = ()
    energy_joules: tuple[tuple[str, float], ...] = ()  # (uuid, joules since the server started)
    pinned: PinnedMemoryUse | None = None


_GPU_GAUGES = (
    ("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", "utilization"),
    ("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", "memory_total_bytes"),
    ("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", "memory_used_bytes"),
    ("nv_gpu_power_usage", "GPU power usage in watts", "power_watts"),
    ("nv_gpu_power_limit", "GPU power management limit in watts", "power_limit_watts"),
)


def render(poll: Poll) -> str:
    """The poll in Prometheus' text format, with Triton's names, help texts and types (its values
    printed with six decimals, as Triton's prometheus-cpp does)."""
    lines: list[str] = []

    def family(name: str, help_text: str, kind: str, samples: list[tuple[str, float]]) -> None:
        if samples:
            lines.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
            lines.extend(f"{name}{labels} {value:.6f}\n" for labels, value in samples)

    for name, help_text, attribute in _GPU_GAUGES:
        family(name, help_text, "gauge", [(f'{{gpu_uuid="{gpu.uuid}"}}', getattr(gpu, attribute))
                                          for gpu in poll.gpus if getattr(gpu, attribute) is not None])
    family("nv_energy_consumption", "GPU energy consumption in joules since the Triton Server started", "counter",
           [(f'{{gpu_uuid="{uuid}"}}', joules) for uuid, joules in poll.energy_joules])
    if poll.cpu_utilization is not None:
        family("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", "gauge", [("", poll.cpu_utilization)])
    if poll.memory is not None:
        family("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", "gauge", [("", poll.memory.total_bytes)])
        family("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", "gauge", [("", poll.memory.used_bytes)])
    if poll.pinned is not None:
        family("nv_pinned_memory_pool_total_bytes", "Pinned memory pool total memory size, in bytes", "gauge",
               [("", poll.pinned.total_bytes)])
        family("nv_pinned_memory_pool_used_bytes", "Pinned memory pool used memory size, in bytes", "gauge",
               [("", poll.pinned.used_bytes)])
    return "".join(lines)


class GpuSource(Protocol):
    def read(self) -> list[GpuReading]: ...


class NvmlGpus:
    """The GPUs CUDA may use, read through NVML. Empty where there is no driver or no GPU."""

    def __init__(self, cuda_visible_devices: str | None) -> None:
        self.handles: list[tuple[str, object]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as error:  # ImportError, or pynvml.NVMLError: no driver, no device
            log.info("no GPU metrics: NVML is not available", extra={"reason": str(error)})
            return
        self._nvml = pynvml
        uuids = [pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index))
                 for index in range(pynvml.nvmlDeviceGetCount())]
        for uuid in visible_devices(uuids, cuda_visible_devices):
            try:
                self.handles.append((uuid, pynvml.nvmlDeviceGetHandleByUUID(uuid)))
            except pynvml.NVMLError as error:  # a MIG instance that is not there
                log.warning("no metrics for a device NVML cannot find", extra={"device": uuid, "reason": str(error)})
        log.info("collecting GPU metrics", extra={"gpus": [uuid for uuid, _ in self.handles]})

    def read(self) -> list[GpuReading]:
        readings = []
        for uuid, handle in self.handles:
            utilization = self._field(lambda: self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
            memory = self._field(lambda: self._nvml.nvmlDeviceGetMemoryInfo(handle))
            readings.append(GpuReading(
                uuid, utilization,
                memory.total if memory is not None else None, memory.used if memory is not None else None,
                self._field(lambda: self._nvml.nvmlDeviceGetPowerUsage(handle) / 1000),
                self._field(lambda: self._nvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000),
                self._field(lambda: self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))))
        return readings

    def _field(self, read):
        try:
            return read()
        except self._nvml.NVMLError:  # not supported on this device (a MIG instance, an older GPU)
            return None


class SystemMetrics:
    """Polls the CPU and GPU figures on a thread of its own every `interval_ms`; `render()` shows the
    latest poll."""

    def __init__(self, gpus: GpuSource, interval_ms: int = DEFAULT_INTERVAL_MS, proc: Path = Path("/proc"),
                 pinned: Callable[[], PinnedMemoryUse | None] = lambda: None) -> None:
        self.gpus, self.interval_ms, self.proc, self.pinned = gpus, interval_ms, proc, pinned
        self._last_cpu: CpuTimes | None = None  # the previous poll's, to measure the CPU over the interval
        self._first_energy: dict[str, int] = {}
        self._warned = False
        self.latest = Poll()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-poll", daemon=True)

    def start(self) -> None:
        """A first poll now (CPU utilization needs two readings: it comes with the next), then one
        every interval."""
        self.poll()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def render(self) -> str:
        return render(self.latest)

    def poll(self) -> Poll:
        cpu = self._cpu_times()
        utilization = cpu_utilization(self._last_cpu, cpu) if cpu and self._last_cpu else None
        self._last_cpu = cpu or self._last_cpu
        try:
            memory: MemoryUse | None = parse_meminfo((self.proc / "meminfo").read_text())
        except (OSError, ProcParseError):
            memory = None
        readings = tuple(self.gpus.read())
        for reading in readings:
            if reading.energy_millijoules is not None:
                self._first_energy.setdefault(reading.uuid, reading.energy_millijoules)
        energy = tuple((reading.uuid, (reading.energy_millijoules - self._first_energy[reading.uuid]) / 1000)
                       for reading in readings if reading.energy_millijoules is not None)
        # one reference swap: a scrape sees a whole poll
        self.latest = Poll(utilization, memory, readings, energy, self.pinned())
        return self.latest

    def _cpu_times(self) -> CpuTimes | None:
        try:
            return parse_proc_stat((self.proc / "stat").read_text())
        except (OSError, ProcParseError) as error:
            if not self._warned:  # once, not every interval
                log.warning("no CPU utilization metric", extra={"reason": str(error)})
                self._warned = True
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_ms / 1000):
            try:
                self.poll()
            except Exception:  # a failed poll keeps the last one and the next poll tries again
                log.exception("polling the GPU and CPU metrics failed")
