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

Inside ``split_prompts`` the attention projections of the image tokens are folded into the
prompt side, which has a handful of tokens against the image's thousands: with image tokens
x, scores q·(W_k x + b_k) = x·(W_kᵀq) + q·b_k, and softmax-weighted values
Σ p (W_v x + b_v) = W_v (Σ p x) + b_v Σ p; likewise the image-to-token attention's
queries and output projection. Each (tokens × 256) matrix costs 256·H·T multiply-adds per
image token (H = 8 heads, T = 7 tokens for one point) instead of 256·128 per projection.
The transposed convolutions (kernel 2, stride 2: no overlap) are matrix products per
pixel. The algebra is exact; the float rounding differs from the plain decoder's at the
1e-6 level, and every export verifies the chain against segment_anything's decoder.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention
from segment_anything.utils.onnx import SamOnnxModel
from torch import nn

from ..runtime.split_decoder import SPLIT_GRAPHS
SPLIT_NOTE = ("split decoder for many prompts without mask input: split_image once per image, split_prompts "
              "per batch (IoU, mask weights, image tokens), split_masks for the prompts kept; verified as a chain")
_CONTEXT = ["image_keys", "layer0_k", "layer0_v", "layer0_q"]
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


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, H, T, C/H)."""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(1, 2)


def _head_blocks(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection's weight (internal, 256) -> (H, internal/H, 256): the rows of each head."""
    return weight.reshape(heads, weight.shape[0] // heads, weight.shape[1])


class TokenToImage(nn.Module):
    """``Attention(q=tokens, k=x, v=keys)`` with x = keys + pe, the image projections folded in."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.attn, self.heads = attn, attn.num_heads
        self.scale = 1.0 / float(np.sqrt(attn.internal_dim // attn.num_heads))

    def forward(self, q_in: torch.Tensor, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        a, h = self.attn, self.heads
        b, t, _ = q_in.shape
        q = _heads(a.q_proj(q_in), h) * self.scale  # (B, H, T, d)
        w_k = _head_blocks(a.k_proj.weight, h)  # (H, d, 256)
        q_k = (q @ w_k).reshape(b, h * t, -1)  # (B, HT, 256): W_kᵀ q per head and token
        bias = (q * a.k_proj.bias.reshape(h, 1, -1)).sum(-1).reshape(b, h * t, 1)
        p = torch.softmax(q_k @ x.transpose(1, 2) + bias, dim=-1)  # (B, HT, N)
        pooled = (p @ keys).reshape(b, h, t, -1)  # Σ p·keys, (B, H, T, 256)
        w_v = _head_blocks(a.v_proj.weight, h)  # (H, d, 256)
        out = pooled @ w_v.transpose(1, 2) + p.sum(-1).reshape(b, h, t, 1) * a.v_proj.bias.reshape(h, 1, -1)
        return a.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class ImageToToken(nn.Module):
    """``Attention(q=x, k=tokens, v=tokens)`` with x = keys + pe, the image-side projections folded in."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.attn, self.heads = attn, attn.num_heads
        self.scale = 1.0 / float(np.sqrt(attn.internal_dim // attn.num_heads))

    def scores_from_queries(self, q_img: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Projected image queries (1, N, internal) and token keys (B, H, T, d) -> scores (B, N, H, T)."""
        qh = _heads(q_img, self.heads)  # (1, H, N, d)
        return (qh @ k.transpose(2, 3)).permute(0, 2, 1, 3)

    def scores_from_image(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Image tokens x (B, N, 256) and token keys (B, H, T, d) -> scores (B, N, H, T)."""
        b, h, t, _ = k.shape
        w_q = _head_blocks(self.attn.q_proj.weight, h)  # (H, d, 256)
        k_q = (k @ w_q).reshape(b, h * t, -1)  # (B, HT, 256)
        bias = (k * self.attn.q_proj.bias.reshape(h, 1, -1)).sum(-1).reshape(b, 1, h * t)
        return (x @ k_q.transpose(1, 2) + bias).reshape(b, -1, h, t)

    def forward(self, tokens_pe: torch.Tensor, tokens: torch.Tensor, x=None, q_img=None) -> torch.Tensor:
        a, h = self.attn, self.heads
        b, t, _ = tokens.shape
        k = _heads(a.k_proj(tokens_pe), h) * self.scale  # (B, H, T, d)
        v = _heads(a.v_proj(tokens), h)  # (B, H, T, d)
        scores = self.scores_from_queries(q_img, k) if q_img is not None else self.scores_from_image(x, k)
        p = torch.softmax(scores, dim=-1).reshape(b, -1, h * t)  # (B, N, HT)
        w_o = a.out_proj.weight.reshape(-1, h, v.shape[-1]).permute(1, 2, 0)  # (H, d, 256)
        # (B, HT, 256): out_proj of each token's value. Each head's weights sum to 1, so
        # bias / H on every row adds the bias once: no pass over the (B, N, 256) output for it.
        z = (v @ w_o).reshape(b, h * t, -1) + a.out_proj.bias / h
        return p @ z


class SplitImageGraph(nn.Module):
    """image_embeddings (1,256,g,g) -> image tokens (1,N,256) and block 0's k, v, q of them (1,N,128)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.no_mask_embed = sam.prompt_encoder.no_mask_embed
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2).detach())
        self.block = sam.mask_decoder.transformer.layers[0]

    def forward(self, image_embeddings: torch.Tensor):
        keys = image_embeddings.flatten(2).transpose(1, 2) + self.no_mask_embed.weight.reshape(1, 1, -1)
        x = keys + self.image_pe
        t2i, i2t = self.block.cross_attn_token_to_image, self.block.cross_attn_image_to_token
        return keys, t2i.k_proj(x), t2i.v_proj(keys), i2t.q_proj(x)


class SplitPromptsGraph(nn.Module):
    """Image context + prompts (Meta's point layout) -> IoU (B,4), mask weights (B,4,c), image tokens (B,N,256)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.meta = SamOnnxModel(sam, return_single_mask=False)  # its point embedding
        dec = sam.mask_decoder
        self.dec, self.tf = dec, dec.transformer
        self.register_buffer("image_pe", sam.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2).detach())
        self.t2i = nn.ModuleList(TokenToImage(layer.cross_attn_token_to_image) for layer in self.tf.layers)
        self.i2t = nn.ModuleList(ImageToToken(layer.cross_attn_image_to_token) for layer in self.tf.layers)
        self.final = TokenToImage(self.tf.final_attn_token_to_image)

    def forward(self, image_keys, layer0_k, layer0_v, layer0_q, point_coords, point_labels):
        dec, tf = self.dec, self.tf
        sparse = self.meta._embed_points(point_coords, point_labels)
        b = sparse.shape[0]
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        pe = torch.cat((out_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)  # point_embedding
        queries, keys = pe, image_keys
        for i, layer in enumerate(tf.layers):
            if layer.skip_first_layer_pe:
                queries = layer.norm1(layer.self_attn(q=queries, k=queries, v=queries))
            else:
                q = queries + pe
                queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
            if i == 0:  # the image side is the same for every prompt: projected once per image
                queries = layer.norm2(queries + self._t2i_projected(layer, queries + pe, layer0_k, layer0_v))
            else:
                x = keys + self.image_pe
                queries = layer.norm2(queries + self.t2i[i](queries + pe, x, keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            if i == 0:
                attn_out = self.i2t[i](queries + pe, queries, q_img=layer0_q)
            else:
                attn_out = self.i2t[i](queries + pe, queries, x=x)
            keys = layer.norm4(keys + attn_out)
        x = keys + self.image_pe
        queries = tf.norm_final_attn(queries + self.final(queries + pe, x, keys))
        iou = dec.iou_prediction_head(queries[:, 0, :])
        weights = torch.stack([mlp(queries[:, 1 + i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], 1)
        return iou, weights, keys

    @staticmethod
    def _t2i_projected(layer, q_in, k, v):
        """Token-to-image attention with the image keys and values already projected (1, N, internal)."""
        a = layer.cross_attn_token_to_image
        h = a.num_heads
        q = _heads(a.q_proj(q_in), h)
        p = torch.softmax((q @ _heads(k, h).transpose(2, 3)) / float(np.sqrt(q.shape[-1])), dim=-1)
        out = p @ _heads(v, h)  # (B, H, T, d)
        b, _, t, _ = out.shape
        return a.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class SplitMasksGraph(nn.Module):
    """Final image tokens (K,N,256) + mask weights (K,4,c) -> low-res mask logits (K,4,4g,4g)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        up = sam.mask_decoder.output_upscaling
        conv1, self.norm, conv2 = up[0], up[1], up[3]
        self.g = sam.prompt_encoder.image_embedding_size[0]
        # ConvTranspose2d(k=2, s=2) writes each input pixel's 2x2 outputs alone: out[o, 2y+dy, 2x+dx]
        # = sum_i x[i, y, x] W[i, o, dy, dx] + b[o], a (C_in, 4*C_out) matrix with columns (dy, dx, o).
        self.register_buffer("w1", conv1.weight.detach().permute(0, 2, 3, 1).reshape(conv1.weight.shape[0], -1))
        self.register_buffer("b1", conv1.bias.detach().repeat(4))
        self.register_buffer("w2", conv2.weight.detach().permute(0, 2, 3, 1).reshape(conv2.weight.shape[0], -1))
        self.register_buffer("b2", conv2.bias.detach().repeat(4))
        self.c1, self.c2 = conv1.weight.shape[1], conv2.weight.shape[1]

    def forward(self, keys: torch.Tensor, mask_weights: torch.Tensor) -> torch.Tensor:
        k, n, _ = keys.shape
        g, c1, c2 = self.g, self.c1, self.c2
        y = (keys @ self.w1 + self.b1).reshape(k, n * 4, c1)  # pixels (y, x, dy, dx)
        y = F.gelu(F.layer_norm(y, (c1,), self.norm.weight, self.norm.bias, self.norm.eps))
        y = F.gelu(y @ self.w2 + self.b2).reshape(k, n * 16, c2)  # pixels (y, x, dy, dx, ey, ex)
        m = (y @ mask_weights.transpose(1, 2)).reshape(k, g, g, 2, 2, 2, 2, -1)
        return m.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(k, -1, 4 * g, 4 * g)


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
    from .verify import _judge, _mask_iou, _nonfinite, graph_runner
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
        finite &= not _nonfinite(low, iou)
        refs_low.append(ref_low)
        refs_iou.append(ref_iou)
        lows.append(torch.from_numpy(low))
        ious.append(torch.from_numpy(iou))
    stats = {
        "num_prompts": len(lows),
        "mask_logits": error_stats(torch.cat([x.flatten() for x in refs_low]), torch.cat([x.flatten() for x in lows])),
        "mask_iou": _mask_iou(refs_low, lows),
        "iou_predictions_max_abs": float(max((a - b).abs().max() for a, b in zip(refs_iou, ious))),
        "finite": bool(finite),
        "chain": list(SPLIT_GRAPHS),
    }
    stats["mask_logits_max_rel"] = stats["mask_logits"]["max_rel"]
    return _judge(stats, precision, ("mask_logits_max_rel", "mask_iou"))
