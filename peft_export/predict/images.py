"""Segment image files with an export dir: prompts (points / box), segment-everything, or automatic
instance segmentation with micro-sam's instance decoder (``instances``).

Every input is checked (export dir, prompt strings, images readable, prompts inside
each image, outputs free) before the model runs, so a bad 50th file does not leave
a half-written result set. Each output file is written atomically.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import PeftExportError
from ..fsutil import atomic_file

EVERYTHING_DEFAULTS = {
    "points_per_side": 32,
    "points_per_batch": 64,
    "pred_iou_thresh": 0.88,
    "stability_score_thresh": 0.95,
    "box_nms_thresh": 0.7,
    "min_mask_region_area": 0,
}

# predict's option for each segment-everything filter, named in the hint when few objects remain.
EVERYTHING_OPTIONS = {"pred_iou": "--pred-iou-thresh", "stability": "--stability-thresh",
                      "nms": "--box-nms-thresh", "small_regions": "--min-area"}
FEW_OBJECTS = 10
NO_AIS_HINT = ("train one with `peftexport finetune --instance-decoder` (or try `peftexport demo --instances`, "
               "whose export has one) and export it, or export a micro-sam model that has one")
# The grid has n*n prompts, each a decoder run: 256 (65,536 prompts) is far past SAM's 32 and the
# largest grid that finishes in minutes; beyond it the candidate masks alone exhaust memory.
MAX_POINTS_PER_SIDE = 256
_OPTION_NAMES = {"points_per_side": "--points-per-side", "points_per_batch": "--points-per-batch",
                 "pred_iou_thresh": "--pred-iou-thresh", "stability_score_thresh": "--stability-thresh",
                 "box_nms_thresh": "--box-nms-thresh", "min_mask_region_area": "--min-area"}


def check_everything_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """Segment-everything options checked before any work, errors naming the command-line option."""
    for key in ("points_per_side", "points_per_batch", "min_mask_region_area"):
        v, name = options[key], _OPTION_NAMES[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise PeftExportError(f"{name}: expected a whole number, got {v!r}")
        low = 0 if key == "min_mask_region_area" else 1
        if v < low:
            raise PeftExportError(f"{name}: must be >= {low}, got {v}")
    n = int(options["points_per_side"])
    if n > MAX_POINTS_PER_SIDE:
        raise PeftExportError(f"--points-per-side: {n} is too large ({n}x{n} = {n * n:,} prompts per image; "
                              f"at most {MAX_POINTS_PER_SIDE}, SAM's default is 32)")
    for key in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
        v = options[key]
        if not isinstance(v, (int, float, np.number)) or not (0.0 <= float(v) <= 1.0):
            raise PeftExportError(f"{_OPTION_NAMES[key]}: expected a number in [0, 1], got {v!r}")
    return options

def everything_settings(everything_options: Optional[Dict[str, Any]], check: bool) -> Dict[str, Any]:
    """EVERYTHING_DEFAULTS with the given options laid over (None keeps the default); checked when `check`."""
    options = dict(EVERYTHING_DEFAULTS)
    for k, v in (everything_options or {}).items():
        if k not in options:
            raise PeftExportError(f"everything_options: unknown option {k!r} (known: {', '.join(options)})")
        if v is not None:
            options[k] = v
    if check:
        check_everything_options(options)
    return options


_POINTS_HELP = "expected 'x,y[,label];x,y[,label];...' with label 1 (positive) or 0 (negative)"


def _number(text: str, what: str, whole: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise PeftExportError(f"{what}: cannot parse {text.strip()!r} in {whole!r} as a number") from None
    if not np.isfinite(v):
        raise PeftExportError(f"{what}: {text.strip()!r} in {whole!r} is not a finite number")
    return v


def parse_points(text: str) -> Tuple[np.ndarray, np.ndarray]:
    """``"x,y[,label];..."`` -> (coords (N,2) float64, labels (N,) int64); label defaults to 1."""
    items = [p.strip() for p in str(text).split(";") if p.strip()]
    if not items:
        raise PeftExportError(f"--points: no points in {text!r} ({_POINTS_HELP})")
    coords, labels = [], []
    for item in items:
        parts = [p.strip() for p in item.split(",")]
        if len(parts) not in (2, 3):
            raise PeftExportError(f"--points: {item!r} is not a point ({_POINTS_HELP})")
        coords.append([_number(p, "--points", text) for p in parts[:2]])
        label = parts[2] if len(parts) == 3 else "1"
        if label not in ("0", "1"):
            raise PeftExportError(f"--points: label {label!r} in {item!r} must be 1 (positive) or 0 (negative)")
        labels.append(int(label))
    return np.asarray(coords, np.float64), np.asarray(labels, np.int64)


def parse_box(text: str) -> np.ndarray:
    """``"x0,y0,x1,y1"`` -> (4,) float64 with x0 <= x1 and y0 <= y1."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4 or not all(parts):
        raise PeftExportError(f"--box: expected 'x0,y0,x1,y1' (4 numbers), got {text!r}")
    box = np.asarray([_number(p, "--box", text) for p in parts], np.float64)
    if box[2] < box[0] or box[3] < box[1]:
        raise PeftExportError(f"--box: {text!r} needs x0 <= x1 and y0 <= y1")
    return box


