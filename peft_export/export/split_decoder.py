"""The split mask decoder: SAM's prompt encoder + mask decoder in three graphs, for many prompts on one image.

SamAutomaticMaskGenerator runs the whole decoder for each of its 1024 grid points. Most of
that work is either the same for every prompt or wasted on masks that the predicted-IoU
filter then drops. The three graphs take it apart, for prompts without a mask input:

- ``split_image`` (once per image): the image tokens (embedding + ``no_mask_embed``) and
  the first block's projections of them. Until the first block's image-to-token attention
  updates the image tokens, nothing about them depends on the prompt.
- ``split_prompts`` (per batch of prompts): the rest of the two-way transformer ->
  predicted IoU, the mask tokens' hypernetwork outputs and the final image tokens.
- ``split_masks`` (only for the prompts a caller keeps): output upscaling and the mask
  product -> low-res mask logits, the same (B, 4, 4g, 4g) as ``decoder_lowres``.

Inside ``split_prompts`` the image-side attention projections are folded into the prompt
side and ``split_masks`` upscales channel-last: the exact rewrites of ``folded_decoder``,
shared with ``decoder_lowres``. Every export verifies the chain against
segment_anything's decoder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel
from torch import nn

from ..runtime.split_decoder import SPLIT_CONTEXT, SPLIT_GRAPHS
from .gates import graph_runner, judge, mask_iou, nonfinite
from .folded_decoder import (ChannelLastUpscaling, FoldedTwoWayTransformer, decoder_tokens, dense_pe_tokens,
                             mask_weights)

SPLIT_NOTE = ("split decoder for many prompts without mask input: split_image once per image, split_prompts "
              "per batch (IoU, mask weights, image tokens), split_masks for the prompts kept; verified as a chain")
_CONTEXT = list(SPLIT_CONTEXT)
SPLIT_IO = {
    "split_image": (["image_embeddings"], _CONTEXT, None),
    "split_prompts": (
        _CONTEXT + ["point_coords", "point_labels"],
        ["iou_predictions", "mask_weights", "keys"],
        {
            "point_coords": {0: "batch", 1: "num_points"},
            "point_labels": {0: "batch", 1: "num_points"},
            "iou_predictions": {0: "batch"},
            "mask_weights": {0: "batch"},
            "keys": {0: "batch"},
        },
    ),
    "split_masks": (
        ["keys", "mask_weights"],
        ["low_res_masks"],
        {"keys": {0: "batch"}, "mask_weights": {0: "batch"}, "low_res_masks": {0: "batch"}},
    ),
}


class SplitImageGraph(nn.Module):
    """image_embeddings (1,256,g,g) -> image tokens (1,N,256) and block 0's k, v, q of them (1,N,128)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.no_mask_embed = sam.prompt_encoder.no_mask_embed
        self.prompt_encoder = sam.prompt_encoder
        self.block = sam.mask_decoder.transformer.layers[0]

    def forward(self, image_embeddings: torch.Tensor):
        keys = image_embeddings.flatten(2).transpose(1, 2) + self.no_mask_embed.weight.reshape(1, 1, -1)
        x = keys + dense_pe_tokens(self.prompt_encoder)
        t2i, i2t = self.block.cross_attn_token_to_image, self.block.cross_attn_image_to_token
        return keys, t2i.k_proj(x), t2i.v_proj(keys), i2t.q_proj(x)


