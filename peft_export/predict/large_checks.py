"""Checks of a large-image run's inputs and options (``predict.large``, ``predict.large_prompts``),
made before anything is written; the same checks run on each worker (``distributed``'s probe).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import PeftExportError

IMAGE_OUTPUT_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")


def check_not_url(out: Path) -> None:
    """An output is a path: a URL (``s3://``; a Path keeps one slash of it) is refused."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(out)):
        raise PeftExportError(f"{out}: URL outputs are not written (the steps' markers and the final rename need a "
                              "filesystem); mount the bucket on this machine and every worker at one path and give "
                              "that path")


def check_zarr_output(out: Path) -> None:
    """The large-image path writes OME-Zarr to a path: an output named like an image file, or a
    URL, is refused."""
    check_not_url(out)
    if out.suffix.lower() in IMAGE_OUTPUT_SUFFIXES:
        raise PeftExportError(f"{out}: large images' results are written as OME-Zarr, not {out.suffix}; name the "
                              f"output {out.with_suffix('.zarr').name} (or a folder for several images)")


def require_instance_decoder(export_dir: Any, manifest: Dict[str, Any]) -> None:
    from .images import NO_AIS_HINT

    if not any(k == "ais_decoder" or k.startswith("ais_decoder_") for k in manifest["graphs"]):
        raise PeftExportError(f"{export_dir}: --instances needs an instance decoder, and this export has none: "
                              + NO_AIS_HINT)


def check_device(device: str) -> None:
    """``--device`` checked before any output is laid out (and on each worker by its probe)."""
    if device not in ("cpu", "cuda"):
        raise PeftExportError(f"--device: unknown '{device}' (use cpu or cuda)")
    if device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise PeftExportError("--device cuda: this onnxruntime has no CUDAExecutionProvider; install "
                                  "onnxruntime-gpu (and uninstall onnxruntime, they share one module), or use cpu")


def large_adapter(export_dir: Any, manifest: Dict[str, Any], adapter: Optional[str]) -> Optional[str]:
    """The one adapter a large-image run uses (``--adapter``; optional when the export has one)."""
    from ..runtime.adapters import pick_adapter

    try:
        return pick_adapter(adapter, list(manifest.get("adapters") or {}))
    except PeftExportError as e:  # the command-line spelling; "all" is not offered for large images
        why = str(e).removeprefix("adapter: ").replace("pass adapter=NAME", "pass --adapter NAME")
        raise PeftExportError(f"{export_dir}: --adapter: {why}") from None