def _as_points(points) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    if points is None:
        return None, None
    if isinstance(points, str):
        return parse_points(points)
    if isinstance(points, tuple) and len(points) == 2 and np.ndim(points[0]) == 2:
        coords, labels = np.asarray(points[0], np.float64), np.asarray(points[1])
    else:  # sequence of (x, y) or (x, y, label)
        arr = np.asarray(points, np.float64)
        if arr.ndim != 2 or arr.shape[1] not in (2, 3) or len(arr) == 0:
            raise PeftExportError(f"points: expected (N, 2) or (N, 3) x,y[,label], got shape {arr.shape}")
        coords = arr[:, :2]
        labels = arr[:, 2] if arr.shape[1] == 3 else np.ones(len(arr))
    if coords.ndim != 2 or coords.shape[1] != 2 or labels.shape != (len(coords),):
        raise PeftExportError(f"points: coords {coords.shape} and labels {labels.shape} do not match")
    if not np.isin(labels, (0, 1)).all():
        raise PeftExportError("points: labels must be 1 (positive) or 0 (negative)")
    return coords, labels.astype(np.int64)


def _as_box(box) -> Optional[np.ndarray]:
    if box is None:
        return None
    if isinstance(box, str):
        return parse_box(box)
    arr = np.asarray(box, np.float64).reshape(-1)
    if arr.shape != (4,) or not np.isfinite(arr).all():
        raise PeftExportError(f"box: expected 4 numbers x0,y0,x1,y1, got {np.asarray(box).tolist()}")
    if arr[2] < arr[0] or arr[3] < arr[1]:
        raise PeftExportError(f"box: {arr.tolist()} needs x0 <= x1 and y0 <= y1")
    return arr


def _fmt(v: float) -> str:
    return f"{v:g}"


