"""Which of SAM 2's four mask tokens a prediction returns (``sam2.modeling.sam.mask_decoder.MaskDecoder``
after ``predict_masks``), in numpy, for the image session and the video propagation alike.

The decoder graph returns all four tokens (0: the single-mask token, 1-3: the multimask ones).
``multimask``: tokens 1-3. Otherwise token 0, unless sam2's dynamic fallback is on (``build_sam2``'s
default) and token 0's mask is unstable (the IoU of its logits cut at +delta and -delta is below the
threshold): then the multimask token with the highest predicted IoU. The object pointer token is
token 0, or with ``multimask`` and ``use_multimask_token_for_obj_ptr`` tokens 1-3.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def stability_scores(logits: np.ndarray, delta: float) -> np.ndarray:
    """(K, L, L) logits -> (K,) IoU of the masks cut at +delta and -delta (1 where both are empty)."""
    flat = np.asarray(logits, np.float32).reshape(len(logits), -1)
    inter = (flat > np.float32(delta)).sum(axis=1).astype(np.float32)
    union = (flat > np.float32(-delta)).sum(axis=1).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), np.float32(1.0))


def select_masks(low: np.ndarray, iou: np.ndarray, multimask: bool, selection: Optional[dict] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """(K, 4, L, L) logits, (K, 4) IoU -> (K, C, L, L), (K, C) as sam2's decoder returns them
    (C = 3 with ``multimask``, else 1). ``selection``: the manifest's ``decoder_selection``
    (``stability_delta``, ``stability_thresh``) or None for no fallback."""
    low, iou = np.asarray(low, np.float32), np.asarray(iou, np.float32)
    if multimask:
        return low[:, 1:], iou[:, 1:]
    if not selection:
        return low[:, :1], iou[:, :1]
    k = np.arange(len(low))
    best = 1 + np.argmax(iou[:, 1:], axis=1)
    stable = stability_scores(low[:, 0], selection["stability_delta"]) >= np.float32(selection["stability_thresh"])
    pick = np.where(stable, 0, best)
    return low[k, pick][:, None], iou[k, pick][:, None]
