"""The model-family seam: SAM (segment_anything's ``Sam``, with our vit_t / tiny) or SAM 2
(the ``sam2`` package's ``SAM2Base``), told apart by model type or by the model object.

Everything that walks a model's parts asks here instead of reading attribute names: the
encoder trunk with ``blocks`` and ``patch_embed`` (SAM's image encoder, SAM 2's Hiera
``image_encoder.trunk``), the prompt encoder and mask decoder (``prompt_encoder`` /
``sam_prompt_encoder``, ...) and the input image size. ``sam2`` is imported lazily: SAM 1
users need not install it.
"""

from __future__ import annotations

from torch import nn

SAM2_PREFIX = "sam2"


def is_sam2_type(model_type: str | None) -> bool:
    """Whether a --model name is a SAM 2 model (``sam2.1_hiera_t`` ...)."""
    return bool(model_type) and str(model_type).startswith(SAM2_PREFIX)


def is_sam2(model: nn.Module) -> bool:
    """Whether ``model`` is a ``sam2`` SAM2Base (checked by class, without importing sam2)."""
    return any(c.__module__.startswith("sam2.") and c.__name__ == "SAM2Base" for c in type(model).__mro__)


def build_architecture(model_type: str, image_size: int | None = None) -> nn.Module:
    """A model of either family built from its type and image size, with initial (not trained) weights: the
    frame a saved state dict loads into strictly."""
    if is_sam2_type(model_type):
        from .sam2 import build_sam2_model

        return build_sam2_model(model_type, image_size)
    from .sam import build_sam_architecture

    return build_sam_architecture(model_type, image_size)


def encoder_trunk(model: nn.Module) -> nn.Module:
    """The module holding the encoder's ``blocks`` (and ``patch_embed``): where PEFT goes."""
    return model.image_encoder.trunk if is_sam2(model) else model.image_encoder


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """image_encoder / prompt_encoder / mask_decoder of either family (SAM 2's memory modules are not parts
    of the image path: they never train here)."""
    if is_sam2(model):
        return {"image_encoder": model.image_encoder, "prompt_encoder": model.sam_prompt_encoder,
                "mask_decoder": model.sam_mask_decoder}
    return {"image_encoder": model.image_encoder, "prompt_encoder": model.prompt_encoder,
            "mask_decoder": model.mask_decoder}


def model_image_size(model: nn.Module) -> int:
    """The square input size the model was built for."""
    return int(model.image_size) if is_sam2(model) else int(model.image_encoder.img_size)


def image_predictor(model: nn.Module):
    """SamPredictor, or for a SAM 2 model SAM2ImagePredictor sized for it (the conventions inference uses)."""
    if is_sam2(model):
        from .sam2 import sam2_predictor

        return sam2_predictor(model)
    from segment_anything import SamPredictor

    return SamPredictor(model)


def predictor_input(predictor) -> tuple:
    """(embedding, input_size, original_size) of the image set on a ``SamPredictor`` or a ``SAM2ImagePredictor``
    (whose ``image_embed`` has ``no_mem_embed`` added; its input is the whole S x S frame)."""
    if hasattr(predictor, "_features"):  # SAM2ImagePredictor
        s = int(predictor.model.image_size)
        return predictor._features["image_embed"], (s, s), tuple(predictor._orig_hw[-1])
    return predictor.features, tuple(predictor.input_size), tuple(predictor.original_size)

