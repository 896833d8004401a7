"""Keep freed memory inside the process while training on the CPU (glibc's malloc).

By default glibc gives every block above its mmap threshold (at most 32 MB) back to the
kernel as soon as it is freed, and trims the top of the heap. A training step frees and
allocates the same large tensors again and again (TinyViT's first stage alone makes
64 MB activations at 1024 px), so every step makes the kernel map and zero the same
pages anew. On a 2-core VM that page-fault work was a third of an eager vit_t forward
(1.2 s -> 0.74 s) and of a full fine-tuning step (see docs/vit_t.md, "Fine-tuning cost").

``keep_freed_memory`` turns both off for the duration of a run, so freed blocks are
reused, and restores glibc's defaults afterwards (returning what is free to the kernel).
The process's peak is unchanged; what it holds between steps is its peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_GLIBC_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_GLIBC_DEFAULT_MMAP_MAX = 65536


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it (musl's mallopt does nothing)
        return libc
    except (OSError, AttributeError):
        return None


def user_tuned_malloc() -> bool:
    """Whether the environment already sets glibc's malloc (then it is left as the user set it)."""
    return "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in os.environ)


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
    applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    try:
        yield applied
    finally:
        libc.mallopt(M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, _GLIBC_DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
