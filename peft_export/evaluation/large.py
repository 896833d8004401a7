"""mSA of label images too large to hold at once (zarr, memmap): the pred x gt overlap counts are
gathered block by block as sparse pairs, then matched as ``metrics.mean_segmentation_accuracy``
matches (the same optimal one-to-one matching, on only the objects that reach a threshold).
``evaluate_large``: ``peftexport evaluate --ais --tile`` (exports' tiled AIS on large labelled images)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import PeftExportError
from ..fsutil import zarr_named
from .metrics import DEFAULT_THRESHOLDS, _count_tp


def overlap_counts(pred: Any, gt: Any, block: int = 2048) -> Tuple[np.ndarray, np.ndarray, Dict[int, int], Dict[int, int]]:
    """Sparse contingency of two H x W label arrays read ``block`` rows/cols at a time:
    (pairs (K, 2) of non-zero ids, their pixel counts (K,), area per pred id, area per gt id)."""
    if tuple(pred.shape) != tuple(gt.shape) or len(pred.shape) != 2:
        raise PeftExportError(f"labels: prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ "
                              "(both must be H x W label images of one size)")
    pairs: Dict[Tuple[int, int], int] = {}
    area_p: Dict[int, int] = {}
    area_g: Dict[int, int] = {}
    h, w = pred.shape
    for y in range(0, h, block):
        for x in range(0, w, block):
            p = np.asarray(pred[y:y + block, x:x + block]).astype(np.int64).ravel()
            g = np.asarray(gt[y:y + block, x:x + block]).astype(np.int64).ravel()
            for ids, area in ((p, area_p), (g, area_g)):
                vals, counts = np.unique(ids[ids > 0], return_counts=True)
                for v, c in zip(vals.tolist(), counts.tolist()):
                    area[v] = area.get(v, 0) + c
            both = (p > 0) & (g > 0)
            if both.any():
                codes, counts = np.unique(np.stack([p[both], g[both]], axis=1), axis=0, return_counts=True)
                for (a, b), c in zip(codes.tolist(), counts.tolist()):
                    pairs[(a, b)] = pairs.get((a, b), 0) + c
    keys = np.array(list(pairs), np.int64).reshape(-1, 2)
    return keys, np.array(list(pairs.values()), np.int64), area_p, area_g


def mean_segmentation_accuracy_large(pred: Any, gt: Any, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                                     block: int = 2048) -> Tuple[float, Dict[float, float]]:
    """``mean_segmentation_accuracy`` of label arrays of any size (numpy, zarr, memmap): equal results."""
    keys, inter, area_p, area_g = overlap_counts(pred, gt, block)
    n_p, n_g = len(area_p), len(area_g)
    if len(keys):
        union = np.array([area_p[a] + area_g[b] for a, b in keys.tolist()], np.float64) - inter
        scores = inter / union
    else:
        scores = np.zeros(0)
    per = {}
    for t in thresholds:
        hit = scores >= float(t)
        tp = 0
        if hit.any():  # the optimal matching among the objects with a pair at this threshold only
            rows, r_idx = np.unique(keys[hit, 0], return_inverse=True)
            cols, c_idx = np.unique(keys[hit, 1], return_inverse=True)
            sub = np.zeros((len(rows), len(cols)))
            sub[r_idx, c_idx] = scores[hit]
            tp = _count_tp(sub, float(t))
        denom = n_p + n_g - tp
        per[round(float(t), 4)] = 1.0 if denom == 0 else tp / denom
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def large_pairs(data_dir: str | Path) -> List[Tuple[str, Path, Path]]:
    """(name, image, labels) of ``data_dir``/images and ``data_dir``/labels matched by name; TIFF,
    PNG, NPY files and zarr / OME-Zarr stores (the image's name, or ``<name>_labels``)."""
    from ..data.io import file_stem
    from ..predict.large import expand_inputs

    data_dir = Path(data_dir)
    for sub in ("images", "labels"):
        if not (data_dir / sub).is_dir():
            raise PeftExportError(f"{data_dir}: needs {sub}/ (images/ and labels/, matched by name)")

    def name(p: Path) -> str:
        return p.stem if zarr_named(p) else file_stem(p)

    labels = {name(p): p for p in expand_inputs([data_dir / "labels"])}
    pairs = []
    for img in expand_inputs([data_dir / "images"]):
        lab = labels.get(name(img)) or labels.get(f"{name(img)}_labels")
        if lab is None:
            raise PeftExportError(f"{img}: no labels named {name(img)} in {data_dir / 'labels'}")
        pairs.append((name(img), img, lab))
    return pairs


def evaluate_large(models: Sequence[str], data_dir: str | Path, tile: Optional[int] = None,
                   halo: Optional[int] = None, scale: Optional[float] = None,
                   ais_options: Optional[Dict[str, Any]] = None, backend: str = "onnxruntime",
                   block: int = 2048, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """mSA and SA50 of each export's automatic instance segmentation on large labelled images, run
    tile by tile at full resolution (``SamSession.tiled``: ``tile``/``halo``/``scale``, default the
    export's training scale) and scored block by block against labels read as arrays (zarr,
    memory-mapped TIFF). One row per model: the mean over images, and each image's scores.
    The tiled AIS holds the image's three maps and labels in memory (float32 / int32): for slides
    beyond that, predict to zarr (``peftexport predict --instances --tile``) and score the two
    zarr arrays with ``mean_segmentation_accuracy_large``."""
    from ..predict.arrays import open_image_array
    from ..runtime import SamSession
    from ..runtime.instances import check_ais_params, require_ais_packages
    from .specs import parse_model_specs

    specs = parse_model_specs(list(models))
    for spec in specs:
        if spec.kind != "export":
            raise PeftExportError(f"{spec.text}: large images (--tile/--halo/--scale) are evaluated with export "
                                  "dirs (the tiled runtime); export the model first")
    params = check_ais_params(dict(ais_options or {}))
    require_ais_packages()
    pairs = large_pairs(data_dir)
    arrays = []
    for name, img, lab in pairs:  # every pair checked before any model runs
        image, gt = open_image_array(img), open_image_array(lab)
        if tuple(gt.shape) != tuple(image.shape[:2]):
            raise PeftExportError(f"{lab}: labels {tuple(gt.shape)} and image {tuple(image.shape[:2])} differ")
        arrays.append((name, image, gt))
    rows = []
    for spec in specs:
        session = SamSession(spec.source, backend=backend, precision=spec.precision or "fp32")
        session._ais_graph(spec.adapter)  # refuses an export without an instance decoder, naming it
        per_image = []
        for name, image, gt in arrays:
            tiled = session.tiled(image, tile=tile, halo=halo, scale=scale, adapter=spec.adapter)
            pred, _ = tiled.segment_instances(**params)
            msa, per = mean_segmentation_accuracy_large(pred, gt, block=block)
            per_image.append({"image": name, "msa": msa, "sa50": per[0.5], "objects": int(pred.max()),
                              "tiles": len(tiled.grid), "tile": tiled.spec.tile, "halo": tiled.spec.halo,
                              "scale": tiled.spec.scale})
            if log is not None:
                log(f"{spec.name} {name}: mSA {msa:.3f} ({len(tiled.grid)} tile(s) of {tiled.spec.tile} px)")
        rows.append({"model": spec.name, "msa": float(np.mean([r["msa"] for r in per_image])),
                     "sa50": float(np.mean([r["sa50"] for r in per_image])), "images": per_image})
    table = "\n".join(["| model | images | tile (px) | scale | mSA | SA50 |", "|---|---|---|---|---|---|"] + [
        f"| {r['model']} | {len(r['images'])} | {r['images'][0]['tile']} | {r['images'][0]['scale']:.3g} | "
        f"{r['msa']:.3f} | {r['sa50']:.3f} |" for r in rows])
    return {"data": {"dir": str(data_dir), "n_images": len(pairs)}, "mode": "ais-tiled", "options": params,
            "rows": rows, "table": table}
