"""The gate of a reduced-precision encoder: its masks against the fp32 model's, prompt by prompt.

One aggregate IoU hides a prompt whose mask falls apart. So an int8 encoder is judged on
``GATES["int8"]["prompts"]`` seeded prompts on the probe image (half single positive points,
half boxes, spread over the image): for each prompt the torch mask decoder makes its 4 masks
from the fp32 embedding and from the int8 one, and the IoU of the two (low-res logits > 0)
is taken. The mean and the minimum over prompts must reach the gate. The fp32 side is the
unmerged torch model, which the fp32 export matches to 1e-4 (its own check), so this is the
agreement with the fp32 export up to that.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling import Sam

GATES: dict[str, dict[str, float]] = {
    "int8": {"prompts": 32, "mask_iou_mean": 0.99, "mask_iou_min": 0.97},
    "bf16": {"prompts": 32, "mask_iou_mean": 0.99, "mask_iou_min": 0.97},  # the fp32 graph in OpenVINO's bf16 mode
}


def gate_prompts(image_size: int, n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Meta-layout prompts (coords (n,2,2), labels (n,2)) in the S frame: points, then boxes."""
    g = torch.Generator().manual_seed(seed + 7)
    s = float(image_size)
    n_points = n // 2
    points = torch.rand(n_points, 2, generator=g) * 0.9 * s + 0.05 * s
    coords_p = torch.stack([points, torch.zeros_like(points)], dim=1)  # + the padding point
    labels_p = torch.tensor([[1.0, -1.0]]).expand(n_points, 2)
    n_boxes = n - n_points
    xy = torch.rand(n_boxes, 2, generator=g) * 0.6 * s
    wh = torch.rand(n_boxes, 2, generator=g) * 0.3 * s + 0.08 * s
    coords_b = torch.stack([xy, (xy + wh).clamp(max=s - 1)], dim=1)
    labels_b = torch.tensor([[2.0, 3.0]]).expand(n_boxes, 2)
    return torch.cat([coords_p, coords_b]), torch.cat([labels_p, labels_b])


def meta_sparse(sam: Sam, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sparse embeddings of Meta-layout points (box corners as labels 2/3, -1 padding)."""
    pe = sam.prompt_encoder
    emb = pe.pe_layer.forward_with_coords(coords + 0.5, pe.input_image_size)
    emb[labels == -1] = 0.0
    emb[labels == -1] += pe.not_a_point_embed.weight
    for i in range(pe.num_point_embeddings):
        emb[labels == i] += pe.point_embeddings[i].weight
    return emb


@torch.no_grad()
def _masks(sam: Sam, embedding: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    sparse = meta_sparse(sam, coords, labels)
    _, dense = sam.prompt_encoder(points=None, boxes=None, masks=None)
    low, _ = sam.mask_decoder.predict_masks(
        image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense.expand(len(coords), -1, -1, -1),
    )
    return low > 0


def mask_agreement(sam: Sam, reference: torch.Tensor, candidate: np.ndarray | torch.Tensor,
                   n_prompts: int = 32, seed: int = 0) -> dict:
    """Per-prompt IoU of the masks decoded from ``candidate`` vs from ``reference`` embeddings."""
    cand = torch.as_tensor(np.nan_to_num(np.asarray(candidate, np.float32)))
    coords, labels = gate_prompts(sam.image_encoder.img_size, n_prompts, seed)
    a, b = _masks(sam, reference.float(), coords, labels), _masks(sam, cand, coords, labels)
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return {"prompts": int(n_prompts), "mask_iou_mean": float(iou.mean()), "mask_iou_min": float(iou.min()),
            "worst_prompt": int(iou.argmin()), "per_prompt": [round(float(x), 5) for x in iou]}
