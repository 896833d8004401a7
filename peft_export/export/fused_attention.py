"""Export-only rewrite of the encoder's attention so runtimes can use their fused attention kernels.

SAM's attention adds a (heads x N x N) relative-position bias to every logit, which no fused
kernel takes, so a plain export materialises every score matrix (vit_b at 1024 px: 12 x 4096 x
4096 floats, 805 MB, in each global block). ``models.folded_attention.fold_rel_pos`` folds the
bias exactly into wider queries and keys; what is left is a bias-free attention with scale 1,
which is exported here in one of two forms (``ATTENTION_FORMS``):

* ``folded``: ``scaled_dot_product_attention``, which the TorchScript exporter writes as
  MatMul + Softmax + MatMul (standard ONNX; OpenVINO fuses it into its own SDPA kernel);
* ``fused``: ONNX Runtime's ``com.microsoft.MultiHeadAttention`` contrib op (query/key width
  heads x (d+h+w), value width heads x d, scale 1), whose CPU kernel is a flash attention that
  never holds the whole score matrix. OpenVINO cannot read this op: the graph is refused by
  its verification when OpenVINO is installed, so this form is for ONNX Runtime deployments.

Nothing changes in the weights: the swap shares SAM's parameters and is undone after the export.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention
from torch import nn

from ..models.folded_attention import FoldedAttention, fold_rel_pos, folded_attention

ATTENTION_FORMS = ("plain", "folded", "fused")


class _MultiHeadAttention(torch.autograd.Function):
    """Bias-free attention with scale 1 on (B, N, heads*d) tensors; exported as com.microsoft.MultiHeadAttention."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:  # noqa: ARG004
        b, n, _ = q.shape
        heads = lambda x: x.reshape(b, n, num_heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=1.0)
        return out.transpose(1, 2).reshape(b, n, -1)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=num_heads, scale_f=1.0)
        return out.setType(v.type())  # (B, N, heads*d) like the value input


class FusedAttention(nn.Module):
    """segment_anything's ``Attention`` (same parameters, same output) as one fused-attention op."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads, self.scale, self.use_rel_pos = attn.num_heads, attn.scale, attn.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, d)
        if self.use_rel_pos:
            q, k = fold_rel_pos(q, k, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
        else:
            q = q * self.scale
        flat = lambda t: t.transpose(1, 2).reshape(b, h * w, -1)  # noqa: E731
        out = _MultiHeadAttention.apply(flat(q), flat(k), flat(v), self.num_heads)
        return self.proj(out.reshape(b, h, w, -1))


@contextlib.contextmanager
def attention_form(sam_or_encoder: nn.Module, form: str) -> Iterator[nn.Module]:
    """Swap every encoder block's attention for the ``form`` rewrite while the context lasts."""
    if form not in ATTENTION_FORMS:
        from ..errors import PeftExportError

        raise PeftExportError(f"--attention: unknown {form!r}; choose one of {', '.join(ATTENTION_FORMS)}")
    if form == "plain":
        yield sam_or_encoder
        return
    with folded_attention(sam_or_encoder, wrapper=FoldedAttention if form == "folded" else FusedAttention):
        yield sam_or_encoder
