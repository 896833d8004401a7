"""What keeps training's memory and time down changes no number: the full-resolution logits
without the identity resize, and glibc keeping freed blocks while a run lasts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from peft_export.models import random_sam
from peft_export.training import losses
from peft_export.training.host_memory import _glibc, keep_freed_memory, user_tuned_malloc


@pytest.mark.parametrize("input_size,original", [((64, 64), (64, 64)), ((64, 48), (64, 48)), ((48, 64), (96, 128)),
                                                 ((64, 64), (200, 200)), ((64, 40), (50, 31))])
def test_full_resolution_logits_equal_sam_postprocess_masks(input_size, original):
    sam = random_sam("tiny", image_size=64, seed=0)
    low = torch.randn(3, 2, 16, 16)
    ours = losses.full_resolution_logits(low, 64, input_size, original)
    assert torch.equal(ours, sam.postprocess_masks(low, input_size, original))


# Run in a fresh interpreter: in a process whose heap grew earlier (a training test before this one),
# glibc serves a large block from the heap's free space instead of mapping it, whatever the setting.
_PROBE = """
import gc, json, resource, torch
from peft_export.bench.stats import current_rss_mb as rss
from peft_export.training.host_memory import keep_freed_memory

def touch_and_free():
    t = torch.ones(256 * 2**20 // 4)  # 256 MB, far above glibc's largest mmap threshold
    del t
    gc.collect()
    return rss()

base = rss()
plain = touch_and_free() - base
with keep_freed_memory() as applied:
    kept = touch_and_free() - base
after = rss() - base
faults = []
for _ in range(3):  # 16 MB blocks after the run: reused from the heap, not mapped and faulted each time
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(4 * 2**20)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"applied": applied, "plain": plain, "kept": kept, "after": after, "faults": faults}))
"""


def _untuned_environment() -> dict[str, str]:
    # Earlier tests may leave MALLOC_* in os.environ (dask's nanny sets one for its workers).
    return {k: v for k, v in os.environ.items() if not user_tuned_malloc({k: v})}


@pytest.mark.skipif(_glibc() is None, reason="glibc only")
def test_keep_freed_memory_reuses_large_blocks_and_gives_them_back_after():
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                          env=_untuned_environment())
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["applied"]
    assert r["plain"] < 100  # glibc's default: a block this large goes back at once
    assert r["kept"] > 200  # freed, but still the process's: the next step reuses the pages
    assert r["after"] < 100  # the run is over: what is free goes back to the kernel
    # and glibc's thresholds are not left at 128 KB (any mallopt freezes them): torch's tensors keep
    # being reused instead of faulted in anew (4096 faults each; 25-30 % slower torch when frozen)
    assert min(r["faults"][1:]) < 1000, r["faults"]


@pytest.mark.skipif(_glibc() is None, reason="glibc only")
def test_keep_freed_memory_leaves_a_malloc_tuned_at_start_alone(monkeypatch):
    tuned = {**_untuned_environment(), "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}
    probe = "from peft_export.training.host_memory import keep_freed_memory as k\nwith k() as a: print(a)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=tuned)
    assert proc.stdout.split()[-1] == "False"
    # set after the start, a variable tunes nothing (glibc read its environment at startup)
    started_tuned = user_tuned_malloc()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    assert user_tuned_malloc() == started_tuned
    with keep_freed_memory(enabled=False) as applied:
        assert not applied
