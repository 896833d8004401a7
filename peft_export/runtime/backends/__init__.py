"""Inference backends side by side, one interface, chosen by name.

A backend is built from ``{graph name: file}`` and has ``run(name, feeds) -> {output: array}``
(host numpy in and out) and ``providers`` (what actually runs, for ``describe``). Each
backend imports its package lazily, so the runtime needs only what the chosen one needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Dict, Optional

from ...errors import PeftExportError

# name -> (module, class); graph kind the backend loads ("onnx" graphs or TensorRT "engines")
BACKENDS: Dict[str, tuple[str, str, str]] = {
    "onnxruntime": ("ort", "OrtBackend", "onnx"),
    "openvino": ("ov", "OpenVinoBackend", "onnx"),
    "tensorrt": ("trt", "TensorRTBackend", "engines"),
}


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def graph_kind(name: str) -> str:
    """'onnx' when the backend runs the export's ONNX graphs, 'engines' for TensorRT engines."""
    check_backend(name)
    return BACKENDS[name][2]


def check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise PeftExportError(f"backend: unknown '{name}' (use {', '.join(BACKENDS)})")


def open_backend(name: str, paths: Dict[str, Path], device: str, intra_op_threads: Optional[int] = None,
                 bf16_graphs: Collection[str] = (), bf16_if_native: Collection[str] = ()) -> Any:
    """Load ``paths`` ({graph name: file}) in backend ``name`` on ``device``; ``bf16_graphs``: the fp32
    graphs an export verified in OpenVINO's bf16 mode (its ``bf16`` precision), run that way;
    ``bf16_if_native``: int8 graphs also verified in that mode, run that way by OpenVINO on CPUs with
    native bfloat16 (other backends and CPUs run them as they are)."""
    import importlib

    check_backend(name)
    module, cls, _ = BACKENDS[name]
    backend_cls = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    if bf16_graphs and name != "openvino":
        raise PeftExportError(f"precision bf16: runs on the openvino backend only (OpenVINO's bf16 execution of the "
                              f"fp32 graphs), not on {name}")
    if name == "openvino":
        return backend_cls(paths, device, intra_op_threads, bf16_graphs, bf16_if_native)
    if name == "onnxruntime":
        return backend_cls(paths, device, intra_op_threads)
    return backend_cls(paths, device)
