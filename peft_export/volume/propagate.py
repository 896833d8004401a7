"""One object through a volume from one or a few annotated slices (micro-sam's
``multi_dimensional_segmentation.segment_mask_in_volume``, on the runtime's embeddings).

The mask of slice z becomes the prompts of slice z +- 1 (``mask_prompts``: box, mask, points,
points_and_mask or single_point). Below the lowest and above the highest annotated slice the object
is carried outwards until the new mask's IoU with the previous one falls under ``iou_threshold``
(that slice is not kept) or the volume ends. Between two annotated slices: adjacent, nothing; one
slice between, it is segmented from the OR of both masks; more, it is filled from both ends
towards the middle, and an even gap's middle slice from the OR of its two neighbours (no IoU test
inside, since both ends are known). ``stop_lower`` / ``stop_upper``: the lowest / highest
annotated slice is where the object ends.

Planes larger than the model input are tiled (``VolumeEmbeddings``): a mask goes to the tile whose
inner area holds its centre, and is segmented in that tile's window.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from ..errors import PeftExportError
from .embeddings import Cancel, Progress, VolumeEmbeddings, cancelled
from .mask_prompts import mask_prompts, projection_prompts
from .sam2_propagate import resolve_method, segment_object_with_sam2

PROPAGATION_DEFAULTS = {"projection": "single_point", "iou_threshold": 0.5, "box_extension": 0.05}


def check_propagation(projection: str = "single_point", iou_threshold: float = 0.5, box_extension: float = 0.0
                      ) -> None:
    projection_prompts(projection)
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise PeftExportError(f"iou_threshold: must be in [0, 1], got {iou_threshold}")
    if float(box_extension) < 0:
        raise PeftExportError(f"box_extension: must be >= 0, got {box_extension}")


def check_sam2_options(projection: str, iou_threshold: float, box_extension: float) -> None:
    """The prompts method's options left at their defaults: SAM 2 neither projects masks into prompts
    nor stops at an IoU."""
    given = {"projection": projection, "iou_threshold": iou_threshold, "box_extension": box_extension}
    changed = [k for k, v in given.items() if v != PROPAGATION_DEFAULTS[k]]
    if changed:
        raise PeftExportError(f"{', '.join('--' + k.replace('_', '-') for k in changed)}: an option of "
                              "--propagation prompts; SAM 2 carries the object with its memory")


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two masks, 0 when both are empty (micro-sam's ``compute_iou``)."""
    a, b = np.asarray(a) == 1, np.asarray(b) == 1
    return float(np.logical_and(a, b).sum()) / (float(np.logical_or(a, b).sum()) + 1e-7)


def segment_from_mask(volume: VolumeEmbeddings, z: int, mask: np.ndarray, projection: str = "single_point",
                      box_extension: float = 0.0) -> Tuple[np.ndarray, float]:
    """Plane ``z`` segmented from prompts derived from ``mask`` (H x W): (mask uint8, predicted IoU).
    An empty mask gives an empty mask (micro-sam would decode a mask prompt alone; nothing is
    left to carry there)."""
    session = volume.session
    h, w = volume.plane_shape
    full = np.zeros((h, w), np.uint8)
    if not np.any(mask):
        return full, 0.0
    tile_index, (y0, y1, x0, x1) = 0, (0, h, 0, w)
    if not volume.grid.single:
        ys, xs = np.nonzero(mask)
        tile = volume.grid.tile_at(float(np.round(xs.mean())), float(np.round(ys.mean())))
        tile_index, (y0, y1, x0, x1) = volume.grid.tiles.index(tile), tile.outer
    crop = np.asarray(mask[y0:y1, x0:x1])
    if not crop.any():
        return full, 0.0
    points, labels, box, logits = mask_prompts(crop, projection, box_extension, session.low_res_size)
    masks, iou, _ = session.predict(point_coords=points, point_labels=labels, box=box, mask_input=logits,
                                    multimask_output=False, embedding=volume.embedding(z, tile_index))
    full[y0:y1, x0:x1] = masks[0]
    return full, float(iou[0])


