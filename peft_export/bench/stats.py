"""Timing summaries, machine and library descriptions, memory measurement.

numpy and the standard library only; torch is imported lazily and only to
describe a GPU when it is installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import resource
import subprocess
import sys
import threading
from typing import Sequence

import numpy as np

from ..errors import PeftExportError


def summarize_timings(seconds: Sequence[float], batch_size: int = 1) -> dict:
    """Summarise wall times given in seconds; every statistic is reported in milliseconds.

    Percentiles (median, p90, p99) use numpy's default linear interpolation between
    closest ranks (``np.percentile(..., method="linear")``), so 1..100 ms gives a
    median of 50.5 and a p90 of 90.1. ``std`` is the population standard deviation
    (ddof=0). ``throughput_per_s`` is items per second at the median:
    ``batch_size / median_seconds``.
    """
    t = np.asarray(list(seconds), dtype=np.float64)
    if t.size == 0:
        raise PeftExportError("timings: no measurements to summarise")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise PeftExportError("timings: measurements must be finite and non-negative")
    ms = t * 1000.0
    median = float(np.percentile(ms, 50, method="linear"))
    return {
        "n": int(t.size),
        "batch_size": int(batch_size),
        "median_ms": median,
        "p90_ms": float(np.percentile(ms, 90, method="linear")),
        "p99_ms": float(np.percentile(ms, 99, method="linear")),
        "mean_ms": float(ms.mean()),
        "std_ms": float(ms.std()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
        "throughput_per_s": float(batch_size * 1000.0 / median) if median > 0 else float("inf"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            for tok in f.readline().split():
                if tok[:1].isdigit() and "." in tok:
                    return tok
    except OSError:
        pass
    return None


def _gpu_info() -> dict | None:
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch
    except Exception:  # a broken torch install must not break a benchmark report
        return None
    if not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    major, minor = torch.cuda.get_device_capability(idx)
    return {
        "name": torch.cuda.get_device_name(idx),
        "count": torch.cuda.device_count(),
        "memory_gb": round(props.total_memory / 1024**3, 2),
        "compute_capability": f"{major}.{minor}",
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version(),
        "driver_version": _nvidia_driver(),
    }


def device_info() -> dict:
    """Describe this machine: CPU model, cores, RAM, OS, Python and (if torch sees CUDA) the GPU."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    ram = _ram_bytes()
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": usable,
        "ram_gb": round(ram / 1024**3, 2) if ram else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "gpu": _gpu_info(),
    }


# Distribution names to try per library; onnxruntime may come as any of these wheels.
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"),
    "numpy": ("numpy",),
    "segment_anything": ("segment-anything", "segment_anything"),
}


def library_versions() -> dict:
    """Versions of the libraries that matter for results; a missing one is ``None``.

    Read from package metadata, so nothing heavy (tensorrt, torch) is imported.
    """
    versions: dict[str, str | None] = {}
    for name, dists in _DISTRIBUTIONS.items():
        version = None
        for dist in dists:
            try:
                version = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        if version is None and name in sys.modules:
            version = getattr(sys.modules[name], "__version__", None)
        versions[name] = version
    return versions


def peak_rss_mb() -> float:
    """Peak resident memory of this process over its whole lifetime, in MiB.

    /proc/self/status VmHWM where there is one: ru_maxrss survives fork + exec, so in a worker
    started by a large parent it would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (/proc/self/statm; ru_maxrss as a fallback)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 1024**2
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


class RssSampler:
    """Peak resident memory of this process during a ``with`` block.

    ru_maxrss is a lifetime maximum, so it cannot isolate one block. A background
    thread reads /proc/self/statm every ``interval`` seconds (default 5 ms); a
    spike shorter than that can be missed. After the block: ``peak_mb`` (absolute
    peak RSS), ``baseline_mb`` (RSS on entry), ``delta_mb`` (peak - baseline).
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.baseline_mb = 0.0
        self.peak_mb = 0.0
        self.delta_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        rss = current_rss_mb()
        if rss > self.peak_mb:
            self.peak_mb = rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.baseline_mb = current_rss_mb()
        self.peak_mb = self.baseline_mb
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="RssSampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.delta_mb = max(0.0, self.peak_mb - self.baseline_mb)

    def as_dict(self) -> dict:
        return {"peak_rss_mb": self.peak_mb, "baseline_rss_mb": self.baseline_mb,
                "delta_rss_mb": self.delta_mb}
