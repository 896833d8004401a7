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
    """Prompts without mask input on one image embedding (1,256,g,g), through the split graphs."""

    def __init__(self, run: RunFn, embedding: np.ndarray) -> None:
        self._run = run
        self._context = run("split_image", {"image_embeddings": np.asarray(embedding, np.float32)})

    def prompts(self, coords: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, Any]:
        """(B,M,2) points in the resized frame, (B,M) labels (Meta's layout) -> IoU (B,4), state."""
        b = len(coords)
        pad_c = np.zeros((b, 1, 2), np.float32)
        pad_l = -np.ones((b, 1), np.float32)
        out = self._run("split_prompts", {
            **self._context,
            "point_coords": np.concatenate([coords, pad_c], axis=1).astype(np.float32),
            "point_labels": np.concatenate([labels, pad_l], axis=1).astype(np.float32),
        })
        return out["iou_predictions"], (out["mask_weights"], out["keys"])

    def masks(self, state: Any, index: np.ndarray) -> np.ndarray:
        weights, keys = state
        return self._run("split_masks", {"keys": keys[index], "mask_weights": weights[index]})["low_res_masks"]