def _annotations(masks: Union[np.ndarray, Mapping[int, np.ndarray]], n: int, shape: Tuple[int, int]
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """(segmentation Z x H x W uint8, sorted annotated slices) from a stack or {z: mask}."""
    seg = np.zeros((n, *shape), np.uint8)
    if isinstance(masks, Mapping):
        for z, m in masks.items():
            z = int(z)
            if not 0 <= z < n:
                raise PeftExportError(f"annotation on plane {z}: outside the volume (0..{n - 1})")
            m = np.asarray(m)
            if m.shape != shape:
                raise PeftExportError(f"annotation on plane {z}: shape {m.shape}, the planes are {shape}")
            seg[z] = m != 0
    else:
        arr = np.asarray(masks)
        if arr.shape != (n, *shape):
            raise PeftExportError(f"annotations: shape {arr.shape}, the volume is {(n, *shape)}")
        seg[:] = arr != 0
    slices = np.flatnonzero(seg.reshape(n, -1).any(axis=1))
    if len(slices) == 0:
        raise PeftExportError("annotations: no annotated slice (every mask is empty)")
    return seg, slices


def segment_object_in_volume(
    volume: VolumeEmbeddings,
    masks: Union[np.ndarray, Mapping[int, np.ndarray]],
    projection: str = PROPAGATION_DEFAULTS["projection"],
    iou_threshold: float = PROPAGATION_DEFAULTS["iou_threshold"],
    box_extension: float = PROPAGATION_DEFAULTS["box_extension"],
    stop_lower: bool = False,
    stop_upper: bool = False,
    progress: Progress = None,
    cancel: Cancel = None,
    method: str = "auto",
) -> Tuple[np.ndarray, Tuple[int, int]]:
    """One object through the volume: (Z x H x W uint8 mask, (first, last) plane of the object).

    ``masks``: the object on its annotated slices, as {plane: H x W mask} or a Z x H x W array
    (its non-empty planes are the annotated ones). ``projection``: box, mask, points,
    points_and_mask or single_point (micro-sam's annotator default). ``progress(done, total)``
    after each plane; ``cancel`` (an Event or a callable) stops between planes and returns what is
    segmented so far. ``method``: "prompts" (this module's, on the plane embeddings), "sam2" (SAM 2's
    memory, ``sam2_propagate``: the volume's session is a ``Sam2Session`` with memory graphs; the
    projection, IoU threshold and box extension do not apply), "auto" (the one the export offers).
    """
    check_propagation(projection, iou_threshold, box_extension)
    if resolve_method(volume.session, method) == "sam2":
        check_sam2_options(projection, iou_threshold, box_extension)
        return segment_object_with_sam2(volume.session, volume.stack, masks, volume.intensity, stop_lower, stop_upper,
                                        progress=progress, cancel=cancel)
    n = volume.stack.n_planes
    seg, slices = _annotations(masks, n, volume.plane_shape)
    total = n - len(slices)
    state = {"done": 0, "stopped": False}

    def tick() -> None:
        state["done"] += 1
        if progress is not None:
            progress(min(state["done"], total), total)

    def segment(z: int, prompt: np.ndarray) -> np.ndarray:
        return segment_from_mask(volume, z, prompt, projection, box_extension)[0]

    # A slice between two annotated ones is segmented from the OR of its neighbours; micro-sam
    # derives every point there, also in single_point mode, and so does this.
    joined = "points" if projection == "single_point" else projection

    def segment_joined(z: int, prompt: np.ndarray) -> np.ndarray:
        return segment_from_mask(volume, z, prompt, joined, box_extension)[0]

    def carry(z_start: int, z_stop: int, step: int, stop: Callable[[int, int], bool],
              threshold: Optional[float] = None) -> int:
        z = z_start + step
        while True:
            if cancelled(cancel):
                state["stopped"] = True
                return z - step
            prev = seg[z - step]
            new = segment(z, prev)
            if threshold is not None and mask_iou(prev, new) < threshold:
                break
            seg[z] = new
            tick()
            z += step
            if stop(z, z_stop):
                break
        return z - step

    z0, z1 = int(slices[0]), int(slices[-1])
    z_min = carry(z0, 0, -1, np.less, iou_threshold) if z0 > 0 and not stop_lower else z0
    z_max = carry(z1, n - 1, 1, np.greater, iou_threshold) if z1 < n - 1 and not stop_upper else z1
    for a, b in zip(slices[:-1].tolist(), slices[1:].tolist()):
        if state["stopped"] or cancelled(cancel):
            break
        gap, mid = b - a, (a + b) // 2
        if gap == 1:
            continue
        if a == z0 and stop_lower:
            carry(b, a, -1, np.less_equal)
        elif b == z1 and stop_upper:
            carry(a, b, 1, np.greater_equal)
        elif gap == 2:
            seg[a + 1] = segment_joined(a + 1, (seg[a] == 1) | (seg[b] == 1))
            tick()
        else:
            carry(a, mid, 1, np.greater_equal if gap % 2 == 0 else np.greater)
            carry(b, mid, -1, np.less_equal)
            if gap % 2 == 0 and not cancelled(cancel):
                seg[mid] = segment_joined(mid, (seg[mid - 1] == 1) | (seg[mid + 1] == 1))
                tick()
    return seg, (int(z_min), int(z_max))


def masks_from_prompts(volume: VolumeEmbeddings, prompts: Dict[int, Dict[str, Any]]) -> Dict[int, np.ndarray]:
    """The object on each annotated plane from its prompts: {plane: {"points": (N, 2) xy, "labels":
    (N,), "box": XYXY}} -> {plane: H x W mask} (the best of three masks for one positive point, as
    micro-sam's ``segment_from_points`` chooses; one mask otherwise)."""
    out = {}
    for z, p in sorted(prompts.items()):
        z = volume._check_plane(z)
        points, labels, box = p.get("points"), p.get("labels"), p.get("box")
        if points is not None and labels is None:
            labels = np.ones(len(points))
        single = points is not None and box is None and len(points) == 1 and int(np.asarray(labels)[0]) == 1
        tiles = volume.plane(z)
        masks, iou, _, (y0, y1, x0, x1) = tiles.predict_window(point_coords=points, point_labels=labels, box=box,
                                                                multimask_output=single)
        full = np.zeros(volume.plane_shape, np.uint8)
        full[y0:y1, x0:x1] = masks[int(np.argmax(iou))] if single else masks[0]
        out[z] = full
    return out
