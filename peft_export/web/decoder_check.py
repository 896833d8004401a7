"""The page's mask choice, and the check that an int8 decoder shows the masks fp32 shows.

The page follows Meta's ONNX decoder (``SamOnnxModel.select_masks``): with at most two
decoder points (one click plus its padding point, or a box alone) the prompt is ambiguous
and the page shows the best of the three multimask outputs by predicted IoU; with more it
shows the single-mask output (token 0). ``SamSession.predict`` gives the same masks with
``multimask_output=True`` (then argmax of the scores) or ``False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..evaluation.metrics import iou
from ..runtime import ImageEmbedding, postprocess_masks
from ..runtime.backends.ort import OrtBackend
from ..runtime.prompts import encode_prompts

INT8_MIN_IOU = 0.99


def shown_mask_index(scores: np.ndarray, n_decoder_points: int) -> int:
    """Which of the decoder's 4 masks (predicted IoU ``scores``) the page shows (module docstring)."""
    scores = np.asarray(scores).reshape(-1)
    return 1 + int(np.argmax(scores[1:])) if n_decoder_points <= 2 else 0


def probe_prompts(height: int, width: int) -> list[dict]:
    """A 4x4 grid of single clicks, a centred box alone, and that box with a click."""
    prompts = [{"points": [[(i + 0.5) * width / 4, (j + 0.5) * height / 4]], "labels": [1]}
               for j in range(4) for i in range(4)]
    box = [width * 0.25, height * 0.25, width * 0.75, height * 0.75]
    prompts.append({"box": box})
    prompts.append({"points": [[width * 0.5, height * 0.5]], "labels": [1], "box": box})
    return prompts


def decode_shown(
    backend: OrtBackend,
    graph: str,
    emb: ImageEmbedding,
    image_size: int,
    points: Optional[np.ndarray] = None,
    labels: Optional[np.ndarray] = None,
    box: Optional[np.ndarray] = None,
    mask_input: Optional[np.ndarray] = None,
    context: Optional[Dict[str, np.ndarray]] = None,
) -> Tuple[np.ndarray, np.ndarray, int]:
    """What the page shows for one prompt on ``graph`` of ``backend``: (mask HxW bool, its low-res
    logits, index of the decoder output). ``points`` (N,2) pixels, ``box`` (4,), ``mask_input`` (s,s).
    A click decoder graph takes ``context`` (``image_context``: the backend's ``split_image`` on this
    embedding), computed here when not given."""
    s = 4 * (image_size // 16)
    pts = None if points is None else np.asarray(points, np.float64)[None]
    lbl = None if labels is None else np.asarray(labels, np.float32)[None]
    bxs = None if box is None else np.asarray(box, np.float64).reshape(1, 4)
    coords, dec_labels = encode_prompts(pts, lbl, bxs, emb.original_size, image_size)
    feeds = {
        "image_embeddings": emb.embedding, "point_coords": coords, "point_labels": dec_labels,
        "mask_input": np.zeros((1, 1, s, s), np.float32) if mask_input is None else mask_input.reshape(1, 1, s, s),
        "has_mask_input": np.asarray([0.0 if mask_input is None else 1.0], np.float32),
        "orig_im_size": np.asarray(emb.original_size, np.float32),
    }
    names = {i.name for i in backend.sessions[graph].get_inputs()}
    if "image_keys" in names:  # the click decoder: split_image's context, then the mask it shows
        feeds.update(context if context is not None else image_context(backend, emb))
        out = backend.run(graph, {k: v for k, v in feeds.items() if k in names})
        k, low = int(out["mask_index"][0]), np.asarray(out["low_res_masks"][0, 0], np.float32)
    else:
        out = backend.run(graph, {k: v for k, v in feeds.items() if k in names})
        k = shown_mask_index(out["iou_predictions"][0], coords.shape[1])
        low = np.asarray(out["low_res_masks"][0, k], np.float32)
    return postprocess_masks(low, emb.input_size, emb.original_size, image_size) > 0, low, k


def image_context(backend: OrtBackend, emb: ImageEmbedding) -> Dict[str, np.ndarray]:
    """The click decoder's per-image inputs: the backend's ``split_image`` on the embedding."""
    return backend.run("split_image", {"image_embeddings": emb.embedding})


def compare_decoders(
    reference: Path, candidate: Path, flavour: str, embeddings: Sequence[ImageEmbedding], image_size: int,
    context_graph: Optional[Path] = None,
) -> Dict[str, Any]:
    """Shown masks of two decoder graphs on ``probe_prompts`` of every image: mean and min IoU.
    Click decoders need ``context_graph`` (the export's split_image)."""
    graphs = {"reference": Path(reference), "candidate": Path(candidate)}
    if context_graph is not None:
        graphs["split_image"] = Path(context_graph)
    backend = OrtBackend(graphs, "cpu", None)
    ious = []
    for emb in embeddings:
        h, w = emb.original_size
        context = image_context(backend, emb) if context_graph is not None else None  # once per image
        for prompt in probe_prompts(h, w):
            args = dict(points=prompt.get("points"), labels=prompt.get("labels"), box=prompt.get("box"),
                        context=context)
            masks = [decode_shown(backend, graph, emb, image_size, **args)[0] for graph in ("reference", "candidate")]
            ious.append(iou(*masks))
    return {"mean_iou": float(np.mean(ious)), "min_iou": float(np.min(ious)), "prompts": len(ious),
            "graph": flavour, "threshold_mean_iou": INT8_MIN_IOU}
