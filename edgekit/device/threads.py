"""How many threads a session runs on when the caller does not say: the cores other processes leave free.

onnxruntime splits each operator's work evenly over its intra-op threads and waits for the last
share. When another process keeps a core busy (a robot's camera or planning node), one thread of
the pair keeps losing its core to it and every operator waits for that thread: SmolLM2 int4 on 2
cores beside one CPU-bound process decodes at 166 tok/s on two threads and 194 on one, while on a
quiet host two threads are 1.4x one (benchmarks/README.md). So a Model measures how much CPU the
other processes used on the cores it may run on, from /proc/stat less its own CPU time:

    others = (busy seconds of our cores - this process's CPU seconds) / wall seconds
    threads = clamp(round(cores - others), 1, most)    (kept while within STICK of cores - others)
    most = min(physical cores, CPUs it may use, its container's CPU quota, the target's threads)

while it loads and while its session runs, not while it waits for work (what runs in those gaps
leaves the cores free when they are needed). Before a request, once `RECHECK_S` of running has been
measured, it rebuilds its session (~0.1 s for SmolLM2 int4) if the count has changed. Where
/proc/stat is missing (not Linux) it keeps `most`.

Measured on that 2-core host with one busy process: 1 thread decodes 1.17x faster than 2 but
prefills 131 tokens 1.33x slower (onnxruntime cannot run one session's prefill and decode on
different thread counts, and a second session would hold a second copy of the pre-packed weights).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.device import sysinfo

MAX_THREADS = 1024  # more than any board has cores; onnxruntime takes minutes to make 100000 threads
RECHECK_S = 0.5  # seconds of running measured before a request may change the count: less is mostly noise
IDLE_GAP_S = 0.02  # a pause between runs longer than this is waiting for work, not generating
READ_EVERY_S = 0.1  # /proc/stat is read at most this often while running (26 us a read)
STICK = 0.6  # cores: a count changes once the cores left are this far from it
MIN_WINDOW_S = 0.05  # at load: 5 ticks of the kernel's 100 Hz accounting per core, enough to see a busy one


@dataclass(frozen=True)
class CpuTimes:
    wall: float  # time.monotonic(), s
    busy: float  # CPU seconds every process spent on `cpus` (not idle, not waiting for I/O)
    own: float  # CPU seconds this process spent, all its threads
    cpus: frozenset[int]


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU time this process's container may use, in cores (`docker run --cpus`), from cgroup
    v2's cpu.max or v1's CFS quota; None when unlimited or not found."""
    try:
        quota, period = (root / "cpu.max").read_text().split()  # v2: "max 100000" or "150000 100000"
    except (OSError, ValueError):
        try:  # v1: -1 when unlimited
            quota, period = ((root / "cpu" / f"cpu.cfs_{name}_us").read_text().strip() for name in ("quota", "period"))
        except OSError:
            return None
    try:
        return None if quota in ("max", "-1") else int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def most_threads() -> int:
    """One thread per physical core (onnxruntime's own default; a hyperthread sibling gains nothing),
    at most the CPUs this process may use and its container's CPU quota."""
    cpus = len(sysinfo.usable_cpus())
    quota = cpu_quota()
    limit = min(cpus, math.ceil(quota)) if quota else cpus
    return max(1, min(sysinfo.physical_cores() or cpus, limit))


def cpu_times(cpus: frozenset[int], stat: str | None = None) -> CpuTimes | None:
    """Now's counters for `cpus`; None where /proc/stat cannot be read."""
    if stat is None:
        try:
            stat = Path("/proc/stat").read_text()
        except OSError:
            return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = 0
    for cpu, fields in re.findall(r"^cpu(\d+) (.*)$", stat, re.MULTILINE):
        if int(cpu) in cpus:
            # user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
            values = [int(v) for v in fields.split()[:8]]
            busy += sum(values) - values[3] - values[4]
    own = os.times()
    return CpuTimes(time.monotonic(), busy / tick, own.user + own.system, cpus)


def others_busy(before: CpuTimes, after: CpuTimes) -> float:
    """How many cores' worth of CPU other processes used between two readings (>= 0)."""
    assert before.cpus == after.cpus, "readings of different CPU sets"
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / wall


def free_threads(cores: int, others: float, most: int, current: int | None = None) -> int:
    """The thread count for `cores` CPUs of which `others` cores' worth are busy: the cores left,
    half a busy core counting as busy, at least 1 and at most `most`. `current` stays while it is
    within `STICK` of the cores left: a load halfway between two counts (a process busy half the
    time) would otherwise rebuild the session at every measurement."""
    assert cores >= 1 and most >= 1 and others >= 0, (cores, others, most)
    left = cores - others
    if current is not None and 1 <= current <= most and abs(left - current) < STICK:
        return current
    return max(1, min(most, int(left + 0.5)))


@dataclass
class ThreadChooser:
    """A session's thread count from what other processes use while this one runs.

    The session's runs are reported (`run_starts`, `run_ended`); the CPU others use while they go
    on adds up, and what they use while this process waits for a request does not count (another
    program may well run in the gaps: that leaves the cores free when they are needed). `choose()`
    turns what has added up into a count. Made before a load's slow part (the bundle's
    verification), which is the first stretch measured.
    """

    most: int = field(default_factory=most_threads)
    cpus: frozenset[int] = field(default_factory=sysinfo.usable_cpus)
    threads: int = 0
    stretch: CpuTimes | None = None  # the start of the stretch of runs being measured
    last_end: float = 0.0  # time.monotonic() when the last run ended
    others: float = 0.0  # CPU seconds others used while this process ran, since the last choice
    ran: float = 0.0  # wall seconds this process ran, since the last choice

    def __post_init__(self) -> None:
        self.threads = self.threads or self.most
        self.stretch = cpu_times(self.cpus)
        self.last_end = time.monotonic()

    def run_starts(self) -> None:
        if time.monotonic() - self.last_end > IDLE_GAP_S:  # it was idle: what others did meanwhile is no matter
            self.stretch = cpu_times(self.cpus)

    def run_ended(self, force: bool = False) -> None:
        self.last_end = time.monotonic()
        if self.stretch is not None and (force or self.last_end - self.stretch.wall >= READ_EVERY_S):
            now = cpu_times(self.cpus)
            if now is not None:
                self.others += others_busy(self.stretch, now) * (now.wall - self.stretch.wall)
                self.ran += now.wall - self.stretch.wall
                self.stretch = now

    def choose(self, least_s: float = RECHECK_S) -> int:
        """The thread count for what others used while this process ran; the current count until
        it has run `least_s` seconds since the last choice."""
        if self.ran >= least_s:
            self.threads = free_threads(len(self.cpus), self.others / self.ran, self.most, self.threads)
            self.others = self.ran = 0.0
        return self.threads

    def first_choice(self, most: int | None = None) -> int:
        """At load: the count, at most `most` if given (a target's), for what others used since this
        chooser was made, measuring at least `MIN_WINDOW_S` (waiting out the rest)."""
        if most:
            self.most = self.threads = min(most, self.most)
        if self.stretch is not None:
            time.sleep(max(0.0, MIN_WINDOW_S - (time.monotonic() - self.stretch.wall)))
        self.run_ended(force=True)
        return self.choose(least_s=MIN_WINDOW_S * 0.9)
