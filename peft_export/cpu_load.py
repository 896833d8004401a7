"""How busy the CPUs are, from the kernel's counters: for torch's thread choice (``training.threads``)
and for the machine load recorded beside every benchmark (``bench.load``).

Linux only (/proc/stat); elsewhere the readers return None. Standard library only, so that a
torch-free benchmark worker reads it without importing more.

May import: nothing (the standard library).
"""

from __future__ import annotations

import os
import resource
import time
from typing import Iterable

HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_jiffies(cpus: Iterable[int] | None = None) -> tuple[int, int, int] | None:
    """(busy, steal, total) CPU time in clock ticks since boot, of ``cpus`` (None: the whole machine),
    from /proc/stat; None where it cannot be read. busy = user + nice + system + irq + softirq;
    total = busy + idle + iowait + steal (guest time is already inside user)."""
    wanted = None if cpus is None else {f"cpu{c}" for c in cpus}
    try:
        with open("/proc/stat") as f:
            lines = [ln.split() for ln in f if ln.startswith("cpu")]
    except OSError:
        return None
    rows = [ln for ln in lines if (ln[0] == "cpu" if wanted is None else ln[0] in wanted)]
    if not rows:
        return None
    busy = steal = total = 0
    for row in rows:
        v = [int(x) for x in row[1:]] + [0] * 10
        user, nice, system, idle, iowait, irq, softirq, st = v[:8]
        b = user + nice + system + irq + softirq
        busy, steal, total = busy + b, steal + st, total + b + idle + iowait + st
    return busy, steal, total


def own_cpu_seconds() -> float:
    """CPU time of this process and its waited-for children, user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def others_busy_cores(cpus: list[int], window_s: float) -> float | None:
    """How many of ``cpus`` other processes (and the hypervisor's other guests: steal) kept busy over
    the next ``window_s`` seconds; None where the counters cannot be read."""
    before, own0 = cpu_jiffies(cpus), own_cpu_seconds()
    if before is None:
        return None
    time.sleep(window_s)
    after, own1 = cpu_jiffies(cpus), own_cpu_seconds()
    if after is None or after[2] <= before[2]:
        return None
    ticks = after[2] - before[2]
    others = max(0.0, (after[0] - before[0]) - (own1 - own0) * HZ) + (after[1] - before[1])
    return min(len(cpus), len(cpus) * others / ticks)
