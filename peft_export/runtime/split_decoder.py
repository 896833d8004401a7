"""The export's split decoder graphs as a ``PromptDecoder`` for segment-everything.

``split_image`` runs once per image, ``split_prompts`` per batch of prompts (IoU predictions,
mask weights, final image tokens), ``split_masks`` only for the prompts a caller keeps.
Exports made before these graphs existed have none; the runtime then uses ``decoder_lowres``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from ..errors import PeftExportError

SPLIT_GRAPHS = ("split_image", "split_prompts", "split_masks")
SPLIT_CONTEXT = ("image_keys", "layer0_k", "layer0_v", "layer0_q")  # split_image's outputs
CLICK_GRAPH = "click_decoder"  # the browser page's decoder after split_image (``peftexport web``)
MAX_BATCH = 64  # prompts per split_prompts run

RunFn = Callable[[str, Dict[str, np.ndarray]], Dict[str, np.ndarray]]


def split_graph_files(manifest: Dict[str, Any], export_dir: Path) -> Optional[Dict[str, Path]]:
    """{graph: file} of the fp32 split decoder when the export has all three graphs, else None."""
    graphs = manifest.get("graphs") or {}
    if not all("fp32" in (graphs.get(name) or {}) for name in SPLIT_GRAPHS):
        return None
    files = {}
    for name in SPLIT_GRAPHS:
        path = Path(export_dir) / graphs[name]["fp32"]["path"]
        if not path.is_file():
            raise PeftExportError(f"{path}: {name} graph listed in manifest.json is missing")
        files[name] = path
    return files


class SplitDecoder:
    """Prompts without mask input on one image embedding (1,256,g,g), through the split graphs.

    ``split_prompts`` runs on at most ``max_batch`` prompts at a time: its (B, N, 256) tensors
    are memory-bound, and smaller batches stay in cache (results do not depend on it).
    """

    def __init__(self, run: RunFn, embedding: np.ndarray, max_batch: int = MAX_BATCH) -> None:
        self._run = run
        self._context = run("split_image", {"image_embeddings": np.asarray(embedding, np.float32)})
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
