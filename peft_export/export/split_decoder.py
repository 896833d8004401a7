"""The split mask decoder: SAM's prompt encoder + mask decoder in three graphs, for many prompts on one image.

SamAutomaticMaskGenerator runs the whole decoder for each of its 1024 grid points. Most of
that work is either the same for every prompt or wasted on masks that the predicted-IoU
filter then drops. The three graphs take it apart; they serve ``SamSession.predict`` (the
previous mask fed back as ``mask_input``), ``predict_batch`` and segment-everything alike:

- ``split_image`` (once per image): the image tokens (embedding + ``no_mask_embed``) and
  the first block's projections of them. Until the first block's image-to-token attention
  updates the image tokens, nothing about them depends on the prompt.
- ``split_prompts`` (per batch of prompts, + ``mask_input`` (M,1,4g,4g) and ``has_mask_input``
  (M,), M = 1 for all prompts or one per prompt): the mask input's change of the image tokens
  and of block 0's k, v, q of them, through the 16 channels of ``mask_downscaling`` before its
  last 1x1 convolution (``(W W_d) f + W (b_d - no_mask_embed)``, the click decoder's terms), so a
  mask costs 16-channel products instead of three 4096 x 256 x 128 projections; then the rest
  of the two-way transformer -> predicted IoU, the mask tokens' hypernetwork outputs and the
  final image tokens. With ``has_mask_input`` 0 the terms add exact zeros.
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

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel
from torch import nn

from ..runtime.split_decoder import SPLIT_CONTEXT, SPLIT_GRAPHS
from .gates import graph_runner, judge, mask_iou, nonfinite
from .folded_decoder import (ChannelLastUpscaling, FoldedTwoWayTransformer, decoder_tokens, dense_pe_tokens,
                             mask_weights)

SPLIT_NOTE = ("the decoder family: split_image once per image, split_prompts per batch of prompts (+ mask "
              "input: IoU, mask weights, image tokens), split_masks for the prompts kept; verified as a chain")
_CONTEXT = list(SPLIT_CONTEXT)
SPLIT_IO = {
    "split_image": (["image_embeddings"], _CONTEXT, None),
    "split_prompts": (
        _CONTEXT + ["point_coords", "point_labels", "mask_input", "has_mask_input"],
        ["iou_predictions", "mask_weights", "keys"],
        {
            "point_coords": {0: "batch", 1: "num_points"},
            "point_labels": {0: "batch", 1: "num_points"},
            "mask_input": {0: "mask_batch"},
            "has_mask_input": {0: "mask_batch"},
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


class MaskInputContext(nn.Module):
    """split_image's context (no mask) + mask input (M,1,4g,4g), has (M,) -> the context SAM's
    decoder has with that mask: image tokens (M,N,256) and block 0's k, v, q of them (M,N,128)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        encoder = sam.prompt_encoder
        self.features_net = encoder.mask_downscaling[:-1]  # (M,1,4g,4g) -> (M,16,g,g)
        last = encoder.mask_downscaling[-1]  # Conv2d(16, 256, 1)
        w_d = last.weight.detach()[:, :, 0, 0]  # (256, 16)
        shift = last.bias.detach() - encoder.no_mask_embed.weight.detach()[0]  # split_image added no_mask_embed
        block = sam.mask_decoder.transformer.layers[0]
        self.register_buffer("w_tokens", w_d.t().contiguous())  # (16, 256)
        self.register_buffer("s_tokens", shift)
        # k and q project keys + pe, v projects keys: the mask's change passes through each linearly.
        for name, proj in (("k", block.cross_attn_token_to_image.k_proj), ("v", block.cross_attn_token_to_image.v_proj),
                           ("q", block.cross_attn_image_to_token.q_proj)):
            self.register_buffer(f"w_{name}", (proj.weight.detach() @ w_d).t().contiguous())  # (16, 128)
            self.register_buffer(f"s_{name}", proj.weight.detach() @ shift)  # (128,)

    def forward(self, image_keys, layer0_k, layer0_v, layer0_q, mask_input, has_mask_input):
        f = self.features_net(mask_input).flatten(2).transpose(1, 2)  # (M, N, 16)
        has = has_mask_input.reshape(-1, 1, 1)
        return (image_keys + has * (f @ self.w_tokens + self.s_tokens), layer0_k + has * (f @ self.w_k + self.s_k),
                layer0_v + has * (f @ self.w_v + self.s_v), layer0_q + has * (f @ self.w_q + self.s_q))


