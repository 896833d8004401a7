"""The exported graphs: image encoder (plus an fp16 and a preprocess-in-graph variant)
and the two mask decoder flavours, and their ``torch.onnx`` export.

Exporter (torch 2.14): the TorchScript exporter (``dynamo=False``) by default for every
graph. It supports opset 17, dynamic axes and Meta's decoder, which crops its masks to a
size read from an input value (``orig_im_size``, which dynamo cannot express), and it is
the faster one for small models (tiny encoder 0.5 s vs 4-10 s). The dynamo exporter is an
option for the encoder only (``exporter="dynamo"``): faster for vit_b/h (time both with
``peftexport merge-and-export --exporter dynamo`` and the default), same outputs, but it only emits opset >= 18 (asking 17 makes it try a
down-conversion that fails on Pad). Encoders always use external data, one file, so every
encoder is ``encoder.onnx`` + ``encoder.onnx.data`` whatever its size or exporter
(vit_h fp32 is over protobuf's 2 GB).

The fp16 encoder is always traced by the dynamo exporter, at opset >= 18
(``FP16_OPSET``): it traces with fake tensors, while the TorchScript exporter runs the
model in real fp16, and CPU fp16 kernels are so slow that vit_b at 1024 did not finish in
12 minutes (dynamo: seconds). So a failed fp16 dynamo export raises with dynamo's reason
instead of falling back.
"""

from __future__ import annotations

import copy
import io
import os
import re
import shutil
import tempfile
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.utils.onnx import SamOnnxModel
from torch import nn

from ..errors import PeftExportError
from ..fsutil import current_umask
from ..models import PIXEL_MEAN, PIXEL_STD
from .folded_decoder import ChannelLastUpscaling, FoldedTwoWayTransformer, decoder_tokens, mask_weights

DECODER_FLAVOURS = ("decoder", "decoder_lowres")
MIN_OPSET = 17  # LayerNormalization is one node from opset 17
FP16_OPSET = 18  # the fp16 encoder is exported by dynamo, which emits opset >= 18


class EncoderGraph(nn.Module):
    """image (1,3,S,S) float32, normalised and padded -> image_embeddings (1,256,g,g)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class Fp32Norm(nn.Module):
    """Runs a LayerNorm in fp32 inside an fp16 network: its variance overflows in fp16."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def half_with_fp32_norms(module: nn.Module, norm_types: tuple[type, ...] = (nn.LayerNorm, LayerNorm2d)) -> nn.Module:
    """An fp16 copy of ``module`` whose normalisation layers (``norm_types``) run in fp32."""
    half = copy.deepcopy(module).eval().half()
    norms = [(n, m) for n, m in half.named_modules() if isinstance(m, norm_types)]
    for name, norm in norms:
        parent_name, _, attr = name.rpartition(".")
        parent = half.get_submodule(parent_name) if parent_name else half
        setattr(parent, attr, Fp32Norm(norm))
    return half


class Fp16EncoderGraph(nn.Module):
    """fp16 weights and compute, LayerNorms in fp32, graph input and output fp32."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = half_with_fp32_norms(sam.image_encoder)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image.half()).float()


class PreprocessEncoderGraph(nn.Module):
    """image (h,w,3) float32 in 0..255, already resized so max(h,w) == S -> image_embeddings.

    Normalisation, HWC->CHW and the bottom/right zero padding to SxS happen in the graph,
    so deployment code only resizes (h and w are dynamic, both <= S).
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.image_encoder = sam.image_encoder
        self.img_size = sam.image_encoder.img_size
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(1, 1, 3), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD, dtype=torch.float32).view(1, 1, 3), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = ((image - self.mean) / self.std).permute(2, 0, 1).unsqueeze(0)
        h, w = image.shape[0], image.shape[1]
        x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h))
        return self.image_encoder(x)


class MetaDecoderGraph(SamOnnxModel):
    """Meta's decoder interface (``segment_anything.utils.onnx``) with all 4 masks.

    SamOnnxModel takes the image size from ``image_encoder.img_size``, which is right for
    any S. Its crop ``masks[..., : int(prepadded_size[0]), ...]`` is not: the TorchScript
    tracer turns ``int(tensor)`` into a constant, so every export crops to the example's
    size. Here the crop is an ``index_select`` over ``arange(prepadded)``, which stays
    an input-dependent op (checked against SamPredictor in the tests, and against
    ``Sam.postprocess_masks`` at a crop unlike the example's in every export's verification).
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__(sam, return_single_mask=False)

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        prepadded = self.resize_longest_image_size(orig_im_size, self.img_size)
        masks = masks.index_select(2, torch.arange(prepadded[0], device=masks.device))
        masks = masks.index_select(3, torch.arange(prepadded[1], device=masks.device))
        orig_im_size = orig_im_size.to(torch.int64)
        h, w = orig_im_size[0], orig_im_size[1]
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)


class LowResDecoderGraph(nn.Module):
    """A batch of B prompts on one image embedding -> low-res masks (B,4,4g,4g) + IoU (B,4).

    No upsampling and no value-dependent shapes (TensorRT-friendly). The embedding is
    broadcast over B with ``expand`` instead of ``repeat_interleave``. The transformer and
    the output upscaling are ``folded_decoder``'s exact rewrites (faster than segment_anything's
    ops on a CPU and in the browser; README, "In the browser").
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.meta = SamOnnxModel(sam, return_single_mask=False)  # reuses its point/mask embedding
        self.mask_decoder = sam.mask_decoder
        self.transformer = FoldedTwoWayTransformer(sam.mask_decoder.transformer, sam.prompt_encoder)
        self.upscaling = ChannelLastUpscaling(sam)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self.meta._embed_points(point_coords, point_labels)
        dense = self.meta._embed_masks(mask_input, has_mask_input.reshape(-1, 1, 1, 1))
        dec = self.mask_decoder
        src = (image_embeddings + dense).flatten(2).transpose(1, 2)  # (B, N, 256): dense broadcasts over B
        queries, keys = self.transformer(src, decoder_tokens(dec, sparse))
        return self.upscaling(keys, mask_weights(dec, queries)), dec.iou_prediction_head(queries[:, 0, :])


