"""manifest.json of an export dir: the only file the runtime reads to know what an export holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from ..errors import PeftExportError

FORMAT = "peftexport-export"
FORMAT_VERSION = 2  # newest this runtime reads: 1 one model (encoder + decoders), 2 several adapters (trunk + heads)
PRECISIONS = ("fp32", "fp16", "int8", "bf16")
# bf16 has no graph of its own: the fp32 graphs run in OpenVINO's bf16 mode on CPUs with native
# bfloat16, verified at export like int8 (its manifest entries name the fp32 files).
BF16_BACKEND = "openvino"
BF16_VERIFIED_ON = "openvino-bf16"  # an entry's verified_on: checked in OpenVINO's bf16 mode at export


def bf16_mode_graphs(graphs: Dict[str, Any], chosen: Dict[str, str]) -> Tuple[List[str], List[str]]:
    """Of the ``chosen`` graphs ({name: precision}), those OpenVINO runs in its bf16 mode: the bf16
    precision's (the fp32 files; required), and int8 graphs the export also verified in that mode
    (``verified_on`` names ``openvino-bf16``; used where the CPU has native bfloat16)."""
    required = [name for name, prec in chosen.items() if prec == "bf16"]
    if_native = [name for name, prec in chosen.items() if prec == "int8"
                 and BF16_VERIFIED_ON in ((graphs.get(name) or {}).get("int8") or {}).get("verified_on", ())]
    return required, if_native


def check_bf16_backend(precision: str, backend: str) -> None:
    """bf16 is OpenVINO's execution of the fp32 graphs: refuse it on any other backend, before loading."""
    if precision == "bf16" and backend != BF16_BACKEND:
        raise PeftExportError(f"precision bf16: runs on the {BF16_BACKEND} backend only (the fp32 graphs in "
                              f"OpenVINO's bf16 mode, on CPUs with native bfloat16), not on {backend}")


def read_manifest(export_dir: str | Path) -> Dict[str, Any]:
    """Load and check manifest.json of an export dir."""
    path = Path(export_dir) / "manifest.json"
    if not Path(export_dir).is_dir():
        raise PeftExportError(f"{export_dir}: export directory does not exist")
    if not path.is_file():
        raise PeftExportError(f"{export_dir}: not an export directory (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PeftExportError(f"{path}: cannot read manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PeftExportError(f"{path}: not a peftexport manifest (format is not '{FORMAT}')")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise PeftExportError(f"{path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        made_by = manifest.get("peftexport_version", "?")
        raise PeftExportError(
            f"{path}: export made by peftexport {made_by}, format {version}; "
            f"this runtime reads formats up to {FORMAT_VERSION} (upgrade peftexport)"
        )
    for key in ("image_size", "graphs", "preprocessing") + (("adapters",) if version >= 2 else ()):
        if key not in manifest:
            raise PeftExportError(f"{path}: manifest has no '{key}'")
    return manifest


def refused_graphs(manifest: Dict[str, Any]) -> list:
    """The graphs the export left out because they failed their gate (``manifest.json``'s ``refused``)."""
    refused = manifest.get("refused")
    return [r for r in refused if isinstance(r, dict)] if isinstance(refused, list) else []


def missing_precision_message(manifest: Dict[str, Any], export_dir: str | Path, precision: str,
                              available: Any, graph: str = "encoder") -> str:
    """One line for a precision this export lacks: why, when it was refused at export, and what it has.

    ``export E: int8 was refused at export (prompt_mask_iou_mean 0.9899 < 0.99 on onnxruntime); available: fp32``
    """
    have = ", ".join(sorted(available)) or "none"
    for r in refused_graphs(manifest):
        if r.get("graph") == graph and r.get("precision") == precision:
            line = str(r.get("line") or "")
            why = line[line.index("("):] if "(" in line else "(failed its check)"
            return f"export {export_dir}: {precision} was refused at export {why}; available: {have}"
    return f"export {export_dir}: no {precision} {graph} (available: {have})"