class SplitPromptsGraph(nn.Module):
    """Image context + prompts (Meta's point layout) + mask input -> IoU (B,4), mask weights (B,4,c),
    image tokens (B,N,256)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.dec = sam.mask_decoder
        self.meta = SamOnnxModel(sam, return_single_mask=False)  # its point embedding
        self.mask_context = MaskInputContext(sam)
        self.transformer = FoldedTwoWayTransformer(sam.mask_decoder.transformer, sam.prompt_encoder)

    def forward(self, image_keys, layer0_k, layer0_v, layer0_q, point_coords, point_labels, mask_input, has_mask_input):
        dec = self.dec
        keys, k0, v0, q0 = self.mask_context(image_keys, layer0_k, layer0_v, layer0_q, mask_input, has_mask_input)
        tokens = decoder_tokens(dec, self.meta._embed_points(point_coords, point_labels))
        # The image side of the first block is the same for every prompt: projected once per image.
        queries, keys = self.transformer(keys, tokens, layer0=(k0, v0, q0))
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
    # One mask for all prompts (M = 1) traces the broadcast that also serves M = batch.
    mask, has = torch.randn(1, 1, 4 * g, 4 * g, generator=gen), torch.ones(1)
    _, weights, keys = graphs["split_prompts"](*context, coords, labels, mask, has)
    return {"split_image": (emb,), "split_prompts": (*context, coords, labels, mask, has),
            "split_masks": (keys, weights)}


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
        return (context + [t("point_coords", ["batch", "num_points", 2]), t("point_labels", ["batch", "num_points"]),
                           t("mask_input", ["mask_batch", 1, s, s]), t("has_mask_input", ["mask_batch"])],
                [t("iou_predictions", ["batch", 4]), t("mask_weights", ["batch", 4, 32]), t("keys", ["batch", n, 256])])
    if graph == "split_masks":
        return [t("keys", ["batch", n, 256]), t("mask_weights", ["batch", 4, 32])], [t("low_res_masks", ["batch", 4, s, s])]
    raise KeyError(graph)


@torch.no_grad()
def verify_split_decoder(export_dir: str | os.PathLike, reference, precision: str = "fp32",
                         backend: str = "onnxruntime", files: dict | None = None) -> dict:
    """The three graphs chained on ``backend`` vs segment_anything's decoder on the reference
    embedding and every reference prompt (with and without mask input). ``files``: {graph: path}
    (default: ``<graph>.onnx`` in ``export_dir``; an adapter's graphs of a shared-trunk export)."""
    from ..merge import error_stats

    files = files or {name: Path(export_dir) / f"{name}.onnx" for name in SPLIT_GRAPHS}
    run = {name: graph_runner(files[name], backend) for name in SPLIT_GRAPHS}
    context = run["split_image"]({"image_embeddings": reference.embeddings.numpy()})
    refs_low, refs_iou, lows, ious, finite = [], [], [], [], True
    s = reference.low_res[0].shape[-1]
    for prompt, ref_low, ref_iou in zip(reference.prompts, reference.low_res, reference.iou):
        has = prompt.mask is not None
        mask = np.asarray(prompt.mask, np.float32).reshape(-1, 1, s, s) if has else np.zeros((1, 1, s, s), np.float32)
        out = run["split_prompts"]({**context, "point_coords": prompt.coords, "point_labels": prompt.labels,
                                    "mask_input": mask, "has_mask_input": np.full(len(mask), float(has), np.float32)})
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
