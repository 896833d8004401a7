"""Keep freed memory inside the process while training on the CPU (glibc's malloc).

By default glibc gives every block above its mmap threshold (at most 32 MB) back to the
kernel as soon as it is freed, and trims the top of the heap. A training step frees and
allocates the same large tensors again and again (TinyViT's first stage alone makes
64 MB activations at 1024 px), so every step makes the kernel map and zero the same
pages anew. On a 2-core VM that page-fault work was a third of an eager vit_t forward
(1.2 s -> 0.77 s: ``python benchmarks/bench_vit_t.py`` times MobileSAM's eager encoder both ways)
and of a full vit_t fine-tuning step at 1024 px (7.2 s -> 4.3 s, ``python
benchmarks/bench_training.py --model vit_t --image-size 1024``, before and after this module and
objects in decoder passes).

``keep_freed_memory`` turns both off for the duration of a run, so freed blocks are
reused, and afterwards sets the thresholds glibc's own rule reaches in such a process
(returning what is free to the kernel).
The process's peak is unchanged; what it holds between steps is its peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
_GLIBC_DEFAULT_MMAP_MAX = 65536
# While a run lasts: no block is mapped on its own, and the heap is never trimmed (mallopt takes an int).
_KEEP_MMAP_MAX = 0
_KEEP_TRIM_THRESHOLD = 2**31 - 1
# The same setting for a whole process, given at its start (benchmarks/bench_vit_t.py times eager torch so).
GLIBC_TUNABLES_KEEP = f"glibc.malloc.mmap_max={_KEEP_MMAP_MAX}:glibc.malloc.trim_threshold={_KEEP_TRIM_THRESHOLD}"
# Any mallopt call switches off glibc's dynamic thresholds for good (they start at 128 KB and rise as
# large blocks are freed, up to 32 MB on 64-bit, trimming at twice that). Frozen at 128 KB, torch would
# map and fault every tensor above it: vit_b at 256 px ran 25-30 % slower after a run. So the restore
# sets where the dynamic rule ends in a process that works with large tensors.
_MMAP_THRESHOLD_AFTER = 32 * 2**20
_TRIM_THRESHOLD_AFTER = 2 * _MMAP_THRESHOLD_AFTER


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it (musl's mallopt does nothing)
        return libc
    except (OSError, AttributeError):
        return None


def _startup_environment() -> dict[str, str]:
    """The environment this process started with: what glibc read (later os.environ changes, e.g. by
    dask's nanny for the workers it spawns, do not tune this process's malloc)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def user_tuned_malloc(environ: dict[str, str] | None = None) -> bool:
    """Whether the process started with glibc's malloc tuned (then it is left as the user set it)."""
    env = _startup_environment() if environ is None else environ
    return "malloc" in env.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in env)


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Within the block, glibc neither unmaps large freed blocks nor trims the heap.

    Yields whether the setting took effect (False off glibc, when disabled, or when the
    environment tunes malloc itself).
    """
    libc = _glibc() if enabled and not user_tuned_malloc() else None
    if libc is None:
        yield False
        return
    applied = (libc.mallopt(M_MMAP_MAX, _KEEP_MMAP_MAX) == 1
               and libc.mallopt(M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD) == 1)
    try:
        yield applied
    finally:
        libc.mallopt(M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD_AFTER)
        libc.mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD_AFTER)
        libc.malloc_trim(0)
