"""How many threads torch computes with on the CPU: the cores other processes leave free.

torch starts one intra-op thread per core, and every parallel op ends at a barrier where its
threads wait for the slowest one. When other processes keep a core busy, the thread on it runs
late at every op: the demo's tiny training on a busy 2-core machine took 4.7-13 s per step with
torch's 2 threads and finished in 4 minutes with ``OMP_NUM_THREADS=1``. So the demo and
``finetune`` on the CPU count the cores others leave free, over a short window, and use that many
threads (one when the machine is oversubscribed), printing what they chose in one line.

The user's own choice wins: ``--threads`` / ``TrainConfig.threads``, ``OMP_NUM_THREADS`` (or
``MKL_NUM_THREADS``) in the environment, or a ``torch.set_num_threads`` made before the run (told
from torch's default by the inter-op pool, which torch sizes with the same default).
Measured: the CPU time of the CPUs this process may run on (``/proc/stat`` per CPU, Linux) less
this process's own, over ``WINDOW_S``; where /proc is missing, the 1-minute load average.
A container limited by a CPU quota (not by CPU affinity) is not seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..cpu_load import others_busy_cores, usable_cpus

WINDOW_S = 0.5  # long enough to see a busy neighbour (50 scheduler ticks), short beside any run
# A core counts as free when others left at least this much of it: two threads where the second
# shares its core with a process that takes a third of it already run slower than one.
FREE_CORE = 0.8
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_TORCH_DEFAULT = torch.get_num_threads()  # what torch started with in this process
_chosen: "ThreadChoice | None" = None  # this module's last choice (a later run keeps it, unmeasured)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def line(self) -> str:
        return f"torch threads: {self.threads} ({self.reason})"


def choose_threads(requested: int | None = None, window_s: float = WINDOW_S) -> ThreadChoice:
    """The thread count for torch on the CPU, and why (see the module doc for the order)."""
    if requested is not None:
        return ThreadChoice(int(requested), "--threads")
    for name in THREAD_ENV:
        if os.environ.get(name):
            return ThreadChoice(torch.get_num_threads(), f"{name}={os.environ[name]}")
    current = torch.get_num_threads()
    if _chosen is not None and current == _chosen.threads:
        return _chosen  # chosen earlier in this process (the demo, before its training)
    # torch sizes its inter-op pool by the same default as the intra-op one: a difference (or a change
    # since this module's import) is the user's torch.set_num_threads
    if current != _TORCH_DEFAULT or current != torch.get_num_interop_threads():
        return ThreadChoice(current, "set by torch.set_num_threads")
    cpus = usable_cpus()
    others = others_busy_cores(cpus, window_s)
    how = f"over {window_s:g} s"
    if others is None:
        try:
            others, how = max(0.0, os.getloadavg()[0] - 1.0), "1-minute load average, less this run"
        except OSError:
            return ThreadChoice(current, "torch's default: the CPU load cannot be read here")
    free = len(cpus) - others
    threads = max(1, min(len(cpus), int(free + 1.0 - FREE_CORE)))
    state = "oversubscribed" if free < FREE_CORE else "free" if threads == len(cpus) else "partly free"
    return ThreadChoice(threads, f"{len(cpus)} CPUs, others used {others:.1f} of them {how}: {state}; "
                                 "set OMP_NUM_THREADS or --threads to choose")


def use_free_cores(requested: int | None = None, log: Callable[[str], None] = print,
                   window_s: float = WINDOW_S) -> ThreadChoice:
    """``choose_threads``, applied to torch and said in one line (once per process for one choice)."""
    global _chosen
    choice = choose_threads(requested, window_s)
    if choice == _chosen:  # said already (the demo's choice, seen again by its finetune)
        return choice
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    _chosen = choice
    log(choice.line())
    return choice
