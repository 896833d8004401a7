"""The torch model an export was made from, found from its manifest (or given by the user).

``manifest["source"]`` records it (``export.pipeline.export_source``): an adapter run with the
sha256 of its weights, a merged checkpoint, or a micro-sam file, and the base checkpoint with its
sha256. An export ``improve`` wrote holds its adapter in ``adapter/`` (``in_export``): that copy is
tried first, so a moved or copied export still finds it. Manifests of older releases have the
paths without digests: they load unchecked.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PeftExportError
from ..fsutil import sha256_file
from ..peft import PeftConfig
from ..peft.adapters import ADAPTER_WEIGHTS, AdaptedModel, load_model_source

HINT = "give the adapter run (or checkpoint) it was made from with --source"


def _check_digest(path: Path, recorded: str | None, export_dir: Path, what: str) -> None:
    if not recorded or not path.is_file():
        return
    digest = sha256_file(path)
    if digest != recorded:
        raise PeftExportError(f"{export_dir}: its torch source {what} {path} has sha256 {digest[:12]}..., not the "
                              f"{recorded[:12]}... the export was made from; {HINT}")


def _adapter_candidates(export_dir: Path, src: dict) -> list[Path]:
    found = []
    if src.get("in_export"):
        found.append(export_dir / src["in_export"])
    if src.get("adapter"):
        found.append(Path(src["adapter"]))
    return found


def load_torch_source(export_dir: str | Path, manifest: dict, source: str | Path | None = None,
                      checkpoint: str | Path | None = None) -> AdaptedModel:
    """The export's torch model: ``source`` if given (an adapter run / ``adapter.safetensors``, or a
    merged or plain SAM checkpoint), else what the manifest records. Raises one clear message when
    it is missing, changed since the export, or of another model type or image size."""
    export_dir = Path(export_dir)
    if manifest.get("adapters"):
        raise PeftExportError(f"{export_dir}: holds several adapters ({', '.join(manifest['adapters'])}); improve "
                              "works on a one-model export (export the adapter to improve on its own)")
    if source is not None:
        adapted = _load_given(Path(source), checkpoint)
    else:
        adapted = _load_recorded(export_dir, manifest.get("source") or {}, checkpoint)
    for key, have in (("model_type", adapted.base.model_type), ("image_size", adapted.base.image_size)):
        if manifest.get(key) is not None and manifest[key] != have:
            raise PeftExportError(f"{export_dir}: the export is {key} {manifest[key]}, its torch source "
                                  f"{adapted.source} is {have}; {HINT}")
    return adapted


def _load_given(path: Path, checkpoint: str | Path | None) -> AdaptedModel:
    if not path.exists():
        raise PeftExportError(f"--source {path}: not found")
    if path.is_dir() or path.suffix in (".safetensors", ".json"):
        return load_model_source(adapter=path, checkpoint=checkpoint)
    return load_model_source(merged=path)


def _load_recorded(export_dir: Path, src: dict, checkpoint: str | Path | None) -> AdaptedModel:
    kind = src.get("kind")
    if kind == "adapter":
        candidates = _adapter_candidates(export_dir, src)
        here = next((p for p in candidates if p.exists()), None)
        if here is None:
            raise PeftExportError(f"{export_dir}: its torch source, the adapter {candidates[-1] if candidates else '?'}, "
                                  f"is not on this machine; {HINT}")
        weights = here / ADAPTER_WEIGHTS if here.is_dir() else here.with_name(ADAPTER_WEIGHTS)
        _check_digest(weights, src.get("adapter_sha256"), export_dir, "adapter")
        return load_model_source(adapter=here, checkpoint=checkpoint)
    if kind == "merged":
        path = Path(src.get("path", ""))
        if not path.is_file():
            raise PeftExportError(f"{export_dir}: its torch source, the checkpoint {path}, is not on this machine; {HINT}")
        _check_digest(path, src.get("checkpoint_sha256"), export_dir, "checkpoint")
        return load_model_source(merged=path)
    if kind == "micro-sam":
        path = Path(src.get("micro_sam", ""))
        if src.get("peft"):  # the new adapter needs a base file that loads as plain SAM
            raise PeftExportError(
                f"{export_dir}: made from the micro-sam PEFT checkpoint {path}; merge it first (peftexport merge "
                f"--micro-sam {path} --peft {PeftConfig.from_dict(src['peft']).method} ... -o merged.pth) and "
                "give --source merged.pth")
        if not path.is_file():
            raise PeftExportError(f"{export_dir}: its torch source, the micro-sam file {path}, is not on this machine; "
                                  f"{HINT}")
        return load_model_source(merged=path)
    raise PeftExportError(f"{export_dir}: its manifest records no torch source (an export of an older peftexport); "
                          f"{HINT}")
