"""What machine a benchmark ran on, and what its CPU did while it ran.

Everything here reads /proc and /sys (Linux) with the standard library only, so it
works on a Raspberry Pi or a Jetson with nothing installed. A value the system does
not expose is None, never 0: a report must say "not available" rather than show a
temperature of zero degrees.
"""

from __future__ import annotations

import os
import platform
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

# Flags that decide which kernels onnxruntime (and llama.cpp) can use; /proc/cpuinfo lists hundreds.
_ISA_FLAGS = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    # Arm (Raspberry Pi 4/5, Jetson): NEON is "asimd", dot product "asimddp", fp16 "fphp"/"asimdhp"
    "neon", "asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2",
)


def machine_description() -> dict:
    """CPU model, core counts, ISA flags, RAM, OS and runtime versions of this machine.

    Keys are always present; values the system does not expose are None.
    """
    import numpy as np
    import onnxruntime as ort

    cpuinfo = _read("/proc/cpuinfo") or ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    model = _cpuinfo_value(cpuinfo, "model name") or _cpuinfo_value(cpuinfo, "Model") or platform.processor() or None
    # Raspberry Pi kernels report "Model : Raspberry Pi 5 ..." and no "model name" per core
    board = (_read("/proc/device-tree/model") or "").strip("\x00\n ") or None
    zone = _cpu_thermal_zone()
    return {
        "hostname": platform.node(),
        "board": board,
        "cpu_model": model,
        "arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(cpuinfo),
        "usable_cores": len(usable_cpus()),
        "isa_flags": sorted(f for f in _ISA_FLAGS if f in flags),
        "ram_mb": _meminfo_mb("MemTotal"),
        "ram_available_mb": _meminfo_mb("MemAvailable"),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "numpy": np.__version__,
        "cpu_governor": (_read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or "").strip() or None,
        "cpu_max_mhz": _khz_to_mhz(_read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")),
        "temperature_sensor": zone[1] if zone else None,
    }


# -- sampling during a run ---------------------------------------------------------


def cpu_temperature_c() -> float | None:
    """The CPU's temperature in °C, or None when no thermal zone is exposed (VMs, containers)."""
    zone = _cpu_thermal_zone()
    if zone is None:
        return None
    raw = _read(zone[0] / "temp")
    try:
        return int(raw) / 1000.0 if raw else None
    except ValueError:
        return None


def cpu_frequency_mhz() -> float | None:
    """The mean current frequency over the cores that expose one, in MHz; None when none does."""
    values = []
    for path in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq"):
        mhz = _khz_to_mhz(_read(path))
        if mhz is not None:
            values.append(mhz)
    return sum(values) / len(values) if values else None


def rss_mb() -> float | None:
    """This process's resident memory now, in MB."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) for this process; False where it cannot.

    Writing 5 to /proc/self/clear_refs does this (Linux >= 4.0), so each test gets its own
    peak rather than the process's all-time one.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(pid: int | None = None) -> float | None:
    """This process's peak resident memory since start (or since reset_peak_rss), in MB.

    With `pid`, that of another process of this user, read from /proc (None where there is no
    /proc): a benchmark reads its child's peak without the child importing anything to report it.
    """
    hwm = _status_mb("VmHWM", pid)
    if hwm is not None or pid is not None:
        return hwm
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):
        return None


@dataclass
class Readings:
    """Temperature and frequency sampled during a run; empty lists when not exposed."""

    temperature_c: list[float] = field(default_factory=list)
    frequency_mhz: list[float] = field(default_factory=list)
    interval_s: float = 0.0

    def summary(self) -> dict:
        def stats(v: list[float]) -> dict | None:
            return {"min": min(v), "max": max(v), "mean": sum(v) / len(v), "samples": len(v)} if v else None

        return {"temperature_c": stats(self.temperature_c), "frequency_mhz": stats(self.frequency_mhz),
                "interval_s": self.interval_s}


class Sampler:
    """Samples CPU temperature and frequency on a background thread while a block runs.

        with Sampler() as s:
            run_the_benchmark()
        s.readings.summary()

    The thread sleeps between samples and onnxruntime releases the GIL while it computes,
    so sampling every 0.25 s costs the measured run nothing measurable.
    """

    def __init__(self, interval_s: float = 0.25):
        self.readings = Readings(interval_s=interval_s)
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # probe once: a machine with no sensors starts no thread at all
        self._has_temp = cpu_temperature_c() is not None
        self._has_freq = cpu_frequency_mhz() is not None

    def _sample(self) -> None:
        if self._has_temp and (t := cpu_temperature_c()) is not None:
            self.readings.temperature_c.append(t)
        if self._has_freq and (f := cpu_frequency_mhz()) is not None:
            self.readings.frequency_mhz.append(f)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> Sampler:
        if self._has_temp or self._has_freq:
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="edgekit-sysinfo", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()


# -- helpers -----------------------------------------------------------------------


def _read(path: str | Path) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _cpuinfo_value(cpuinfo: str, key: str) -> str | None:
    m = re.search(rf"^{re.escape(key)}\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return m.group(1).strip() if m else None


def usable_cpus() -> frozenset[int]:
    """The CPUs this process may run on (taskset / cgroup cpuset), else all of them."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


def physical_cores(cpuinfo: str | None = None) -> int | None:
    """The physical cores /proc/cpuinfo (or `cpuinfo`, its text) lists; None where it lists none."""
    cpuinfo = (_read("/proc/cpuinfo") or "") if cpuinfo is None else cpuinfo
    pairs = set(re.findall(r"^physical id\s*:\s*(\d+)\s*$.*?^core id\s*:\s*(\d+)\s*$", cpuinfo,
                           re.MULTILINE | re.DOTALL))
    if pairs:
        return len(pairs)
    # Arm kernels list one "processor" block per core and no physical/core ids
    n = len(re.findall(r"^processor\s*:", cpuinfo, re.MULTILINE))
    return n or None


def _meminfo_mb(key: str) -> float | None:
    m = re.search(rf"^{key}:\s*(\d+) kB", _read("/proc/meminfo") or "", re.MULTILINE)
    return round(int(m.group(1)) / 1024.0, 1) if m else None


def _status_mb(key: str, pid: int | None = None) -> float | None:
    status = _read(f"/proc/{'self' if pid is None else pid}/status") or ""
    m = re.search(rf"^{key}:\s*(\d+) kB", status, re.MULTILINE)
    return int(m.group(1)) / 1024.0 if m else None


def _khz_to_mhz(raw: str | None) -> float | None:
    try:
        return int(raw) / 1000.0 if raw else None
    except ValueError:
        return None


# Thermal zone types that are the CPU: Raspberry Pi, x86 package, Jetson, generic SoCs.
_CPU_ZONE_TYPES = ("cpu-thermal", "x86_pkg_temp", "cpu-therm", "cpu_thermal", "soc_thermal", "coretemp", "acpitz")
_zone_cache: list[tuple[Path, str] | None] = []


def _cpu_thermal_zone() -> tuple[Path, str] | None:
    """The thermal zone that measures the CPU (path, type), found once; None when there is none."""
    if _zone_cache:
        return _zone_cache[0]
    zones = []
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        kind = (_read(zone / "type") or "").strip()
        if _read(zone / "temp") is not None:
            zones.append((zone, kind))
    found = None
    for wanted in _CPU_ZONE_TYPES:  # in order of preference
        found = next((z for z in zones if z[1].lower() == wanted), None)
        if found:
            break
    if found is None and zones:
        found = zones[0]  # an unnamed board: the first zone is conventionally the SoC
    _zone_cache.append(found)
    return found


