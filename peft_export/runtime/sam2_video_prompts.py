"""Prompts for SAM 2 propagation and the pixel operations ``SAM2VideoPredictor`` applies to them.

A prompt is given per object and frame: points (xy in the frame's pixels) with labels (1 foreground,
0 background), a box (x0, y0, x1, y1), or a mask (the frame's size, or any size: it is resized).
``add_new_points_or_box`` puts a box first as two points labelled 2 and 3, normalises by the frame size
and scales to the model's SxS input; ``add_new_mask`` resizes a mask to SxS with antialiased bilinear
interpolation and thresholds at 0.5. ``resize_antialias`` is ``F.interpolate(..., mode="bilinear",
antialias=True)`` (PyTorch's separable triangle filter, support scaled by the downscale factor);
``fill_holes`` is sam2's ``fill_holes_in_mask_scores`` (background components of at most ``max_area``
pixels, 8-connected, become 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ..errors import PeftExportError
from .regions import label_components


@dataclass
class FramePrompt:
    """One object's prompt on one frame: points + labels and/or a box, or a mask."""

    points: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    mask: Optional[np.ndarray] = None


Prompts = Mapping[Any, Mapping[int, Any]]  # object id -> frame index -> FramePrompt or dict


def as_frame_prompt(value: Any, where: str) -> FramePrompt:
    if isinstance(value, FramePrompt):
        prompt = value
    elif isinstance(value, Mapping):
        unknown = set(value) - {"points", "labels", "box", "mask"}
        if unknown:
            raise PeftExportError(f"{where}: unknown prompt keys {sorted(unknown)} (use points, labels, box, mask)")
        prompt = FramePrompt(**value)
    else:
        raise PeftExportError(f"{where}: a prompt is a FramePrompt or a dict with points/labels/box/mask")
    has_points = prompt.points is not None
    if has_points != (prompt.labels is not None):
        raise PeftExportError(f"{where}: points and labels go together")
    if prompt.mask is not None and (has_points or prompt.box is not None):
        raise PeftExportError(f"{where}: a mask prompt cannot be combined with points or a box")
    if prompt.mask is None and not has_points and prompt.box is None:
        raise PeftExportError(f"{where}: empty prompt (give points + labels, a box or a mask)")
    if has_points:
        pts = np.asarray(prompt.points, dtype=np.float64).reshape(-1, 2)
        lab = np.asarray(prompt.labels).reshape(-1)
        if len(pts) != len(lab) or len(pts) == 0:
            raise PeftExportError(f"{where}: {len(pts)} points but {len(lab)} labels")
        if not np.isin(lab, (0, 1)).all():
            raise PeftExportError(f"{where}: point labels must be 1 (foreground) or 0 (background)")
        prompt = FramePrompt(pts, lab.astype(np.int64), prompt.box, None)
    if prompt.box is not None:
        box = np.asarray(prompt.box, dtype=np.float64).reshape(-1)
        if box.size != 4 or not np.isfinite(box).all():
            raise PeftExportError(f"{where}: a box is 4 numbers x0, y0, x1, y1")
        prompt = FramePrompt(prompt.points, prompt.labels, box, None)
    if prompt.mask is not None:
        mask = np.asarray(prompt.mask)
        if mask.ndim != 2 or min(mask.shape) < 1:
            raise PeftExportError(f"{where}: a mask prompt is a 2D array, got shape {mask.shape}")
        prompt = FramePrompt(mask=mask.astype(bool))
    return prompt


def check_prompts(prompts: Prompts, num_frames: int) -> Dict[Any, Dict[int, FramePrompt]]:
    """{object: {frame: FramePrompt}} with frames in range; every object has at least one prompt."""
    if not isinstance(prompts, Mapping) or not prompts:
        raise PeftExportError("propagate: no prompts (give {object id: {frame index: prompt}})")
    out: Dict[Any, Dict[int, FramePrompt]] = {}
    for obj, frames in prompts.items():
        if not isinstance(frames, Mapping) or not frames:
            raise PeftExportError(f"propagate: object {obj!r} has no prompted frame")
        out[obj] = {}
        for frame, value in frames.items():
            if not isinstance(frame, (int, np.integer)) or not 0 <= int(frame) < num_frames:
                raise PeftExportError(f"propagate: object {obj!r}: frame {frame!r} is not in 0..{num_frames - 1}")
            out[obj][int(frame)] = as_frame_prompt(value, f"propagate: object {obj!r}, frame {frame}")
    return out


def point_inputs(prompt: FramePrompt, frame_hw: Tuple[int, int], image_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(coords (1,N,2) float32 in SxS pixels, labels (1,N) float32) as add_new_points_or_box builds them."""
    coords, labels = [], []
    if prompt.box is not None:
        coords.append(prompt.box.reshape(2, 2))
        labels.append(np.array([2, 3]))
    if prompt.points is not None:
        coords.append(prompt.points)
        labels.append(prompt.labels)
    pts = np.concatenate(coords).astype(np.float32)
    h, w = frame_hw
    # torch: points / tensor([W, H]) (float32), then * image_size
    pts = pts / np.array([w, h], dtype=np.float32) * np.float32(image_size)
    return pts[None].astype(np.float32), np.concatenate(labels).astype(np.float32)[None]


def with_padding_point(coords: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The prompt encoder's padding point (0, 0, label -1), appended as ``_embed_points(pad=True)`` does."""
    return (np.concatenate([coords, np.zeros((1, 1, 2), np.float32)], axis=1),
            np.concatenate([labels, -np.ones((1, 1), np.float32)], axis=1))


def _aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of PyTorch's antialiased bilinear resize along one axis (align_corners=False)."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) * invscale))
        total = w.sum()
        weights[i, lo:hi] = w / total if total != 0 else w
    return weights


def resize_antialias(x: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)`` on (H, W)."""
    x = np.asarray(x, dtype=np.float64)
    rows = _aa_weights(x.shape[0], int(size_hw[0]))
    cols = _aa_weights(x.shape[1], int(size_hw[1]))
    return (rows @ x @ cols.T).astype(np.float32)


def mask_input(mask: np.ndarray, image_size: int) -> np.ndarray:
    """add_new_mask: the mask at SxS, 0/1 float32 (resized masks thresholded at 0.5)."""
    if mask.shape == (image_size, image_size):
        return mask.astype(np.float32)
    return (resize_antialias(mask.astype(np.float32), (image_size, image_size)) >= 0.5).astype(np.float32)


def fill_holes(low_res: np.ndarray, max_area: int) -> np.ndarray:
    """sam2's fill_holes_in_mask_scores on one (h, w) logit map."""
    if max_area <= 0:
        return low_res
    labels, sizes = label_components(low_res <= 0)
    if not len(sizes):
        return low_res
    small = np.concatenate([[False], sizes <= max_area])
    return np.where(small[labels], np.float32(0.1), low_res).astype(np.float32)