class SplitPromptsGraph(nn.Module):
    """Image context + prompts (Meta's point layout) -> IoU (B,4), mask weights (B,4,c), image tokens (B,N,256)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.dec = sam.mask_decoder
        self.meta = SamOnnxModel(sam, return_single_mask=False)  # its point embedding
        self.transformer = FoldedTwoWayTransformer(sam.mask_decoder.transformer, sam.prompt_encoder)

    def forward(self, image_keys, layer0_k, layer0_v, layer0_q, point_coords, point_labels):
        dec = self.dec
        tokens = decoder_tokens(dec, self.meta._embed_points(point_coords, point_labels))
        # The image side of the first block is the same for every prompt: projected once per image.
        queries, keys = self.transformer(image_keys, tokens, layer0=(layer0_k, layer0_v, layer0_q))
        return dec.iou_prediction_head(queries[:, 0, :]), mask_weights(dec, queries), keys


SplitMasksGraph = ChannelLastUpscaling  # keys (K,N,256) + mask weights (K,4,c) -> (K,4,4g,4g)


def split_graphs(sam: Sam) -> dict[str, nn.Module]:
    return {"split_image": SplitImageGraph(sam).eval(), "split_prompts": SplitPromptsGraph(sam).eval(),
            "split_masks": SplitMasksGraph(sam).eval()}


@torch.no_grad()
def split_examples(sam: Sam, batch: int = 2, num_points: int = 2) -> dict[str, tuple]:
    """Example inputs of each graph (traced shapes; the dynamic axes are named in SPLIT_IO)."""
    graphs = split_graphs(sam)
    g, s = sam.image_encoder.img_size // 16, sam.image_encoder.img_size
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 256, g, g, generator=gen)
    context = graphs["split_image"](emb)
    coords = torch.rand(batch, num_points, 2, generator=gen) * s
    labels = torch.ones(batch, num_points)
    labels[:, -1] = -1
    _, weights, keys = graphs["split_prompts"](*context, coords, labels)
    return {"split_image": (emb,), "split_prompts": (*context, coords, labels), "split_masks": (keys, weights)}


def export_split_graph(model: Sam, path: str | os.PathLike, name: str, opset: int = 17) -> str:
    """Write one split decoder graph (``name`` in SPLIT_GRAPHS) to ``path``; returns the exporter used."""
    from .onnx_graphs import _check_opset, _export

    _check_opset(opset)
    inputs, outputs, dynamic = SPLIT_IO[name]
    return _export(split_graphs(model)[name], split_examples(model)[name], Path(path), opset, inputs, outputs,
                   dynamic, exporter="torchscript", external=False)


def split_graph_io(graph: str, image_size: int) -> tuple[list[dict], list[dict]]:
    """Input and output specs of a split decoder graph, as ``manifest.graph_io`` lists them."""
    g = image_size // 16
    n, s = g * g, 4 * g

    def t(name: str, shape: list) -> dict:
        return {"name": name, "shape": shape, "dtype": "float32"}

    context = [t("image_keys", [1, n, 256])] + [t(k, [1, n, 128]) for k in _CONTEXT[1:]]
    if graph == "split_image":
        return [t("image_embeddings", [1, 256, g, g])], context
    if graph == "split_prompts":
        return (context + [t("point_coords", ["batch", "num_points", 2]), t("point_labels", ["batch", "num_points"])],
                [t("iou_predictions", ["batch", 4]), t("mask_weights", ["batch", 4, 32]), t("keys", ["batch", n, 256])])
    if graph == "split_masks":
        return [t("keys", ["batch", n, 256]), t("mask_weights", ["batch", 4, 32])], [t("low_res_masks", ["batch", 4, s, s])]
    raise KeyError(graph)


@torch.no_grad()
def verify_split_decoder(export_dir: str | os.PathLike, reference, precision: str = "fp32",
                         backend: str = "onnxruntime") -> dict:
    """The three graphs chained on ``backend`` vs segment_anything's decoder on the reference
    embedding and prompts (those without a mask input, which the split decoder does not take)."""
    from ..merge import error_stats

    run = {name: graph_runner(Path(export_dir) / f"{name}.onnx", backend) for name in SPLIT_GRAPHS}
    context = run["split_image"]({"image_embeddings": reference.embeddings.numpy()})
    refs_low, refs_iou, lows, ious, finite = [], [], [], [], True
    for prompt, ref_low, ref_iou in zip(reference.prompts, reference.low_res, reference.iou):
        if prompt.mask is not None:
            continue
        out = run["split_prompts"]({**context, "point_coords": prompt.coords, "point_labels": prompt.labels})
        iou = out["iou_predictions"]
        low = run["split_masks"]({"keys": out["keys"], "mask_weights": out["mask_weights"]})["low_res_masks"]
        finite &= not nonfinite(low, iou)
        refs_low.append(ref_low)
        refs_iou.append(ref_iou)
        lows.append(torch.from_numpy(low))
        ious.append(torch.from_numpy(iou))
    stats = {
        "num_prompts": len(lows),
        "mask_logits": error_stats(torch.cat([x.flatten() for x in refs_low]), torch.cat([x.flatten() for x in lows])),
        "mask_iou": mask_iou(refs_low, lows),
        "iou_predictions_max_abs": float(max((a - b).abs().max() for a, b in zip(refs_iou, ious))),
        "finite": bool(finite),
        "chain": list(SPLIT_GRAPHS),
    }
    stats["mask_logits_max_rel"] = stats["mask_logits"]["max_rel"]
    return judge(stats, precision, ("mask_logits_max_rel", "mask_iou"))
