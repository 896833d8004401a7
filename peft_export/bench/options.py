"""Every bench option checked before any work (no model loaded, no worker started, nothing written)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import PeftExportError
from .cases import BACKENDS, DEFAULT_COMPONENTS, EXPORT_PRECISIONS, EXTRA_COMPONENTS, TORCH_PRECISIONS, parse_list

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class BenchOptions:
    """The bench options, parsed; lists keep the order given."""

    backends: list[str]
    device: str
    precisions: list[str] | None  # None: each backend's default
    batch_sizes: list[int]
    components: list[str]
    warmup: int
    iterations: int
    threads: int | None


def check_bench_options(
    backends: str | Sequence[str] = BACKENDS,
    device: str = "cpu",
    precisions: str | Sequence[str] | None = None,
    batch_sizes: str | Sequence[int] = "16",
    components: str | Sequence[str] = DEFAULT_COMPONENTS,
    warmup: int = 1,
    iterations: int = 10,
    threads: int | None = None,
) -> BenchOptions:
    """Parse and check every option; the first bad one is a one-line error in the option's own name."""
    if device not in DEVICES:
        raise PeftExportError(f"--device: unknown '{device}' (use {' or '.join(DEVICES)})")
    backend_list = parse_list(backends, BACKENDS, "--backend")
    precision_list = parse_list(precisions, dict.fromkeys(TORCH_PRECISIONS + EXPORT_PRECISIONS), "--precision")
    component_list = parse_list(components, DEFAULT_COMPONENTS + EXTRA_COMPONENTS, "--components")
    raw = batch_sizes.split(",") if isinstance(batch_sizes, str) else list(batch_sizes)
    try:
        sizes = [int(str(b).strip()) for b in raw if str(b).strip()]
    except ValueError:
        raise PeftExportError(f"--batch-size: not a list of integers: {batch_sizes}") from None
    if not sizes and "decoder_boxes" in component_list:
        raise PeftExportError("--batch-size: empty list (the decoder_boxes component times each size given)")
    if any(b < 1 for b in sizes):
        raise PeftExportError(f"--batch-size: every size must be >= 1, got {min(sizes)}")
    if warmup < 0:
        raise PeftExportError(f"--warmup: must be >= 0, got {warmup}")
    if iterations < 1:
        raise PeftExportError(f"--iterations: must be >= 1, got {iterations}")
    if threads is not None and threads < 1:
        raise PeftExportError(f"--threads: must be >= 1, got {threads}")
    return BenchOptions(backend_list, device, precision_list, sizes, component_list, warmup, iterations, threads)
