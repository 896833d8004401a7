"""What ``peftexport predict --3d / --propagate / --track`` does, as library calls: inputs checked
before anything runs (a 2D image, a missing time axis, planes of different sizes, a prompt outside
the volume, an output that exists: one error, nothing written), then the work, then the outputs
written whole.

Prompts on the command line are z,y,x (napari's order): ``--points "z,y,x[,label];..."``
(label 1 positive, 0 negative) and ``--box "z,x0,y0,x1,y1[;...]"``; prompts on several planes
annotate one object on each of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import PeftExportError
from .outputs import check_labels_path, write_stack_labels, write_tracks_csv


def _numbers(text: str, n: tuple, what: str, form: str) -> List[List[float]]:
    out = []
    for part in [p for p in str(text).split(";") if p.strip()]:
        try:
            vals = [float(v) for v in part.split(",")]
        except ValueError:
            raise PeftExportError(f"{what}: expected {form}, got {part.strip()!r}") from None
        if len(vals) not in n or not all(np.isfinite(vals)):
            raise PeftExportError(f"{what}: expected {form}, got {part.strip()!r}")
        out.append(vals)
    if not out:
        raise PeftExportError(f"{what}: expected {form}, got nothing")
    return out


def parse_prompts_3d(points: Optional[str], box: Optional[str], shape: tuple) -> Dict[int, Dict[str, Any]]:
    """``--points``/``--box`` text -> {plane: {"points", "labels", "box"}}, each checked inside the
    Z x H x W volume."""
    n, h, w = shape
    prompts: Dict[int, Dict[str, Any]] = {}

    def plane(z: float, what: str) -> Dict[str, Any]:
        if int(z) != z or not 0 <= z < n:
            raise PeftExportError(f"{what}: plane {z:g} lies outside the volume (planes 0..{n - 1})")
        return prompts.setdefault(int(z), {})

    for z, y, x, *label in (_numbers(points, (3, 4), "--points", "'z,y,x[,label];...'") if points else []):
        if not (0 <= x <= w and 0 <= y <= h):
            raise PeftExportError(f"--points: {z:g},{y:g},{x:g} lies outside the volume's planes ({h} x {w} px)")
        lab = int(label[0]) if label else 1
        if lab not in (0, 1):
            raise PeftExportError(f"--points: label {label[0]:g} (use 1 positive, 0 negative)")
        p = plane(z, "--points")
        p.setdefault("points", []).append([x, y])
        p.setdefault("labels", []).append(lab)
    for z, x0, y0, x1, y1 in (_numbers(box, (5,), "--box", "'z,x0,y0,x1,y1[;...]'") if box else []):
        if not (0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h):
            raise PeftExportError(f"--box: {x0:g},{y0:g},{x1:g},{y1:g} on plane {z:g} is not a box inside the "
                                  f"volume's planes ({h} x {w} px; x0 <= x1, y0 <= y1)")
        p = plane(z, "--box")
        if "box" in p:
            raise PeftExportError(f"--box: two boxes on plane {z:g}; one object has one box per plane")
        p["box"] = np.array([x0, y0, x1, y1], np.float64)
    for p in prompts.values():
        if "points" in p:
            p["points"], p["labels"] = np.array(p["points"], np.float64), np.array(p["labels"])
            if "box" not in p and not (p["labels"] == 1).any():
                raise PeftExportError("--points: a plane with negative points only; give a positive point or a box")
    return prompts


def _session(export_dir: Any, precision: str, device: str = "cpu", backend: str = "onnxruntime") -> Any:
    from ..runtime import SamSession

    return SamSession(export_dir, backend=backend, device=device, precision=precision)


def _bar(progress: bool, desc: str):
    if not progress:
        return None, None
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="plane")

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


def predict_volume(export_dir: Any, image: Any, out: Any, mode: str = "auto", axes: Optional[str] = None,
                   channel: Optional[int] = None, instance_options: Optional[Dict[str, Any]] = None,
                   everything_options: Optional[Dict[str, Any]] = None, merge: Optional[Dict[str, Any]] = None,
                   embeddings: Optional[Any] = None, precision: str = "fp32", adapter: Optional[str] = None,
                   tile: Optional[int] = None, halo: Optional[int] = None, scale: Optional[float] = None,
                   overwrite: bool = False, progress: bool = False, device: str = "cpu",
                   backend: str = "onnxruntime") -> Dict[str, Any]:
    """Automatic 3D segmentation in memory (labels to TIFF or OME-Zarr); ``embeddings``: a store to
    reuse (or fill). Volumes larger than memory: ``slabs.plan_volume`` + ``run_volume``."""
    from .automatic import resolve_mode, segment_volume
    from .embeddings import VolumeEmbeddings
    from .stacks import open_stack

    stack = open_stack(image, "z", axes, channel)
    out = check_labels_path(out, overwrite)
    session = _session(export_dir, precision, device, backend)
    vol = VolumeEmbeddings(session, stack, store=embeddings, tile=tile, halo=halo, scale=scale, adapter=adapter,
                           keep=embeddings is not None)
    resolve_mode(session, mode, vol.adapter)  # --instances on an export without AIS: refused before the bar
    bar, update = _bar(progress, "planes")
    labels = segment_volume(session, vol, mode, instance_options, everything_options, progress=update,
                            **(merge or {}))
    if bar is not None:
        bar.close()
    record = {"image": str(image), "shape": list(labels.shape), "mode": mode, "n_objects": int(labels.max()),
              "encoder_runs": vol.encoder_runs, "outputs": {"labels": str(out)}}
    write_stack_labels(labels, out, "z", str(image), overwrite, record)
    return record


def predict_object(export_dir: Any, image: Any, out: Any, points: Optional[str] = None, box: Optional[str] = None,
                   propagate: bool = True, axes: Optional[str] = None, channel: Optional[int] = None,
                   propagation: Optional[Dict[str, Any]] = None, embeddings: Optional[Any] = None,
                   precision: str = "fp32", adapter: Optional[str] = None, tile: Optional[int] = None,
                   halo: Optional[int] = None, scale: Optional[float] = None, overwrite: bool = False,
                   progress: bool = False, method: str = "auto", device: str = "cpu",
                   backend: str = "onnxruntime", stop_lower: bool = False, stop_upper: bool = False) -> Dict[str, Any]:
    """One object from prompts on one or a few planes, propagated through z (``propagate``); its
    mask (0/1) written as a stack. ``method``: "prompts" (micro-sam's, on plane embeddings), "sam2"
    (SAM 2's memory: the prompts are its conditioning frames), "auto" (the one the export offers).
    ``stop_lower`` / ``stop_upper``: nothing below the lowest / above the highest annotated plane."""
    from .embeddings import VolumeEmbeddings
    from .propagate import (PROPAGATION_DEFAULTS, check_propagation, check_sam2_options, masks_from_prompts,
                            segment_object_in_volume)
    from .sam2_propagate import is_sam2, resolve_method
    from .stacks import open_stack

    check_propagation(**(propagation or {}))
    if not points and not box:
        raise PeftExportError("--propagate: give the object with --points 'z,y,x' and/or --box 'z,x0,y0,x1,y1'")
    stack = open_stack(image, "z", axes, channel)
    prompts = parse_prompts_3d(points, box, (stack.n_planes, *stack.plane_shape))
    out = check_labels_path(out, overwrite)
    session = _session(export_dir, precision, device, backend)
    if is_sam2(session) and not propagate:
        raise PeftExportError(f"{export_dir}: on a SAM 2 export --points/--box segment the object through the volume; "
                              "add --propagate")
    if resolve_method(session, method) == "sam2":  # before any encoder run: an export without memory graphs
        check_sam2_options(**{**PROPAGATION_DEFAULTS, **(propagation or {})})
        return _predict_object_sam2(session, stack, prompts, image, out, embeddings, tile, halo, scale, overwrite,
                                    progress, stop_lower, stop_upper)
    vol = VolumeEmbeddings(session, stack, store=embeddings, tile=tile, halo=halo, scale=scale, adapter=adapter)
    for p in prompts.values():  # a prompt must fit one tile of a tiled plane: checked before any encoder run
        vol.plane(0).route(p.get("points"), p.get("labels"), p.get("box"))
    masks = masks_from_prompts(vol, prompts)
    span = (min(masks), max(masks))
    if propagate:
        bar, update = _bar(progress, "propagate")
        seg, span = segment_object_in_volume(vol, masks, progress=update, stop_lower=stop_lower,
                                             stop_upper=stop_upper, **(propagation or {}))
        if bar is not None:
            bar.close()
    else:
        seg = np.zeros((stack.n_planes, *stack.plane_shape), np.uint8)
        for z, m in masks.items():
            seg[z] = m
    record = {"image": str(image), "annotated_planes": sorted(masks), "planes": [int(span[0]), int(span[1])],
              "voxels": int(seg.sum()), "propagation": "prompts", "encoder_runs": vol.encoder_runs,
              "outputs": {"labels": str(out)}}
    write_stack_labels(seg, out, "z", str(image), overwrite, record)
    return record


def _predict_object_sam2(session: Any, stack: Any, prompts: Dict[int, Dict[str, Any]], image: Any, out: Path,
                         embeddings: Optional[Any], tile: Optional[int], halo: Optional[int], scale: Optional[float],
                         overwrite: bool, progress: bool, stop_lower: bool = False,
                         stop_upper: bool = False) -> Dict[str, Any]:
    """``predict_object`` with SAM 2's propagation: the prompts are its conditioning planes."""
    from .embeddings import VolumeEmbeddings
    from .sam2_propagate import segment_object_with_sam2

    if tile is not None or halo is not None or scale is not None:
        raise PeftExportError("--tile/--halo/--scale: SAM 2's propagation resizes each whole plane to its input "
                              "(tiles are for automatic 3D, --track and 2D images)")
    if embeddings is not None:
        raise PeftExportError(f"{embeddings}: SAM 2's propagation keeps no plane embeddings (it encodes each plane "
                              "as it reaches it); leave out --embeddings (a store is for --3d)")
    vol = VolumeEmbeddings(session, stack)
    bar, update = _bar(progress, "propagate")
    seg, span = segment_object_with_sam2(session, stack, prompts, vol.intensity, stop_lower, stop_upper,
                                         progress=update)
    if bar is not None:
        bar.close()
    record = {"image": str(image), "annotated_planes": sorted(prompts), "planes": [int(span[0]), int(span[1])],
              "voxels": int(seg.sum()), "propagation": "sam2", "outputs": {"labels": str(out)}}
    write_stack_labels(seg, out, "z", str(image), overwrite, record)
    return record


def track_outputs(out: Path) -> Dict[str, Path]:
    """Where ``--track -o OUT.zarr|OUT.tif`` writes: the labels, ``OUT_ctc/`` and ``OUT_tracks.csv``."""
    stem = out.name[: -len(out.suffix)]
    return {"labels": out, "ctc": out.with_name(f"{stem}_ctc"), "tracks": out.with_name(f"{stem}_tracks.csv")}


def predict_movie(export_dir: Any, image: Any, out: Any, mode: str = "auto", axes: Optional[str] = None,
                  channel: Optional[int] = None, instance_options: Optional[Dict[str, Any]] = None,
                  everything_options: Optional[Dict[str, Any]] = None, tracking: Optional[Dict[str, Any]] = None,
                  precision: str = "fp32", adapter: Optional[str] = None, tile: Optional[int] = None,
                  halo: Optional[int] = None, scale: Optional[float] = None, overwrite: bool = False,
                  progress: bool = False, device: str = "cpu", backend: str = "onnxruntime") -> Dict[str, Any]:
    """Every frame segmented, objects linked into tracks with divisions; writes the tracked labels,
    the Cell Tracking Challenge result (``OUT_ctc/``) and napari's Tracks data (``OUT_tracks.csv``)."""
    from .automatic import resolve_mode
    from .embeddings import VolumeEmbeddings
    from .stacks import open_stack
    from .tracking import track, write_ctc

    stack = open_stack(image, "t", axes, channel)
    paths = track_outputs(check_labels_path(out, overwrite))
    for key in ("ctc", "tracks"):
        if paths[key].exists() and not overwrite:
            raise PeftExportError(f"{paths[key]}: already exists (pass --overwrite to replace it)")
    session = _session(export_dir, precision, device, backend)
    vol = VolumeEmbeddings(session, stack, tile=tile, halo=halo, scale=scale, adapter=adapter, keep=False)
    resolve_mode(session, mode, vol.adapter)
    bar, update = _bar(progress, "frames")
    result = track(session, vol, mode, instance_options, everything_options, progress=update, **(tracking or {}))
    if bar is not None:
        bar.close()
    record = {"image": str(image), "frames": stack.n_planes, "n_tracks": result.n_tracks,
              "n_divisions": result.n_divisions, "outputs": {k: str(v) for k, v in paths.items()}}
    write_ctc(result, paths["ctc"], overwrite)
    write_tracks_csv(result.tracks, result.graph, paths["tracks"], overwrite)
    write_stack_labels(result.labels, paths["labels"], "t", str(image), overwrite, record)
    return record


def stack_paths(images: List[Any]) -> Path:
    if len(images) != 1:
        raise PeftExportError(f"--3d/--track: give one stack (got {len(images)} inputs); run once per stack")
    return Path(images[0])

