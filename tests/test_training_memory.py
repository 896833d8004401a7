"""What keeps training's memory and time down changes no number: the full-resolution logits
without the identity resize, and glibc keeping freed blocks while a run lasts."""

from __future__ import annotations

import gc

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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(_glibc() is None, reason="glibc only")
@pytest.mark.skipif(user_tuned_malloc(), reason="this process's malloc is tuned by its environment")
def test_keep_freed_memory_reuses_large_blocks_and_gives_them_back_after():
    size = 256 * 2**20 // 4  # 256 MB of float32, far above glibc's largest mmap threshold

    def touch_and_free() -> float:
        t = torch.ones(size)
        del t
        gc.collect()
        return _rss_mb()

    base = _rss_mb()
    assert touch_and_free() - base < 100  # glibc's default: a block this large goes back at once
    with keep_freed_memory() as applied:
        assert applied
        kept = touch_and_free() - base
        assert kept > 200  # freed, but still the process's: the next step reuses the pages
    assert _rss_mb() - base < 100  # the run is over: what is free goes back to the kernel


def test_keep_freed_memory_leaves_a_tuned_malloc_alone(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")
    with keep_freed_memory() as applied:
        assert not applied
    with keep_freed_memory(enabled=False) as applied:
        assert not applied
