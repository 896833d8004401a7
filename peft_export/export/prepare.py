"""What every export does before its graphs: the output folder checked before any slow work, the merge
(or AdaptFormer kept in the graph), where the weights came from, and the encoder file names. Shared by
SAM's pipeline (``pipeline``, ``shared_export``) and SAM 2's (``sam2_image``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from segment_anything.modeling import Sam

from ..errors import PeftExportError
from ..merge import merge_and_verify
from ..peft import has_unmergeable_layers, merge_peft
from ..peft.adapters import AdaptedModel


def encoder_filename(precision: str, stem: str = "encoder") -> str:
    """``encoder.onnx`` for fp32, ``encoder.int8.onnx`` etc. (``stem`` names other encoder graphs)."""
    return f"{stem}.onnx" if precision == "fp32" else f"{stem}.{precision}.onnx"


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """The checks atomic_dir makes, and a file in the way, before any slow work."""
    for parent in out_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise PeftExportError(f"{out_dir}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise PeftExportError(f"{out_dir}: {parent} is not writable")
            break
    if out_dir.exists() and not out_dir.is_dir():
        raise PeftExportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PeftExportError(f"{out_dir}: directory exists and is not empty (pass --overwrite to replace it)")


def export_source(adapted: AdaptedModel) -> dict:
    """Where the exported weights came from (the torch source): the adapter, micro-sam or merged file
    with its sha256, and the base checkpoint with its sha256 (``random-init`` for a seeded random base).
    ``bench EXPORT_DIR`` times the torch model from it; ``improve`` trains on from it. Manifests written
    before the digests were recorded have only the paths; readers take both."""
    if not adapted.source:
        return {}
    from ..fsutil import sha256_file
    from ..peft.adapters import ADAPTER_WEIGHTS

    path = Path(adapted.source).resolve()
    base = adapted.base
    checkpoint = {"checkpoint": str(Path(base.checkpoint).resolve()) if base.checkpoint else None,
                  "checkpoint_sha256": base.sha256}
    if adapted.meta.get("format"):  # an adapter file / run directory
        weights = path / ADAPTER_WEIGHTS if path.is_dir() else path.with_name(ADAPTER_WEIGHTS)
        digest = sha256_file(weights) if weights.is_file() else None
        return {"kind": "adapter", "adapter": str(path), "adapter_sha256": digest, **checkpoint}
    if adapted.config is None:
        return {"kind": "merged", "path": str(path), **checkpoint}
    # micro-sam files do not record their PEFT method: the options it was read with are needed again
    return {"kind": "micro-sam", "micro_sam": str(path), "peft": adapted.config.to_dict(), **checkpoint}


def merge_for_export(adapted: AdaptedModel, log: Callable[[str], None]) -> tuple[Sam, bool, list[str], dict | None]:
    """The model to export: (model, merged, adapters left in the graph, merge report).

    Mergeable methods are folded and verified (``merge_and_verify``); AdaptFormer keeps its
    branch in the graph; a plain model (no config) is exported as it is.
    """
    reference_model = adapted.model.eval()
    if adapted.config is None:
        return reference_model, True, [], None
    if has_unmergeable_layers(reference_model):
        log(f"{adapted.config.method} cannot be folded: exporting it with its branch inside the graph")
        # The other PEFT layers (e.g. decoder LoRA beside an encoder AdaptFormer) are folded all the same.
        in_graph = [m for m in (adapted.config.method, adapted.config.decoder_method) if m == "adaptformer"]
        return merge_peft(reference_model, keep_unmergeable=True), False, in_graph or [adapted.config.method], None
    t0 = time.perf_counter()
    model, report = merge_and_verify(adapted)
    log(f"merged {adapted.config.method} in {time.perf_counter() - t0:.1f} s "
        f"(embeddings max rel {report['errors']['embeddings']['max_rel']:.1e})")
    # A QLoRA model lives on its GPU; the merged copy is exported and checked on the CPU.
    return model.eval().cpu(), True, [], {"errors": report["errors"], "tolerance_rel": report["tolerance_rel"]}
