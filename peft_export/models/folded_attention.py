"""SAM's image-encoder attention with the relative-position bias folded into the dot product.

SAM adds a decomposed relative-position bias to every attention logit
(``segment_anything.modeling.image_encoder.add_decomposed_rel_pos``)::

    logit[q, k] = scale * q.k + rel_h[q, row(k)] + rel_w[q, col(k)]
    rel_h[q, r] = q . Rh[row(q), r]        rel_w[q, c] = q . Rw[col(q), c]

Both bias terms are dot products with one-hot indicators of the key's row and column,
so appending ``rel_h(q)`` and ``rel_w(q)`` to each query and ``onehot(row(k))``,
``onehot(col(k))`` to each key gives::

    q' = [scale * q, rel_h(q), rel_w(q)]      k' = [k, onehot_row(k), onehot_col(k)]
    logit[q, k] = q' . k'                      (attention scale 1)

which is one plain scaled-dot-product attention with no (heads x N x N) bias tensor:
runtimes can use their fused attention kernels and never hold the 12 x 4096 x 4096 bias
of a global vit_b block. The head dimension grows from d to d + H + W (vit_b: 64 -> 192
in the global blocks at 1024 px, 64 -> 92 in the 14 x 14 windows); values keep d.

``FoldedAttention`` wraps an existing ``Attention`` and shares its parameters (including
PEFT-wrapped ``qkv`` layers), so swapping it in changes no weight: ``folded_attention(sam)``
does so for every block for as long as an export or a benchmark needs it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


def key_indicators(h: int, w: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot row (N x h) and column (N x w) indicators of the N = h*w keys, row-major as SAM flattens them."""
    rows = torch.eye(h, dtype=dtype, device=device).repeat_interleave(w, dim=0)
    cols = torch.eye(w, dtype=dtype, device=device).repeat(h, 1)
    return rows, cols


def fold_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
    scale: float,
    pad_to: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q', k') of the module doc: one attention with scale 1 over them is SAM's biased attention.

    q, k: (B, heads, N, d) with N = h*w tokens in row-major order; rel_pos_h/w: SAM's tables
    ((2h-1) x d, (2w-1) x d; other lengths are interpolated as SAM does). Returns
    (B, heads, N, d + h + w) each. ``pad_to`` > 1 appends zero columns to q' and k' up to a
    multiple of it (a zero adds nothing to q'.k'): CUDA's fused kernels want head dims in
    multiples of 8, and a 14 x 14 window gives 64 + 14 + 14 = 92.
    """
    h, w = size
    b, n_heads, n, d = q.shape
    rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # (h, h, d): [row(q), row(k)]
    rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)  # (w, w, d): [col(q), col(k)]
    q_grid = q.reshape(b, n_heads, h, w, d)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rh).reshape(b, n_heads, n, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rw).reshape(b, n_heads, n, w)
    rows, cols = key_indicators(h, w, k.dtype, k.device)
    q_parts = [q * scale, rel_h, rel_w]
    k_parts = [k, rows.expand(b, n_heads, n, h), cols.expand(b, n_heads, n, w)]
    pad = -(d + h + w) % pad_to
    if pad:
        zeros = q.new_zeros(b, n_heads, n, pad)
        q_parts.append(zeros)
        k_parts.append(zeros)
    return torch.cat(q_parts, dim=-1), torch.cat(k_parts, dim=-1)


def folded_rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple[int, int],
    scale: float,
    pad_to: int = 1,
) -> torch.Tensor:
    """softmax(scale q k^T + decomposed rel-pos bias) v, computed as one attention with scale 1.

    q, k, v: (B, heads, N, d); see ``fold_rel_pos``. Returns (B, heads, N, d).
    """
    q_folded, k_folded = fold_rel_pos(q, k, rel_pos_h, rel_pos_w, size, scale, pad_to)
    return F.scaled_dot_product_attention(q_folded, k_folded, v, scale=1.0)


class FoldedAttention(nn.Module):
    """Drop-in for segment_anything's ``Attention`` (same parameters, same output), rel-pos folded."""

    def __init__(self, attn: Attention, pad_to: int = 1) -> None:
        super().__init__()
        self.pad_to = pad_to
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.use_rel_pos = attn.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = attn.rel_pos_h
            self.rel_pos_w = attn.rel_pos_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        # (3, B, heads, N, d), exactly SAM's split of the fused qkv projection.
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.use_rel_pos:
            out = folded_rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale, self.pad_to)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.permute(0, 2, 1, 3).reshape(b, h, w, -1)
        return self.proj(out)


def _attention_modules(sam_or_encoder: nn.Module) -> list[tuple[nn.Module, Attention]]:
    encoder = getattr(sam_or_encoder, "image_encoder", sam_or_encoder)
    if hasattr(encoder, "run_blocks"):  # TinyViT (vit_t)
        from ..errors import PeftExportError

        raise PeftExportError(
            "--attention folded/fused: vit_t (TinyViT) has no relative-position attention to rewrite (its window "
            "bias is already one add); export it with --attention plain"
        )
    return [(blk, blk.attn) for blk in encoder.blocks if isinstance(blk.attn, Attention)]


@contextlib.contextmanager
def folded_attention(
    sam_or_encoder: nn.Module, pad_to: int = 1, wrapper: Callable[[Attention], nn.Module] | None = None
) -> Iterator[nn.Module]:
    """Swap every encoder block's attention for ``FoldedAttention(pad_to=...)`` (or ``wrapper(attention)``)
    while the context lasts.

    Parameters are shared, not copied: the state dict keys and values stay those of SAM,
    and the original modules are put back on exit (also after an error).
    """
    swapped = _attention_modules(sam_or_encoder)
    try:
        for blk, attn in swapped:
            blk.attn = wrapper(attn) if wrapper is not None else FoldedAttention(attn, pad_to)
        yield sam_or_encoder
    finally:
        for blk, attn in swapped:
            blk.attn = attn


@torch.no_grad()
def folded_parity(encoder: nn.Module, image: torch.Tensor, pad_to: int = 1) -> dict:
    """The encoder's output with SAM's attention vs with the folded one, on ``image`` (run as given:
    same device, dtype and autocast). Returns max_rel (to the largest reference magnitude) and cosine."""
    reference = encoder(image).double()
    with folded_attention(encoder, pad_to):
        folded = encoder(image).double()
    diff = (folded - reference).abs().max()
    cosine = torch.nn.functional.cosine_similarity(folded.flatten(), reference.flatten(), dim=0)
    return {"max_rel": float(diff / reference.abs().max().clamp_min(1e-12)), "cosine": float(cosine),
            "finite": bool(torch.isfinite(folded).all())}
