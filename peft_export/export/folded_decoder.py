"""SAM's two-way transformer and output upscaling rewritten for export: the same function, less work.

SAM's mask decoder spends almost all of its time on the image side: every cross attention
projects the 4096 image tokens (64x64 at image size 1024) with 256x128 matrices, and the
output upscaling runs two transposed convolutions in NCHW plus a LayerNorm2d that ONNX
spells as eight element-wise nodes. The prompt side has a handful of tokens (T = 5 output
tokens + the points: 7 for one click). Two exact rewrites move the work there:

- **Folded projections.** With image tokens x, token-to-image scores q·(W_k x + b_k) =
  x·(W_kᵀq) + q·b_k and softmax-weighted values Σ p (W_v x + b_v) = W_v (Σ p x) + b_v Σ p;
  the image-to-token attention folds its query projection into the token keys and its
  output projection into the token values. Each (H·T × 256) matrix costs 256·H·T
  multiply-adds per image token (H = 8 heads) instead of 256·128 per projection: fewer
  while T < 16 tokens, i.e. up to 9 clicks, or 8 with a box (more cost a little more).
- **Channel-last upscaling.** A transposed convolution with kernel 2 and stride 2 writes each
  input pixel's 2x2 outputs alone, so it is one matrix product per pixel; the LayerNorm2d
  becomes one LayerNormalization over the last axis, and no NCHW transposes are needed
  until the final mask layout.

The algebra is exact; float rounding differs from segment_anything's decoder at the 1e-7
level, and every export verifies its decoder graphs against segment_anything's own decoder.
Used by ``decoder_lowres`` (``onnx_graphs.LowResDecoderGraph``) and the split decoder.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder, Sam
from segment_anything.modeling.transformer import Attention, TwoWayTransformer
from torch import nn


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

    def forward(self, tokens_pe: torch.Tensor, tokens: torch.Tensor, x=None, q_img=None, extra_scores=None) -> torch.Tensor:
        """``extra_scores(k)`` -> (B, N, H, T) is added to the scores (the click decoder's mask-input terms)."""
        a, h = self.attn, self.heads
        b, t, _ = tokens.shape
        k = _heads(a.k_proj(tokens_pe), h) * self.scale  # (B, H, T, d)
        v = _heads(a.v_proj(tokens), h)  # (B, H, T, d)
        scores = self.scores_from_queries(q_img, k) if q_img is not None else self.scores_from_image(x, k)
        if extra_scores is not None:
            scores = scores + extra_scores(k)
        p = torch.softmax(scores, dim=-1).reshape(b, -1, h * t)  # (B, N, HT)
        w_o = a.out_proj.weight.reshape(-1, h, v.shape[-1]).permute(1, 2, 0)  # (H, d, 256)
        # (B, HT, 256): out_proj of each token's value. Each head's weights sum to 1, so
        # bias / H on every row adds the bias once: no pass over the (B, N, 256) output for it.
        z = (v @ w_o).reshape(b, h * t, -1) + a.out_proj.bias / h
        return p @ z


def projected_token_to_image(attn: Attention, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Token-to-image attention with the image keys and values already projected (1, N, internal)."""
    h = attn.num_heads
    q = _heads(attn.q_proj(q_in), h)
    p = torch.softmax((q @ _heads(k, h).transpose(2, 3)) / float(np.sqrt(q.shape[-1])), dim=-1)
    out = p @ _heads(v, h)  # (B, H, T, d)
    b, _, t, _ = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class FoldedTwoWayTransformer(nn.Module):
    """segment_anything's ``TwoWayTransformer.forward`` on image tokens (B, N, 256), projections folded.

    ``layer0`` = (k, v, q): the first block's image-side projections (1, N, internal), when the
    caller computed them once for many prompts (the split decoder); else they are folded too.
    Returns the output tokens (B, T, 256) and the final image tokens (B, N, 256).
    """

    def __init__(self, transformer: TwoWayTransformer, prompt_encoder: PromptEncoder) -> None:
        super().__init__()
        self.tf, self.prompt_encoder = transformer, prompt_encoder
        self.t2i = nn.ModuleList(TokenToImage(layer.cross_attn_token_to_image) for layer in transformer.layers)
        self.i2t = nn.ModuleList(ImageToToken(layer.cross_attn_image_to_token) for layer in transformer.layers)
        self.final = TokenToImage(transformer.final_attn_token_to_image)

    def block(self, i: int, queries, keys, pe, image_pe, token_to_image=None, image_to_token=None):
        """Block ``i`` of the transformer. ``token_to_image(q_in)`` and ``image_to_token(tokens_pe,
        tokens)`` replace its cross attentions when the caller has the image side precomputed."""
        layer = self.tf.layers[i]
        if layer.skip_first_layer_pe:
            queries = layer.norm1(layer.self_attn(q=queries, k=queries, v=queries))
        else:
            q = queries + pe
            queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
        x = keys + image_pe if token_to_image is None or image_to_token is None else None
        attn_out = token_to_image(queries + pe) if token_to_image else self.t2i[i](queries + pe, x, keys)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        attn_out = image_to_token(queries + pe, queries) if image_to_token else self.i2t[i](queries + pe, queries, x=x)
        return queries, layer.norm4(keys + attn_out)

    def finish(self, queries, keys, pe, image_pe):
        """The final token-to-image attention and its norm -> (output tokens, final image tokens)."""
        queries = self.tf.norm_final_attn(queries + self.final(queries + pe, keys + image_pe, keys))
        return queries, keys

    def forward(self, keys: torch.Tensor, point_embedding: torch.Tensor, layer0=None):
        pe = point_embedding
        queries = pe
        image_pe = dense_pe_tokens(self.prompt_encoder)
        for i in range(len(self.tf.layers)):
            t2i = i2t = None
            if i == 0 and layer0 is not None:
                k0, v0, q0 = layer0
                attn = self.tf.layers[0].cross_attn_token_to_image
                t2i = lambda q_in: projected_token_to_image(attn, q_in, k0, v0)  # noqa: E731
                i2t = lambda tokens_pe, tokens: self.i2t[0](tokens_pe, tokens, q_img=q0)  # noqa: E731
            queries, keys = self.block(i, queries, keys, pe, image_pe, t2i, i2t)
        return self.finish(queries, keys, pe, image_pe)


def dense_pe_tokens(prompt_encoder: PromptEncoder) -> torch.Tensor:
    """SAM's positional encoding of the image tokens, (1, N, 256). Computed in the graph from the
    (2, 128) Gaussian matrix rather than stored (4 MB at image size 1024): runtimes fold it at load."""
    return prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2)


class ChannelLastUpscaling(nn.Module):
    """Final image tokens (K,N,256) + mask weights (K,4,c) -> low-res mask logits (K,4,4g,4g).

    SAM's ``output_upscaling`` (ConvTranspose2d, LayerNorm2d, GELU, ConvTranspose2d, GELU)
    and the mask product, with the pixels kept channel-last until the final layout.
    """

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


def decoder_tokens(decoder: nn.Module, sparse: torch.Tensor) -> torch.Tensor:
    """The transformer's tokens for B prompts: a ``MaskDecoder``'s IoU and mask tokens, then the
    prompt embedding (B, P, 256) -> (B, 5 + P, 256), as ``MaskDecoder.predict_masks`` builds them."""
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    return torch.cat((output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)


def mask_weights(decoder: nn.Module, queries: torch.Tensor) -> torch.Tensor:
    """The hypernetwork outputs of the mask tokens (output tokens 1..4 of a ``MaskDecoder``): (B, 4, c)."""
    return torch.stack([mlp(queries[:, 1 + i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
