"""How busy the machine was while a case ran: load average, CPU steal, and the CPU time of other processes.

On a shared machine two benchmarks that run at once distort each other, and the timings say
nothing about it. A ``LoadProbe`` snapshot is taken before and after a case; ``load_between``
turns two snapshots into what a reader needs to trust (or not) the case's figures:

- ``loadavg_before`` / ``loadavg_after``: /proc/loadavg (1, 5, 15 min);
- ``steal_fraction``: CPU time the hypervisor gave to other guests (/proc/stat ``steal``),
  as a fraction of all CPU time in the interval;
- ``others_cpu_fraction``: busy CPU time of every process except this one and its children
  (the case's own worker), as a fraction of the machine's CPU time in the interval. Our own
  earlier cases raise the load average but not this figure, so it is what ``busy`` uses.

Linux only (/proc); elsewhere the fields are None and ``busy`` is None (unknown).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..cpu_load import HZ, cpu_jiffies, own_cpu_seconds

# A case is flagged when other processes used more than this share of the CPUs, or the
# hypervisor stole more than this share: either shifts a 2-core timing by tens of percent.
BUSY_OTHERS_FRACTION = 0.10
BUSY_STEAL_FRACTION = 0.05


@dataclass(frozen=True)
class LoadSnapshot:
    wall: float
    loadavg: tuple[float, float, float] | None
    busy_jiffies: int | None  # user + nice + system + irq + softirq, all CPUs
    steal_jiffies: int | None
    total_jiffies: int | None  # everything but guest time (already inside user)
    own_cpu_s: float  # this process + its waited-for children, user + system


def _loadavg() -> tuple[float, float, float] | None:
    try:
        with open("/proc/loadavg") as f:
            a, b, c = f.read().split()[:3]
        return float(a), float(b), float(c)
    except (OSError, ValueError):
        return None


def snapshot() -> LoadSnapshot:
    """The machine's CPU counters and this process's own CPU time, now."""
    j = cpu_jiffies()
    return LoadSnapshot(time.time(), _loadavg(), j[0] if j else None, j[1] if j else None,
                        j[2] if j else None, own_cpu_seconds())


def load_between(before: LoadSnapshot, after: LoadSnapshot) -> dict:
    """The machine load record of the interval between two snapshots (JSON-able)."""
    out: dict = {
        "wall_s": round(after.wall - before.wall, 2),
        "loadavg_before": list(before.loadavg) if before.loadavg else None,
        "loadavg_after": list(after.loadavg) if after.loadavg else None,
        "steal_fraction": None,
        "others_cpu_fraction": None,
        "busy": None,
    }
    if before.total_jiffies is None or after.total_jiffies is None:
        return out
    total = after.total_jiffies - before.total_jiffies
    if total <= 0:
        return out
    steal = (after.steal_jiffies - before.steal_jiffies) / total
    own_jiffies = (after.own_cpu_s - before.own_cpu_s) * HZ
    others = max(0.0, (after.busy_jiffies - before.busy_jiffies) - own_jiffies) / total
    out["steal_fraction"] = round(steal, 4)
    out["others_cpu_fraction"] = round(min(others, 1.0), 4)
    out["busy"] = bool(others > BUSY_OTHERS_FRACTION or steal > BUSY_STEAL_FRACTION)
    return out


def describe_load(load: dict | None) -> str:
    """'others 35% of the CPUs, steal 0%, load 2.10 -> 2.40' for tables and warnings."""
    if not load or load.get("others_cpu_fraction") is None:
        return "load unknown"
    before = (load.get("loadavg_before") or [None])[0]
    after = (load.get("loadavg_after") or [None])[0]
    text = f"others {100 * load['others_cpu_fraction']:.0f}% of the CPUs, steal {100 * load['steal_fraction']:.0f}%"
    if before is not None and after is not None:
        text += f", load {before:.2f} -> {after:.2f}"
    return text
