"""Prompts and segment-everything on large images, tile by tile at full resolution, into zarr.

``peftexport predict BIG --points/--box ... --tile`` and ``--everything --tile``. The tiled
runtime (``runtime.tiled``) does the work; this module checks every input first, then writes
each image's result as a one-level OME-Zarr labels image under ``OUT.zarr.partial`` and renames
it to ``OUT.zarr`` when complete (as ``predict.large`` does for ``--instances``):

- prompts: the prompt goes to the tile whose inner area holds its centre (``TiledImage.route``);
  the best mask (highest predicted IoU) is written as object 1 into that tile's window, the rest
  of the array stays 0 (zarr stores no empty chunks), so the output costs what the window costs;
- everything: each tile's masks, those touching an inner tile edge dropped, plus the whole image
  at the model input as SAM's crop layer 0 (it keeps the objects no tile holds whole), box NMS
  across all (``TiledImage.segment_everything``); a halo below ``min_everything_halo`` is
  refused. The labels of the whole image are held in memory once (int32), and every tile's kept
  masks (as runs) until the merge: for slides far larger than a few tiles, use ``--instances``,
  whose steps write straight into zarr and resume.

Both run in this process (no Dask: one prompt touches one tile; segment-everything's merge
needs every tile's masks in one place). Over a folder, ``resume`` skips the images whose output
is complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import PeftExportError
from ..fsutil import zarr_named

CHUNK = 1024  # px: the output's zarr chunks


def _targets(files: List[Path], out: Path, suffix: str) -> List[Path]:
    from ..data.io import file_stem
    from .large_checks import check_zarr_output

    check_zarr_output(out)
    if zarr_named(out) and len(files) != 1:
        raise PeftExportError(f"{out}: one .zarr output holds one image's result; give an output folder for "
                              f"{len(files)} images")
    if out.suffix.lower() != ".zarr" and out.exists() and not out.is_dir():
        raise PeftExportError(f"{out}: exists and is not a directory")
    targets = [out] if zarr_named(out) else [
        out / f"{file_stem(f) if f.suffix.lower() != '.zarr' else f.stem}_{suffix}.zarr" for f in files]
    if len(set(targets)) != len(targets):
        raise PeftExportError(f"{out}: two images have the same name; their outputs would collide")
    return targets


def _write(target: Path, shape, fill: Any, record: Dict[str, Any], source: str) -> None:
    """``fill(array)`` writes the labels into a new OME-Zarr labels group at ``target``.partial,
    then the metadata, then the rename: only a complete result has the final name."""
    from .arrays import create_labels_group, finish_labels

    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        group = create_labels_group(partial, shape, CHUNK, target.stem, source)
        fill(group["0"])
        finish_labels(group, target.stem, source)
        group.attrs["peftexport"] = record
        if target.exists():  # --overwrite: the old result goes only now that the new one is complete
            shutil.rmtree(target)
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def predict_large_prompts(export_dir: str | os.PathLike, images: List[str | os.PathLike], out: str | os.PathLike,
                          points: Any = None, box: Any = None, everything: bool = False,
                          everything_options: Optional[Dict[str, Any]] = None, tile: Optional[int] = None,
                          halo: Optional[int] = None, scale: Optional[float] = None, precision: str = "fp32",
                          multimask: bool = True, adapter: Optional[str] = None, overwrite: bool = False,
                          threads: Optional[int] = None, device: str = "cpu", resume: bool = False,
                          progress: bool = False, backend: str = "onnxruntime") -> List[Dict[str, Any]]:
    """Prompts (``points``/``box`` in image pixels, as ``predict_images``) or ``everything`` on each
    image through its tiles; ``out`` is OUT.zarr for one image, else a folder that gets
    ``<stem>_mask.zarr`` (prompts) or ``<stem>_labels.zarr`` (everything). Returns one record per
    image (also stored in the output's ``peftexport`` attribute). ``resume``: images whose output
    exists (only a complete result has its name) are skipped, their record read back with
    ``"skipped": True``. Images are opened one at a time (a decoded PNG is not kept for the next)."""
    from ..runtime import SamSession, read_manifest
    from ..runtime.tiling import TileGrid, tile_spec
    from .arrays import open_image_array
    from .images import _as_box, _as_points, check_prompts_inside, everything_settings
    from .large import expand_inputs
    from .large_checks import large_adapter

    coords, labels = _as_points(points)
    bx = _as_box(box)
    if everything == (coords is not None or bx is not None):
        raise PeftExportError("prompts: give --points and/or --box, or --everything (not both)")
    options = everything_settings(everything_options, check=everything)
    manifest = read_manifest(export_dir)
    adapter = large_adapter(export_dir, manifest, adapter)
    spec = tile_spec(manifest, tile, halo, scale, adapter)
    files, out = expand_inputs(images), Path(out)
    targets = _targets(files, out, "labels" if everything else "mask")
    if everything:
        check_everything_halo(spec)
    todo, records = [], []
    for f, t in zip(files, targets):  # every input checked before anything is written
        array = open_image_array(f)
        shape = (int(array.shape[0]), int(array.shape[1]))
        del array
        check_prompts_inside(str(f), shape, coords, bx)
        if not everything:
            from ..runtime.tiled import TiledImage

            TiledImage.route_on(TileGrid(shape, spec), coords, labels, bx)  # refused here, not after others ran
        if t.exists() and resume and not overwrite:
            records.append({**_finished_record(t), "skipped": True})
            continue
        if t.exists() and not overwrite:
            raise PeftExportError(f"{t}: already exists (pass --overwrite to replace it"
                                  f"{', or --resume to skip finished images' if len(files) > 1 else ''})")
        todo.append((f, t))
    if out.suffix.lower() != ".zarr":
        out.mkdir(parents=True, exist_ok=True)
    if not todo:
        return records
    session = SamSession(export_dir, backend=backend, device=device, precision=precision, intra_op_threads=threads)
    from tqdm import tqdm

    for f, t in tqdm(todo, desc="predict", unit="image", disable=not progress or len(todo) < 2):
        tiled = session.tiled(open_image_array(f), tile=spec.tile, halo=spec.halo, adapter=adapter)
        record: Dict[str, Any] = {"image": str(f), "shape": list(tiled.shape), "export_dir": str(export_dir),
                                  "precision": precision, "device": device, "backend": backend, "tiled": True, "tile": spec.tile,
                                  "halo": spec.halo, "scale": spec.scale, "tiles": len(tiled.grid),
                                  "outputs": {"labels": str(t)}}
        if adapter is not None:
            record["adapter"] = adapter
        if everything:
            lab, recs = tiled.segment_everything(**options)
            record.update(mode="everything", options=options, n_objects=len(recs), filters=recs.summary)
            fill = lambda z, lab=lab: _fill_blocks(z, lab)
        else:
            masks, iou, _, (y0, y1, x0, x1) = tiled.predict_window(point_coords=coords, point_labels=labels, box=bx,
                                                                   multimask_output=multimask)
            best = int(np.argmax(iou))
            record.update(mode="prompt", scores=[float(v) for v in iou], best=best,
                          mask_area=int(masks[best].sum()), window=[y0, y1, x0, x1],
                          points=None if coords is None else [[float(x), float(y), int(lb)]
                                                              for (x, y), lb in zip(coords, labels)],
                          box=None if bx is None else [float(v) for v in bx], n_objects=int(masks[best].any()))
            window = masks[best].astype(np.uint32)

            def fill(z, window=window, y0=y0, y1=y1, x0=x0, x1=x1):
                z[y0:y1, x0:x1] = window
        _write(t, tiled.shape, fill, record, str(f))
        records.append(record)
    return records


def _finished_record(target: Path) -> Dict[str, Any]:
    import zarr

    return dict(zarr.open_group(str(target), mode="r").attrs["peftexport"])


def check_everything_halo(spec: Any) -> None:
    """Segment-everything keeps a tile's masks away from its inner edges: without a halo no tile
    sees an object that crosses a border whole."""
    from ..runtime.tiled import min_everything_halo

    need = min_everything_halo(spec.tile)
    if spec.halo < need:
        raise PeftExportError(f"--halo: {spec.halo} px is too small for --everything on {spec.tile}-px tiles: an "
                              f"object crossing a tile border is whole in a neighbouring tile only within the halo (use "
                              f"--halo {need} or more; the default is tile / 4)")


def _fill_blocks(z: Any, labels: np.ndarray) -> None:
    for y in range(0, labels.shape[0], CHUNK):
        for x in range(0, labels.shape[1], CHUNK):
            z[y:y + CHUNK, x:x + CHUNK] = labels[y:y + CHUNK, x:x + CHUNK].astype(np.uint32)