def _check_opset(opset: int) -> None:
    if opset < MIN_OPSET:
        raise PeftExportError(f"--opset: {opset} is too old; need >= {MIN_OPSET} (LayerNorm as one node)")


def _export(
    module: nn.Module,
    args: tuple,
    path: Path,
    opset: int,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict | None,
    exporter: str,
    external: bool,
    custom_opsets: dict | None = None,
    fallback: bool = True,
) -> str:
    """Export; returns which exporter made the file ("dynamo" or "torchscript").

    With ``external`` the weights go to one external file ``<path>.data`` whichever
    exporter ran, so encoder files never depend on the exporter (dynamo always does this).
    A failed dynamo export falls back to the TorchScript exporter with a warning, unless
    ``fallback`` is False: then it raises with dynamo's reason.
    """
    module = module.eval()
    failure = None
    # torch.onnx prints progress and many tracer warnings; our own progress lines are enough.
    with warnings.catch_warnings(), torch.no_grad(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            try:
                program = torch.onnx.export(
                    module, args, None, input_names=input_names, output_names=output_names,
                    opset_version=opset, dynamo=True, verbose=False,
                )
                # The tracer's per-node metadata (stack traces with this machine's paths) is
                # most of a small graph's file and nothing the runtime reads.
                for node in program.model.graph.all_nodes():
                    node.metadata_props.clear()
                program.save(str(path), external_data=True)
                return "dynamo"
            except Exception as exc:  # noqa: BLE001 - fall back to the exporter below, or say why not
                first = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
                failure = f"{type(exc).__name__}: {first[0] if first else ''}"
                for p in (path, Path(str(path) + ".data")):
                    p.unlink(missing_ok=True)
                if not fallback:
                    raise PeftExportError(f"{path.name}: the dynamo ONNX exporter failed ({failure}); nothing written")
        scratch = Path(tempfile.mkdtemp(prefix=".tsexport.", dir=path.parent))
        try:
            torch.onnx.export(
                module, args, str(scratch / path.name), input_names=input_names, output_names=output_names,
                opset_version=opset, dynamic_axes=dynamic_axes, dynamo=False, do_constant_folding=True,
                custom_opsets=custom_opsets,
            )
            if external:  # one external data file, as the dynamo exporter writes
                import onnx

                model = onnx.load(str(scratch / path.name))
                onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=path.name + ".data", size_threshold=0)
                os.chmod(str(path) + ".data", 0o666 & ~current_umask())  # onnx creates it 0600
            else:
                os.replace(scratch / path.name, path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if failure:
        warnings.warn(f"{path.name}: dynamo ONNX export failed ({failure}); used the TorchScript exporter")
    return "torchscript"


def encoder_example(sam: Sam) -> torch.Tensor:
    s = sam.image_encoder.img_size
    return torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))


EXPORTERS = ("torchscript", "dynamo")