def check_prompts_inside(where: str, shape_hw: Tuple[int, int], coords, box) -> None:
    """Raise naming the image and the coordinate when a prompt lies outside the image."""
    h, w = shape_hw
    if coords is not None:
        for x, y in coords:
            if not (0 <= x <= w and 0 <= y <= h):
                raise PeftExportError(
                    f"{where}: point {_fmt(x)},{_fmt(y)} is outside the image (width {w}, height {h})")
    if box is not None:
        x0, y0, x1, y1 = box
        if not (0 <= x0 <= w and 0 <= x1 <= w and 0 <= y0 <= h and 0 <= y1 <= h):
            raise PeftExportError(f"{where}: box {','.join(_fmt(v) for v in box)} is outside the image "
                                  f"(width {w}, height {h})")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One 2D image (HxW or HxWxC) from TIFF/PNG/JPEG/NPY; stacks are refused."""
    from ..data.io import read_image_planes

    planes = read_image_planes(path)
    if len(planes) != 1:
        raise PeftExportError(f"{path}: holds {len(planes)} planes (a stack); predict takes 2D images, "
                              "save each plane as its own file")
    return planes[0]


def output_paths(out_dir: Path, stem: str, everything: bool, overlay: bool) -> Dict[str, Path]:
    """Output files of one image; ``everything`` stands for any labels output (segment-everything or instances)."""
    paths = {"labels" if everything else "mask": out_dir / f"{stem}_{'labels' if everything else 'mask'}.tif",
             "json": out_dir / f"{stem}_scores.json"}
    if overlay:
        paths["overlay"] = out_dir / f"{stem}_overlay.png"
    return paths


def _label_dtype(labels: np.ndarray) -> np.ndarray:
    """uint16 labels, int32 above 65535 objects."""
    n = int(labels.max()) if labels.size else 0
    return labels.astype(np.uint16) if n <= np.iinfo(np.uint16).max else labels.astype(np.int32)


def _write_tiff(array: np.ndarray, path: Path, overwrite: bool) -> None:
    import tifffile

    with atomic_file(path, overwrite) as tmp:
        tifffile.imwrite(tmp, array, compression="zlib")


def _write_json(record: dict, path: Path, overwrite: bool) -> None:
    with atomic_file(path, overwrite) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")


def _write_png(rgb: np.ndarray, path: Path, overwrite: bool) -> None:
    from .overlay import save_png

    with atomic_file(path, overwrite) as tmp:
        save_png(rgb, tmp)


def predict_images(
    export_dir: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    points=None,
    box=None,
    everything: bool = False,
    overlay: bool = False,
    precision: str = "fp32",
    device: str = "cpu",
    backend: str = "onnxruntime",
    multimask: bool = True,
    all_masks: bool = False,
    overwrite: bool = False,
    everything_options: Optional[Dict[str, Any]] = None,
    progress: bool = False,
    intra_op_threads: Optional[int] = None,
    adapter: Optional[str] = None,
    instances: bool = False,
    instance_options: Optional[Dict[str, Any]] = None,
    resume: bool = False,
) -> List[Dict[str, Any]]:
    """Segment each image file and write results into ``out_dir``; return one record per image
    (per image and adapter with ``adapter="all"``).

    Prompts (``points``: "x,y[,label];..." or (N,2|3) array, or a (coords, labels) pair;
    ``box``: "x0,y0,x1,y1" or 4 numbers, in pixels of each image) give ``<stem>_mask.tif``,
    uint8 0/1: the mask with the highest predicted IoU, or with ``all_masks`` every mask
    (C,H,W). ``everything`` gives ``<stem>_labels.tif`` (uint16 instance labels, int32
    above 65535 objects); its record has "filters" (the candidates each filter removed) and,
    with fewer than ``FEW_OBJECTS`` objects, "hint" (which option relaxes which filter).
    ``instances`` gives the same labels file from micro-sam's automatic instance segmentation
    (options ``instance_options``: ``SamSession.segment_instances``'s parameters).
    Always ``<stem>_scores.json``; ``overlay`` adds ``<stem>_overlay.png``. The record is the
    JSON content. An export of several adapters needs ``adapter`` (optional when
    it has one); ``"all"`` runs every adapter on each image (the trunk once) and writes each
    adapter's results into ``out_dir/<adapter>/``.

    ``resume``: an image whose ``<stem>_scores.json`` exists is complete (the JSON is written
    last, atomically) and is skipped, its record read back with ``"skipped": True``; outputs of
    an image without it (a run stopped midway) are replaced.
    """
    from ..runtime import SamSession, filter_report, read_manifest
    from ..runtime.adapters import pick_adapter
    from ..runtime.instances import check_ais_params, require_ais_packages

    coords, labels = _as_points(points)
    bx = _as_box(box)
    if everything and instances:
        raise PeftExportError("--instances: cannot be combined with --everything")
    auto = "--everything" if everything else "--instances" if instances else None
    if auto and (coords is not None or bx is not None):
        raise PeftExportError(f"{auto}: cannot be combined with --points/--box")
    if not auto and coords is None and bx is None:
        raise PeftExportError("prompts: give --points and/or --box, or --everything / --instances")
    ais_options = check_ais_params(dict(instance_options or {})) if instances else None
    options = everything_settings(everything_options, check=everything)
    if not images:
        raise PeftExportError("images: give at least one image file")
    manifest = read_manifest(export_dir)  # cheap checks first: export dir, format version
    rule = manifest["preprocessing"].get("intensity")
    names = list(manifest.get("adapters") or {})
    if adapter == "all" and names:
        targets = [(n, Path(out_dir) / n) for n in names]
    else:
        try:
            targets = [(pick_adapter(None if adapter == "all" else adapter, names), Path(out_dir))]
        except PeftExportError as e:  # the command-line spelling of the choice
            why = str(e).removeprefix("adapter: ").replace("pass adapter=NAME", "pass --adapter NAME or all")
            raise PeftExportError(f"{export_dir}: --adapter: {why}") from None
    if instances:
        if not any(k == "ais_decoder" or k.startswith("ais_decoder_") for k in manifest["graphs"]):
            raise PeftExportError(f"{export_dir}: --instances needs an instance decoder, and this export has none: "
                                  + NO_AIS_HINT)
        require_ais_packages()

    from ..data.io import file_stem

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PeftExportError(f"{out_dir}: exists and is not a directory")
    images = [Path(p) for p in images]
    plans, seen, done = [], {}, []
    for path in images:
        stem = file_stem(path)
        if stem in seen:
            raise PeftExportError(f"{path}: has the same name as {seen[stem]}; their outputs would collide")
        seen[stem] = path
        shape = read_image(path).shape[:2]
        check_prompts_inside(str(path), shape, coords, bx)
        for name, target_dir in targets:
            outs = output_paths(target_dir, stem, bool(auto), overlay)
            if resume and outs["json"].is_file() and all(p.is_file() for p in outs.values()):
                done.append(outs["json"])
                continue
            for p in outs.values():
                if p.exists() and not overwrite and not resume:
                    raise PeftExportError(f"{p}: already exists (pass --overwrite to replace it, or --resume "
                                          "to skip images whose outputs are complete)")
            plans.append((path, outs, name))

    session = SamSession(export_dir, backend=backend, device=device, precision=precision,
                         intra_op_threads=intra_op_threads)
    for _, target_dir in targets:
        target_dir.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    records = []
    for done_json in done:
        try:
            records.append({**json.loads(done_json.read_text()), "skipped": True})
        except ValueError:
            raise PeftExportError(f"{done_json}: damaged (not JSON); delete it to redo that image") from None
    last = None
    bar = tqdm(plans, desc="predict", unit="image", disable=not progress)
    for path, outs, name in bar:
        if path != last:  # every adapter of one image: read and run the trunk once
            image = read_image(path)
            emb = session.encode(image)
            last = path
        record: Dict[str, Any] = {
            "image": str(path),
            "shape": [int(image.shape[0]), int(image.shape[1])],
            "export_dir": str(export_dir),
            "precision": precision,
            "device": device,
            "backend": backend,
            "mode": "everything" if everything else "instances" if instances else "prompt",
        }
        if name is not None:
            record["adapter"] = name
        picture = None
        if auto:  # instance labels: segment-everything or micro-sam's AIS
            if instances:
                opts = ais_options
                lab, recs = session.segment_instances(embedding=emb, adapter=name, **opts)
            else:
                opts = options
                lab, recs = session.segment_everything(embedding=emb, adapter=name, **opts)
            record.update(options=opts, n_objects=len(recs), objects=recs)
            if not instances:
                record["filters"] = recs.summary
                if len(recs) < FEW_OBJECTS:  # say which filter removed the candidates and how to relax it
                    record["hint"] = filter_report(recs.summary, EVERYTHING_OPTIONS)
            _write_tiff(_label_dtype(lab), outs["labels"], overwrite or resume)
            if overlay:
                from .overlay import annotate, overlay_legend, render_overlay

                picture = render_overlay(image, labels=lab, rule=rule)
                how = ("instance decoder (AIS)" if instances else
                       f"segment-everything, {options['points_per_side']}x{options['points_per_side']} point grid")
                picture = annotate(picture, f"{path.name}: {len(recs)} objects ({how})",
                                   [((200, 200, 200), "one colour per object")] if recs else [])
        else:
            masks, iou, _ = session.predict(point_coords=coords, point_labels=labels, box=bx,
                                            multimask_output=multimask, embedding=emb, adapter=name)
            best = int(np.argmax(iou))
            record.update(
                points=None if coords is None else [[float(x), float(y), int(lb)] for (x, y), lb in zip(coords, labels)],
                box=None if bx is None else [float(v) for v in bx],
                multimask=multimask,
                scores=[float(v) for v in iou],
                best=best,
                mask_area=int(masks[best].sum()),
                all_masks=all_masks,
            )
            out = masks.astype(np.uint8) if all_masks else masks[best].astype(np.uint8)
            _write_tiff(out, outs["mask"], overwrite or resume)
            if overlay:
                from .overlay import annotate, overlay_legend, render_overlay

                picture = render_overlay(image, masks=masks[best][None], points=coords, point_labels=labels,
                                         box=bx, rule=rule)
                picture = annotate(picture, f"{path.name}: mask {best} of {len(iou)}, predicted IoU {iou[best]:.3f}, "
                                            f"{int(masks[best].sum())} px", overlay_legend(coords, labels, bx))
        if picture is not None:
            _write_png(picture, outs["overlay"], overwrite or resume)
        record["outputs"] = {k: str(v) for k, v in outs.items()}
        _write_json(record, outs["json"], overwrite or resume)
        records.append(record)
    bar.close()  # the bar ends before the caller prints its result lines
    sys.stderr.flush()
    return records
