"""The image side of a SAM 2 export as the video path needs it: encoder features and the raw decoder.

Interface agreed in /work/notes/sam2_interface.md (names and shapes). This module stands in for the
image export (export/sam2_image*.py) so the video path can be built and tested on its own; the runtime
reads the same graph names whichever module wrote them.

- ``Sam2EncoderGraph``: ``image`` (1,3,S,S) normalised -> ``high_res_feats_0`` (1,C/8,4g,4g),
  ``high_res_feats_1`` (1,C/4,2g,2g) (after the decoder's conv_s0 / conv_s1, as ``forward_image``),
  ``image_embeddings`` (1,C,g,g) (the lowest FPN level, WITHOUT ``no_mem_embed``).
- ``Sam2DecoderGraph``: prompt encoder + mask decoder for one prompt set, all four tokens unselected:
  ``low_res_masks`` (1,4,4g,4g), ``iou_predictions`` (1,4), ``sam_output_tokens`` (1,4,C),
  ``object_score_logits`` (1,1). Points are in SxS pixels, boxes as points labelled 2 / 3, and the runtime
  appends SAM 2's padding point (0, 0, label -1) itself (``_embed_points(..., pad=True)``).
"""

from __future__ import annotations

import torch
from torch import nn


class Sam2EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not model.use_high_res_features_in_sam:
            from ..errors import PeftExportError

            raise PeftExportError("SAM 2 export: models without use_high_res_features_in_sam are not supported")
        self.image_encoder = model.image_encoder
        self.conv_s0 = model.sam_mask_decoder.conv_s0
        self.conv_s1 = model.sam_mask_decoder.conv_s1

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.image_encoder(image)["backbone_fpn"]
        return self.conv_s0(fpn[0]), self.conv_s1(fpn[1]), fpn[2]


class Sam2DecoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder

    def forward(self, image_embeddings: torch.Tensor, high_res_feats_0: torch.Tensor, high_res_feats_1: torch.Tensor,
                point_coords: torch.Tensor, point_labels: torch.Tensor, mask_input: torch.Tensor,
                has_mask_input: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pe = self.prompt_encoder
        sparse = pe._embed_points(point_coords, point_labels, pad=False)
        has = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has * pe._embed_masks(mask_input) + (1 - has) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        masks, iou, tokens, scores = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            repeat_image=False,
            high_res_features=[high_res_feats_0, high_res_feats_1],
        )
        return masks, iou, tokens, scores
