"""The export's image encoder in a site (``--encoder-in-browser``): whether, which graph, its copy.

With it the page lets a person open their own image (file picker, drag and drop): ``assets/encoder.js``
preprocesses it exactly as ``runtime.preprocess.prepare_image`` does and runs this graph on
onnxruntime-web (wasm); the embedding then goes to the click decoder like a precomputed one.

Default (``encoder_in_browser=None``): on for a vit_t export whose encoder graph (the chosen
``--encoder-precision``, all its files) is at most ``AUTO_MAX_BYTES``, off otherwise (vit_b's fp32
encoder is ~360 MB and takes tens of seconds per image in wasm). ``True`` forces it for any export
of one model; ``False`` keeps the site decoder-only.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from ..errors import PeftExportError

AUTO_MAX_BYTES = 64_000_000
BROWSER_PRECISIONS = ("fp32", "int8")  # onnxruntime-web's wasm backend has no fast fp16 kernels


def _graph_bytes(export_dir: Path, entry: Dict[str, Any]) -> int:
    files = entry.get("files") or [{"path": entry["path"]}]
    return sum((export_dir / f["path"]).stat().st_size for f in files if (export_dir / f["path"]).is_file())


def browser_encoder_entry(export_dir: Path, manifest: Dict[str, Any], precision: str, adapter: Optional[str],
                          requested: Optional[bool]) -> Optional[Dict[str, Any]]:
    """The manifest entry of the encoder the page runs, or None for a decoder-only site
    (``requested`` None: the default rule in the module docstring)."""
    if requested is False:
        return None
    several = bool(manifest.get("adapters")) or adapter is not None
    entry = ((manifest.get("graphs") or {}).get("encoder") or {}).get(precision)
    passed = entry is not None and (entry.get("parity") or {}).get("passed", True)
    if requested is None:
        if several or manifest.get("model_type") != "vit_t" or precision not in BROWSER_PRECISIONS or not passed:
            return None
        return entry if _graph_bytes(export_dir, entry) <= AUTO_MAX_BYTES else None
    if several:
        raise PeftExportError(
            "--encoder-in-browser: not for an export of several adapters (shared trunk); build the site with "
            "precomputed IMAGES instead"
        )
    if precision not in BROWSER_PRECISIONS:
        raise PeftExportError(
            f"--encoder-in-browser: the page runs the fp32 or int8 encoder, not {precision} (onnxruntime-web's "
            "wasm backend has no fast fp16); use --encoder-precision fp32 or int8"
        )
    if not passed:
        raise PeftExportError(
            f"--encoder-in-browser: {export_dir} has no verified {precision} encoder "
            f"(export it with merge-and-export --precision {precision})"
        )
    return entry


def write_browser_encoder(tmp: Path, export_dir: Path, entry: Dict[str, Any], manifest: Dict[str, Any],
                          precision: str) -> Dict[str, Any]:
    """Copy the encoder graph (and its external data, same names: the graph refers to it) into the
    site ``tmp``; returns site.json's ``encoder`` record (what encoder.js needs to preprocess and run it)."""
    files = [f["path"] for f in entry.get("files") or [{"path": entry["path"]}]]
    for name in files:
        if not (export_dir / name).is_file():
            raise PeftExportError(f"{export_dir / name}: encoder file listed in manifest.json is missing")
        if Path(name).name != name:
            raise PeftExportError(f"{export_dir}: encoder file {name!r} is not in the export's top folder")
        shutil.copyfile(export_dir / name, tmp / name)
    pre = manifest.get("preprocessing") or {}
    return {
        "path": entry["path"],
        "external_data": [n for n in files if n != entry["path"]],
        "precision": precision,
        "input": entry["inputs"][0]["name"],
        "output": entry["outputs"][0]["name"],
        "image_size": int(manifest["image_size"]),
        "pixel_mean": list(pre.get("pixel_mean", [123.675, 116.28, 103.53])),
        "pixel_std": list(pre.get("pixel_std", [58.395, 57.12, 57.375])),
        "interpolation": pre.get("interpolation", "bilinear"),
        "intensity": pre.get("intensity"),
        "bytes": sum((tmp / n).stat().st_size for n in files),
    }