def check_exporter(exporter: str, opset: int) -> None:
    if exporter not in EXPORTERS:
        raise PeftExportError(f"--exporter: unknown {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    if exporter == "dynamo" and opset < 18:
        raise PeftExportError(f"--opset: the dynamo exporter emits opset >= 18, not {opset}")


def encoder_opset(precision: str, opset: int) -> int:
    """The opset an encoder of ``precision`` is written with when ``opset`` is asked for."""
    return max(opset, FP16_OPSET) if precision == "fp16" else opset


def export_attention_form(model: Sam, graph: nn.Module, example: torch.Tensor, path: str | os.PathLike, opset: int,
                          input_names: list[str], output_names: list[str], attention: str) -> str:
    """Export fp32 ``graph`` (the encoder or a part of it) while ``model``'s encoder blocks use the
    ``attention`` rewrite (``fused_attention``). Always the TorchScript exporter: it writes the fused
    form as ONNX Runtime's ``com.microsoft.MultiHeadAttention``. Returns the exporter used."""
    from .fused_attention import attention_form

    with attention_form(model, attention):  # swaps the blocks in place: ``graph`` shares them
        return _export(graph, (example,), Path(path), opset, input_names, output_names, None, "torchscript", True,
                       custom_opsets={"com.microsoft": 1} if attention == "fused" else None)


def export_encoder_onnx(
    model: Sam, path: str | os.PathLike, opset: int = 17, precision: str = "fp32", exporter: str = "torchscript",
    attention: str = "plain",
) -> str:
    """Export the image encoder: ``image`` (1,3,S,S) -> ``image_embeddings`` (1,256,g,g).

    ``precision`` "fp32" or "fp16" (fp16 weights and compute, fp32 LayerNorms and I/O;
    always the dynamo exporter at ``encoder_opset("fp16", opset)``, see the module doc).
    ``attention``: ``plain`` (SAM's own ops), ``folded`` or ``fused`` (``fused_attention``;
    fp32 only, TorchScript exporter). Writes ``path`` and ``path.data`` (external data).
    Returns the exporter used.
    """
    _check_opset(opset)
    check_exporter(exporter, opset)
    if attention != "plain":
        if precision != "fp32":
            raise PeftExportError(f"--attention {attention}: only the fp32 encoder is rewritten (int8 is quantised from it)")
        return export_attention_form(model, EncoderGraph(model), encoder_example(model), path, opset,
                                     ["image"], ["image_embeddings"], attention)
    if precision == "fp32":
        graph = EncoderGraph(model)
    elif precision == "fp16":
        graph = Fp16EncoderGraph(model)
        exporter, opset = "dynamo", encoder_opset(precision, opset)
    else:
        raise PeftExportError(f"--precision: {precision} is not exported by torch (int8 is quantised from fp32)")
    # No TorchScript fallback for fp16: it would run fp16 kernels on the CPU for many minutes (module doc).
    return _export(graph, (encoder_example(model),), Path(path), opset, ["image"], ["image_embeddings"], None,
                   exporter, True, fallback=precision != "fp16")


def export_preprocess_encoder_onnx(model: Sam, path: str | os.PathLike, opset: int = 17) -> str:
    """Export the encoder with normalisation + padding inside: ``image`` (h,w,3) float32 0..255."""
    _check_opset(opset)
    s = model.image_encoder.img_size
    example = torch.rand(s, (3 * s) // 4, 3, generator=torch.Generator().manual_seed(0)) * 255
    return _export(PreprocessEncoderGraph(model), (example,), Path(path), opset, ["image"], ["image_embeddings"],
                   {"image": {0: "height", 1: "width"}}, exporter="torchscript", external=True)


def decoder_example(model: Sam, flavour: str, batch: int = 1, num_points: int = 3) -> dict[str, torch.Tensor]:
    g = model.image_encoder.img_size // 16
    s = model.image_encoder.img_size
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "image_embeddings": torch.randn(1, 256, g, g, generator=gen),
        "point_coords": torch.rand(batch, num_points, 2, generator=gen) * s,
        "point_labels": torch.randint(0, 2, (batch, num_points), generator=gen).float(),
        "mask_input": torch.randn(batch, 1, 4 * g, 4 * g, generator=gen),
        "has_mask_input": torch.ones(batch),
    }
    if flavour == "decoder":
        inputs["orig_im_size"] = torch.tensor([s * 3 / 4, s * 1.0])
    return inputs


DECODER_IO = {
    "decoder": (
        ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"],
        ["masks", "iou_predictions", "low_res_masks"],
        {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
    ),
    "decoder_lowres": (
        ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"],
        ["low_res_masks", "iou_predictions"],
        {
            "point_coords": {0: "batch", 1: "num_points"},
            "point_labels": {0: "batch", 1: "num_points"},
            "mask_input": {0: "batch"},
            "has_mask_input": {0: "batch"},
            "low_res_masks": {0: "batch"},
            "iou_predictions": {0: "batch"},
        },
    ),
}


def decoder_graph(model: Sam, flavour: str) -> nn.Module:
    if flavour == "decoder":
        return MetaDecoderGraph(model).eval()
    if flavour == "decoder_lowres":
        return LowResDecoderGraph(model).eval()
    raise PeftExportError(f"decoder flavour {flavour!r}: choose one of {', '.join(DECODER_FLAVOURS)}")


def export_decoder_onnx(model: Sam, path: str | os.PathLike, flavour: str = "decoder", opset: int = 17) -> str:
    """Export a mask decoder flavour ("decoder": Meta's interface; "decoder_lowres": batched, low-res)."""
    _check_opset(opset)
    graph = decoder_graph(model, flavour)
    inputs, outputs, dynamic = DECODER_IO[flavour]
    example = decoder_example(model, flavour, batch=2 if flavour == "decoder_lowres" else 1)
    if flavour == "decoder":
        dynamic = {k: v for k, v in dynamic.items()}
        dynamic["masks"] = {2: "height", 3: "width"}
    return _export(graph, tuple(example[n] for n in inputs), Path(path), opset, inputs, outputs, dynamic, exporter="torchscript", external=False)
