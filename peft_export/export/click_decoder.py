"""The click decoder: SamPredictor's interactive loop (one prompt, the previous mask fed back) for the browser.

A page that segments by clicking runs the decoder once per click on the same image, with the
previous low-res mask as ``mask_input``. ``decoder_lowres`` redoes the image side of the first
transformer block on every click; here it runs once per image, in ``split_image`` (the split
decoder's first graph: the image tokens with ``no_mask_embed`` and block 0's k, v and q of them):

- The mask input changes the image tokens by ``has_mask_input * (W_d f + b_d - no_mask_embed)``,
  where f are the 16 channels of ``mask_downscaling`` before its last (1x1) convolution. Block 0's
  projections of that change are ``(W W_d) f + W (b_d - no_mask_embed)``: (128 x 16) matrices,
  folded further into the prompt side of each attention (scores ``q (W_k W_d) f`` and values
  ``(W_v W_d)(Σ p f)``), so a click costs a few 16-channel products instead of three 4096 x 128
  projections.
- The graph returns only the mask the page shows (Meta's ``select_masks`` rule, as
  ``web.decoder_check.shown_mask_index``): the best of the three multimask outputs by predicted
  IoU for at most two decoder points, else the single-mask output. Only that mask is upscaled.

Blocks after the first, the final attention and the upscaling are ``folded_decoder``'s exact
rewrites. Every export verifies ``split_image`` -> ``click_decoder`` against segment_anything's
decoder (prompts with and without mask input).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel
from torch import nn

from ..runtime.split_decoder import CLICK_GRAPH, SPLIT_CONTEXT
from .gates import graph_runner, judge, mask_iou, nonfinite
from .folded_decoder import (ChannelLastUpscaling, FoldedTwoWayTransformer, _head_blocks, _heads, decoder_tokens,
                             dense_pe_tokens, mask_weights)
from .onnx_graphs import DECODER_IO
from .split_decoder import SplitImageGraph, split_graph_io

CLICK_NOTE = ("one prompt per click with the previous mask as input (the browser page): split_image once per "
              "image, click_decoder per click -> the shown mask (Meta's select_masks rule); verified as a chain")
CLICK_INPUTS = list(SPLIT_CONTEXT) + ["point_coords", "point_labels", "mask_input", "has_mask_input"]
CLICK_OUTPUTS = ["low_res_masks", "iou_predictions", "mask_index"]
CLICK_DYNAMIC = {**DECODER_IO["decoder_lowres"][2], "mask_index": {0: "batch"}}  # one prompt per batch row


class MaskInputTerms(nn.Module):
    """The mask input's share of block 0's image side, through the 16 channels of its downscaling."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        encoder = sam.prompt_encoder
        self.features_net = encoder.mask_downscaling[:-1]  # (B,1,4g,4g) -> (B,16,g,g)
        last = encoder.mask_downscaling[-1]  # Conv2d(16, 256, 1)
        w_d = last.weight.detach()[:, :, 0, 0]  # (256, 16)
        shift = last.bias.detach() - encoder.no_mask_embed.weight.detach()[0]  # split_image added no_mask_embed
        block = sam.mask_decoder.transformer.layers[0]
        self.t2i, self.i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
        self.heads = self.t2i.num_heads
        self.register_buffer("w_tokens", w_d.t().contiguous())  # (16, 256)
        self.register_buffer("shift", shift)
        for name, proj in (("k", self.t2i.k_proj), ("v", self.t2i.v_proj), ("q", self.i2t.q_proj)):
            self.register_buffer(f"w_{name}", _head_blocks(proj.weight.detach() @ w_d, self.heads))  # (H, d, 16)
            self.register_buffer(f"s_{name}", (proj.weight.detach() @ shift).reshape(self.heads, 1, -1))  # (H, 1, d)

    def features(self, mask_input: torch.Tensor) -> torch.Tensor:
        """(B, 1, 4g, 4g) low-res logits -> f (B, 1, N, 16), a head axis to broadcast over."""
        return self.features_net(mask_input).flatten(2).transpose(1, 2).unsqueeze(1)

    def image_tokens(self, image_keys: torch.Tensor, f: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """split_image's tokens (no mask) -> the tokens SAM builds with this mask input (B, N, 256)."""
        return image_keys + has.reshape(-1, 1, 1) * (f.squeeze(1) @ self.w_tokens + self.shift)

    def token_to_image(self, q_in, k0, v0, f, has) -> torch.Tensor:
        """Block 0's token-to-image attention on the precomputed k0, v0 (1, N, 128) plus the mask terms."""
        a, h = self.t2i, self.heads
        b, t, _ = q_in.shape
        has = has.reshape(-1, 1, 1, 1)
        q = _heads(a.q_proj(q_in), h) / float(np.sqrt(a.internal_dim // h))  # (B, H, T, d)
        scores = q @ _heads(k0, h).transpose(2, 3)  # (B, H, T, N)
        scores = scores + has * ((q @ self.w_k) @ f.transpose(2, 3) + (q * self.s_k).sum(-1, keepdim=True))
        p = torch.softmax(scores, dim=-1)
        out = p @ _heads(v0, h) + has * ((p @ f) @ self.w_v.transpose(1, 2) + p.sum(-1, keepdim=True) * self.s_v)
        return a.out_proj(out.transpose(1, 2).reshape(b, t, -1))

    def query_scores(self, k: torch.Tensor, f: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """The mask terms of block 0's image-to-token scores for token keys k (B, H, T, d): (B, N, H, T)."""
        terms = f @ (self.w_q.transpose(1, 2) @ k.transpose(2, 3)) + (self.s_q * k).sum(-1).unsqueeze(2)
        return has.reshape(-1, 1, 1, 1) * terms.permute(0, 2, 1, 3)


def shown_mask_index(iou: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
    """Meta's ``select_masks``: with at most two decoder points the best multimask output (1-3) by
    predicted IoU, else the single-mask output 0. (B,) int64."""
    best = iou[:, 1:].argmax(-1) + 1
    many = torch.ones_like(point_labels[0]).sum() > 2  # traced: the point count stays dynamic
    return torch.where(many, torch.zeros_like(best), best)


class ClickDecoderGraph(nn.Module):
    """split_image's context + one prompt per batch row (Meta's point layout) + mask input ->
    the shown low-res mask (B,1,4g,4g), IoU predictions (B,4) and which output it is (B,)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.dec = sam.mask_decoder
        self.meta = SamOnnxModel(sam, return_single_mask=False)  # its point embedding
        self.prompt_encoder = sam.prompt_encoder
        self.transformer = FoldedTwoWayTransformer(sam.mask_decoder.transformer, sam.prompt_encoder)
        self.mask_terms = MaskInputTerms(sam)
        self.upscaling = ChannelLastUpscaling(sam)

    def forward(self, image_keys, layer0_k, layer0_v, layer0_q, point_coords, point_labels, mask_input, has_mask_input):
        dec, tf, terms = self.dec, self.transformer, self.mask_terms
        f = terms.features(mask_input)
        keys = terms.image_tokens(image_keys, f, has_mask_input)
        tokens = decoder_tokens(dec, self.meta._embed_points(point_coords, point_labels))
        image_pe = dense_pe_tokens(self.prompt_encoder)
        queries, keys = tf.block(
            0, tokens, keys, tokens, image_pe,
            lambda q_in: terms.token_to_image(q_in, layer0_k, layer0_v, f, has_mask_input),
            lambda tokens_pe, toks: tf.i2t[0](tokens_pe, toks, q_img=layer0_q,
                                             extra_scores=lambda k: terms.query_scores(k, f, has_mask_input)),
        )
        for i in range(1, len(tf.tf.layers)):
            queries, keys = tf.block(i, queries, keys, tokens, image_pe)
        queries, keys = tf.finish(queries, keys, tokens, image_pe)
        iou = dec.iou_prediction_head(queries[:, 0, :])
        index = shown_mask_index(iou, point_labels)
        weights = mask_weights(dec, queries)  # (B, 4, c): upscale only the chosen one
        chosen = (F.one_hot(index, weights.shape[1]).to(weights.dtype).unsqueeze(-1) * weights).sum(1, keepdim=True)
        return self.upscaling(keys, chosen), iou, index


@torch.no_grad()
def click_example(sam: Sam) -> tuple:
    """Example inputs (traced shapes; CLICK_DYNAMIC names the dynamic axes)."""
    g, s = sam.image_encoder.img_size // 16, sam.image_encoder.img_size
    gen = torch.Generator().manual_seed(0)
    context = SplitImageGraph(sam).eval()(torch.randn(1, 256, g, g, generator=gen))
    coords = torch.rand(1, 2, 2, generator=gen) * s
    labels = torch.tensor([[1.0, -1.0]])
    return (*context, coords, labels, torch.randn(1, 1, 4 * g, 4 * g, generator=gen), torch.ones(1))


def export_click_graph(model: Sam, path: str | os.PathLike, opset: int = 17) -> str:
    """Write ``click_decoder`` to ``path``; returns the exporter used."""
    from .onnx_graphs import _check_opset, _export

    _check_opset(opset)
    return _export(ClickDecoderGraph(model).eval(), click_example(model), Path(path), opset, CLICK_INPUTS,
                   CLICK_OUTPUTS, CLICK_DYNAMIC, exporter="torchscript", external=False)


def click_graph_io(image_size: int) -> tuple[list[dict], list[dict]]:
    """Input and output specs of ``click_decoder``, as ``manifest.graph_io`` lists them."""
    s = 4 * (image_size // 16)

    def t(name: str, shape: list, dtype: str = "float32") -> dict:
        return {"name": name, "shape": shape, "dtype": dtype}

    inputs = split_graph_io("split_image", image_size)[1] + [
        t("point_coords", ["batch", "num_points", 2]), t("point_labels", ["batch", "num_points"]),
        t("mask_input", ["batch", 1, s, s]), t("has_mask_input", ["batch"])]
    outputs = [t("low_res_masks", ["batch", 1, s, s]), t("iou_predictions", ["batch", 4]),
               t("mask_index", ["batch"], "int64")]
    return inputs, outputs


@torch.no_grad()
def verify_click_decoder(path: str | os.PathLike, reference, precision: str = "fp32",
                         backend: str = "onnxruntime", context: str | os.PathLike | None = None) -> dict:
    """``split_image`` (``context``; default: split_image.onnx beside ``path``) -> ``click_decoder`` on
    ``backend`` vs segment_anything's decoder on the reference embedding and every reference prompt
    (with and without mask input): the shown mask and its index."""
    from ..merge import error_stats

    context = Path(path).parent / "split_image.onnx" if context is None else Path(context)
    split_image, click = graph_runner(context, backend), graph_runner(path, backend)
    context = split_image({"image_embeddings": reference.embeddings.numpy()})
    s = reference.low_res[0].shape[-1]
    refs, cands, iou_err, finite, index_agree = [], [], 0.0, True, True
    for prompt, ref_low, ref_iou in zip(reference.prompts, reference.low_res, reference.iou):
        b = prompt.coords.shape[0]
        has = prompt.mask is not None
        mask = prompt.mask if has else np.zeros((1, 1, s, s), np.float32)
        out = click({**context, "point_coords": prompt.coords, "point_labels": prompt.labels,
                     "mask_input": np.broadcast_to(mask, (b, 1, s, s)).copy(),
                     "has_mask_input": np.full(b, 1.0 if has else 0.0, np.float32)})
        want = shown_mask_index(ref_iou, torch.from_numpy(prompt.labels))
        index_agree &= bool(np.array_equal(out["mask_index"], want.numpy()))
        refs.append(ref_low[torch.arange(b), want].unsqueeze(1))
        cands.append(torch.from_numpy(out["low_res_masks"]))
        iou_err = max(iou_err, float(np.abs(out["iou_predictions"] - ref_iou.numpy()).max()))
        finite &= not nonfinite(out["low_res_masks"], out["iou_predictions"])
    stats = {
        "num_prompts": len(cands),
        "mask_logits": error_stats(torch.cat([x.flatten() for x in refs]), torch.cat([x.flatten() for x in cands])),
        "mask_iou": mask_iou(refs, cands),
        "iou_predictions_max_abs": iou_err,
        "mask_index_agrees": index_agree,
        "finite": bool(finite),
        "chain": ["split_image", CLICK_GRAPH],
    }
    stats["mask_logits_max_rel"] = stats["mask_logits"]["max_rel"]
    stats = judge(stats, precision, ("mask_logits_max_rel", "mask_iou"))
    if not index_agree:
        stats["passed"] = False
        stats["failures"].append("the shown mask's index differs from segment_anything's")
    return stats
