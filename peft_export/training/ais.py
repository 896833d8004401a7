"""Training micro-sam's instance decoder (AIS) together with the adapter: the loop's ``--instance-decoder`` hooks.

Each step the decoder runs on the same image embedding as SAM's mask decoder (the encoder
runs once), its maps are cropped and resized to the label patch as torch-em's UNETR does,
and ``instance_loss.distance_loss`` against ``instance_targets.distance_targets`` of the
patch backpropagates into the decoder and, through the embedding, into the adapter.
micro-sam alternates two optimizer steps per batch (prompted loss, then this one, each with
its own encoder pass); here both losses share one encoder pass and one optimizer step, and
gradient clipping applies to SAM's tensors and the decoder's separately, so neither scales
the other's step. Validation adds AIS mSA / SA50 (runtime post-processing, micro-sam's
defaults) to the prompted Dice, and the adapter is selected by the mean of point Dice, box
Dice and AIS mSA.

SAM 2 (``models.sam2.Sam2Features``): the decoder reads the still-image embedding (the FPN's 64 x 64
level with ``no_mem_embed`` added, what SAM 2's mask decoder reads) and its maps cover the whole S x S
frame (SAM 2 resizes without padding); ``decoder_input`` says which, for both families.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam

from ..models.family import image_predictor, predictor_input
from ..models.instance_decoder import InstanceDecoder, postprocess_maps
from ..models.sam2 import Sam2Features
from ..runtime.instances import AIS_DEFAULTS, segment_from_maps
from .instance_loss import distance_loss
from .instance_targets import distance_targets


def decoder_input(features: torch.Tensor | Sam2Features, input_size) -> tuple[torch.Tensor, tuple[int, int]]:
    """(the embedding the instance decoder reads, the resized image's area in the model frame).

    SAM: the embedding and ``input_size`` (the rest is padding). SAM 2: the still-image embedding
    (``no_mem_embed`` added) and the whole S x S frame."""
    if isinstance(features, Sam2Features):
        s = 16 * int(features.image_embed.shape[-1])
        return features.image_embed, (s, s)
    return features, (int(input_size[0]), int(input_size[1]))


@torch.no_grad()
def predict_maps(decoder: InstanceDecoder, features: torch.Tensor, input_size, original_size) -> np.ndarray:
    """(3, H, W) float32 maps of one image embedding at the original image size."""
    maps = postprocess_maps(decoder(features), tuple(input_size), tuple(original_size))
    return maps[0].float().cpu().numpy()


class InstanceDecoderTraining:
    """The decoder in training: its loss for a batch of label patches, its state, its validation."""

    def __init__(self, decoder: InstanceDecoder, min_object_size: int) -> None:
        self.decoder = decoder
        self.min_object_size = min_object_size

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.decoder.parameters())

    def step_loss(self, features: torch.Tensor | Sam2Features, labels: Sequence[np.ndarray],
                  input_size: tuple[int, int] | None, backward: Callable[[torch.Tensor], None]) -> float:
        """Loss of the batch (backpropagated at once) for the encoder's output (SAM: embeddings (B, 256, g, g);
        SAM 2: its features, ``input_size`` None) and label patches."""
        embedding, input_size = decoder_input(features, input_size)
        h, w = labels[0].shape
        targets = torch.from_numpy(np.stack([distance_targets(lab, self.min_object_size) for lab in labels]))
        maps = postprocess_maps(self.decoder(embedding), input_size, (h, w))
        loss, _ = distance_loss(maps, targets.to(maps.device))
        if loss.requires_grad:
            backward(loss)
        return float(loss.detach())

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.decoder.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.decoder.load_state_dict(state, strict=True)

    def validate(self, sam: Sam, val_set: Sequence[tuple[np.ndarray, np.ndarray, str]], prompted: dict) -> dict:
        """AIS mSA / SA50 on the validation set, and the selection score (mean of point Dice, box Dice, mSA)."""
        from ..evaluation.protocol import evaluate_automatic

        predictor = image_predictor(sam)  # SamPredictor, or SAM2ImagePredictor for SAM 2
        was_training = sam.training, self.decoder.training
        sam.eval()
        self.decoder.eval()

        def segment(image: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                predictor.set_image(image)
                maps = predict_maps(self.decoder, *predictor_input(predictor))
            return segment_from_maps(maps, {})[0]

        try:
            res = evaluate_automatic(segment, val_set, progress=False)
        finally:
            sam.train(was_training[0])
            self.decoder.train(was_training[1])
        out = {"ais_msa": res["msa"], "ais_sa50": res["sa50"], "ais_postprocessing": dict(AIS_DEFAULTS)}
        scores = [prompted.get("point_dice"), prompted.get("box_dice"), res["msa"]]
        out["selection_score"] = None if any(v is None for v in scores) else float(np.mean(scores))
        return out
