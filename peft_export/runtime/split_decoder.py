"""The export's decoder family: ``split_image`` -> ``split_prompts`` -> ``split_masks``.

``split_image`` runs once per image, ``split_prompts`` per batch of prompts (+ the mask input:
IoU predictions, mask weights, final image tokens), ``split_masks`` only for the prompts a
caller keeps. ``SplitDecoder`` is segment-everything's ``PromptDecoder``; ``FamilyDecoder``
serves ``predict``/``predict_batch`` (the image side projected once per image, also with a mask
input). Exports made before the family had none, or a ``split_prompts`` without mask input;
the runtime then uses ``decoder_lowres`` / Meta's ``decoder`` as before.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

SPLIT_GRAPHS = ("split_image", "split_prompts", "split_masks")
SPLIT_CONTEXT = ("image_keys", "layer0_k", "layer0_v", "layer0_q")  # split_image's outputs
CLICK_GRAPH = "click_decoder"  # the browser page's decoder after split_image (``peftexport web``)
MAX_BATCH = 64  # prompts per split_prompts run

RunFn = Callable[[str, Dict[str, np.ndarray]], Dict[str, np.ndarray]]


def takes_mask_input(entry: Optional[Dict[str, Any]]) -> bool:
    """Whether a manifest's ``split_prompts`` entry (all precisions) lists the ``mask_input`` input."""
    fp32 = (entry or {}).get("fp32") or {}
    return any(i.get("name") == "mask_input" for i in fp32.get("inputs") or [])


def _no_mask(context: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """mask_input/has_mask_input feeds for "no mask" (one row, broadcast over every prompt)."""
    s = 4 * int(round(np.sqrt(context["image_keys"].shape[1])))
    return {"mask_input": np.zeros((1, 1, s, s), np.float32), "has_mask_input": np.zeros((1,), np.float32)}


class SplitDecoder:
    """Prompts without mask input on one image embedding (1,256,g,g), through the split graphs.

    ``split_prompts`` runs on at most ``max_batch`` prompts at a time: its (B, N, 256) tensors
    are memory-bound, and smaller batches stay in cache (results do not depend on it).
    """

    def __init__(self, run: RunFn, embedding: np.ndarray, max_batch: int = MAX_BATCH, mask_input: bool = False,
                 context: Optional[Dict[str, np.ndarray]] = None) -> None:
        """``mask_input``: the export's split_prompts takes it (fed "no mask"); ``context``:
        split_image's outputs for ``embedding``, when the caller has them already."""
        self._run = run
        if context is None:
            context = run("split_image", {"image_embeddings": np.asarray(embedding, np.float32)})
        self._context = {**context, **_no_mask(context)} if mask_input else dict(context)
        self.max_batch = max(1, int(max_batch))

    def prompts(self, coords: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, Any]:
        """(B,M,2) points in the resized frame, (B,M) labels (Meta's layout) -> IoU (B,4), state."""
        b = len(coords)
        coords = np.concatenate([coords, np.zeros((b, 1, 2))], axis=1).astype(np.float32)
        labels = np.concatenate([labels, -np.ones((b, 1))], axis=1).astype(np.float32)  # + padding point
        outs = []
        for i in range(0, b, self.max_batch):
            sl = slice(i, i + self.max_batch)
            outs.append(self._run("split_prompts", {**self._context, "point_coords": coords[sl],
                                                    "point_labels": labels[sl]}))
        if len(outs) == 1:
            out = outs[0]
        else:
            out = {k: np.concatenate([o[k] for o in outs]) for k in ("iou_predictions", "mask_weights", "keys")}
        return out["iou_predictions"], (out["mask_weights"], out["keys"])

    def masks(self, state: Any, index: np.ndarray) -> np.ndarray:
        weights, keys = state
        return self._run("split_masks", {"keys": keys[index], "mask_weights": weights[index]})["low_res_masks"]


class FamilyDecoder:
    """``decoder_lowres``'s function through the family: (K,M,2) coords, (K,M) labels (Meta's layout,
    padding included), mask input (1 or K,1,4g,4g) and has (1 or K,) -> low-res logits (K,4,4g,4g),
    IoU (K,4). ``split_image`` runs once per embedding (the last one's context is kept)."""

    def __init__(self, run: RunFn, keys: Tuple[str, str, str], max_batch: int = MAX_BATCH) -> None:
        self._run, self._keys, self.max_batch = run, keys, max(1, int(max_batch))
        self._last: Tuple[Any, Dict[str, np.ndarray]] = (None, {})  # one tuple: swapped atomically

    def context(self, embedding: np.ndarray) -> Dict[str, np.ndarray]:
        last, context = self._last
        if last is not embedding:
            context = self._run(self._keys[0], {"image_embeddings": np.asarray(embedding, np.float32)})
            self._last = (embedding, context)
        return context

    def decode(self, embedding: np.ndarray, coords: np.ndarray, labels: np.ndarray, mask: np.ndarray,
               has_mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        context = self.context(embedding)
        if not np.any(has_mask):
            mask, has_mask = mask[:1], has_mask[:1]  # one "no mask" row serves every prompt
        lows, ious = [], []
        for i in range(0, len(coords), self.max_batch):
            sl = slice(i, i + self.max_batch)
            m, h = (mask, has_mask) if len(mask) == 1 else (mask[sl], has_mask[sl])
            out = self._run(self._keys[1], {**context, "point_coords": np.asarray(coords[sl], np.float32),
                                            "point_labels": np.asarray(labels[sl], np.float32),
                                            "mask_input": np.asarray(m, np.float32),
                                            "has_mask_input": np.asarray(h, np.float32)})
            lows.append(self._run(self._keys[2], {"keys": out["keys"], "mask_weights": out["mask_weights"]})
                        ["low_res_masks"])
            ious.append(out["iou_predictions"])
        return (np.asarray(np.concatenate(lows), np.float32), np.asarray(np.concatenate(ious), np.float32))
