"""MobileSAM's image encoder (TinyViT, ``vit_t``) plus SAM's neck, at any image size.

Written for this project; its ``state_dict`` keys and shapes equal MobileSAM's
``sam_model_registry["vit_t"]`` image encoder, so ``mobile_sam.pt`` and micro-sam's vit_t
checkpoints load strictly. The layout, from the facts of ``build_sam_vit_t``:

- ``patch_embed``: two 3x3 stride-2 ConvBN (GELU between): image / 4, 64 channels;
- ``layers.0``: 2 MBConv blocks (1x1 expand x4, 3x3 depthwise, 1x1 project, residual);
- ``layers.1-3``: 2 / 6 / 2 TinyViT blocks of width 128 / 160 / 320, heads 4 / 5 / 10,
  windows 7 / 14 / 7; each block is windowed attention (own LayerNorm, ``qkv`` laid out per
  head as [q_h, k_h, v_h], a learned bias per window offset), a 3x3 depthwise ``local_conv``
  and an MLP (own LayerNorm);
- a downsample (``PatchMerging``: 1x1, 3x3 depthwise stride 2 / 2 / 1, 1x1) after layers 0-2;
- ``neck``: SAM's (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) to 256 x S/16 x S/16.
- ``norm_head`` / ``head``: TinyViT's classifier, unused by SAM, kept so checkpoints load.

Differences from MobileSAM that keep the outputs equal:

- every size follows the input tensor (MobileSAM fixes a 64 x 64 grid, so 1024 px only);
- the attention bias is gathered from ``attention_biases`` in every forward (a cheap index),
  never cached, so weights loaded or trained after ``.eval()`` are always the ones used;
- BatchNorm always normalises with its stored statistics (as in eval mode): fine-tuning
  must not move base tensors that an adapter file does not store.

While exporting to ONNX (``torch.onnx.is_in_onnx_export()``) two steps are written in another,
equal form that runtimes execute faster (the same outputs, up to float rounding):

- channels-last <-> channels-first around convolutions as flatten, 2-D transpose, unflatten
  (``channels_first`` / ``channels_last``): OpenVINO then runs the convolution on the
  channels-last data directly, where it runs a 4-D NHWC -> NCHW Transpose as a slow separate copy;
- q, k and v as three matrix products with the per-head rows of ``qkv`` regrouped, instead of one
  product and a 5-D transpose (``Attention.project_qkv``).

docs/vit_t.md has the encoder's times before and after (``benchmarks/bench_vit_t.py``). In eager
torch the plain forms are faster (views, no copies), so they stay the forward's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


@dataclass(frozen=True)
class TinyViTConfig:
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    downsample_strides: tuple[int, ...] = (2, 2, 1)  # MobileSAM keeps S/16 by not striding before 320
    mlp_ratio: int = 4
    mbconv_expand: int = 4
    out_chans: int = 256
    num_classes: int = 1000  # the unused classifier head's size, for checkpoint compatibility


VIT_T = TinyViTConfig()


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W); while exporting to ONNX as flatten, transpose, unflatten (module doc)."""
    if not torch.onnx.is_in_onnx_export():
        return x.permute(0, 3, 1, 2)
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C); the inverse of ``channels_first``."""
    if not torch.onnx.is_in_onnx_export():
        return x.permute(0, 2, 3, 1)
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).transpose(1, 2).reshape(b, h, w, c)


class ConvBN(nn.Module):
    """Conv2d (no bias) + BatchNorm2d, normalised with the stored statistics in every mode."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        return F.batch_norm(self.c(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, dim // 2, 3, 2), nn.GELU(), ConvBN(dim // 2, dim, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, + input, GELU (NCHW)."""

    def __init__(self, dim: int, expand: int) -> None:
        super().__init__()
        hidden = dim * expand
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv2(self.act(self.conv1(x))))
        return self.act(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Downsample between stages: NCHW or NHWC in, NHWC out."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, nhwc_in: bool = True) -> torch.Tensor:
        if nhwc_in:
            x = channels_first(x)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return channels_last(x)


class ConvStage(nn.Module):
    """Layer 0: MBConv blocks on NCHW, then the first downsample (NHWC out)."""

    def __init__(self, dim: int, depth: int, expand: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x, nhwc_in=False)


def window_offset_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into ``attention_biases``: offset (|dy|, |dx|) is entry |dy| * w + |dx|."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()


class Attention(nn.Module):
    """Multi-head attention inside one window, with a learned bias per head and offset.

    ``qkv``'s output channels are per head: head h owns [q_h, k_h, v_h], 3 x head_dim.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", window_offset_index(window), persistent=False)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised tokens (N, L, C) -> q, k, v, each (N, heads, L, head_dim)."""
        n, length, _ = x.shape
        heads, hd = self.num_heads, self.head_dim
        if torch.onnx.is_in_onnx_export() and type(self.qkv) is nn.Linear:
            # Three products on the regrouped rows: no 5-D transpose of the whole qkv output in the
            # graph (module doc). Static sizes, so the exporter folds the regrouped weights into
            # initializers (what int8 quantisation looks for). Adapters kept in the graph wrap qkv:
            # they take the form below.
            c = self.qkv.in_features
            w = self.qkv.weight.view(heads, 3, hd, c).transpose(0, 1).reshape(3, heads * hd, c)
            b = self.qkv.bias.view(heads, 3, hd).transpose(0, 1).reshape(3, heads * hd)
            return tuple(F.linear(x, w[i], b[i]).view(n, length, heads, hd).transpose(1, 2) for i in range(3))
        qkv = self.qkv(x).view(n, length, heads, 3, hd)
        return qkv.permute(3, 0, 2, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, L, C) windows of tokens
        n, length, _ = x.shape
        q, k, v = self.project_qkv(self.norm(x))
        bias = self.attention_biases[:, self.attention_bias_idxs]  # gathered each time: never stale
        attn = ((q @ k.transpose(-2, -1)) * self.scale + bias).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, length, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention, 3x3 depthwise conv, MLP; NHWC in and out, any H and W.

    Windows are zero-padded at the bottom and right, as MobileSAM does: the padded tokens
    pass the attention's LayerNorm and take part as keys, so padding is part of the model.
    """

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: int) -> None:
        super().__init__()
        self.window_size = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)

    def windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        return x[:, :h, :w] if (pad_b or pad_r) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.windowed_attention(x)
        x = channels_last(self.local_conv(channels_first(x)))
        return x + self.mlp(x)


class TokenStage(nn.Module):
    """Layers 1-3: TinyViT blocks on NHWC, then a downsample (none after the last)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: int,
                 out_dim: int | None, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, num_heads, window, mlp_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViTEncoder(nn.Module):
    """image (B,3,S,S), S a multiple of 16 -> embeddings (B,256,S/16,S/16), like SAM's encoder.

    ``blocks`` lists the TinyViT blocks of layers 1-3 in order (10 for vit_t): what PEFT
    placements (``--blocks``) count. ``stem`` / ``run_blocks`` / ``neck`` split the forward
    at any block, for training without autograd through a frozen prefix.
    """

    def __init__(self, img_size: int = 1024, config: TinyViTConfig = VIT_T) -> None:
        super().__init__()
        self.img_size = img_size
        self.config = config
        dims = config.embed_dims
        self.patch_embed = PatchEmbed(3, dims[0])
        stages: list[nn.Module] = [ConvStage(dims[0], config.depths[0], config.mbconv_expand, dims[1],
                                             config.downsample_strides[0])]
        for i in range(1, len(dims)):
            last = i == len(dims) - 1
            stages.append(TokenStage(dims[i], config.depths[i], config.num_heads[i], config.window_sizes[i],
                                     config.mlp_ratio, None if last else dims[i + 1],
                                     1 if last else config.downsample_strides[i]))
        self.layers = nn.ModuleList(stages)
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], config.num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )

    @property
    def blocks(self) -> list[TinyViTBlock]:
        return [blk for stage in self.layers[1:] for blk in stage.blocks]

    def block_downsamples(self) -> list[nn.Module | None]:
        """For each of ``blocks``: the downsample that follows it (the last block of a stage), or None."""
        out: list[nn.Module | None] = []
        for stage in self.layers[1:]:
            out += [None] * (len(stage.blocks) - 1) + [stage.downsample]
        return out

    def stem_modules(self) -> list[nn.Module]:
        """What runs before the first TinyViT block: patch embedding and the MBConv stage."""
        return [self.patch_embed, self.layers[0]]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](self.patch_embed(x))  # NHWC

    def run_blocks(self, x: torch.Tensor, start: int, stop: int | None = None, run=None) -> torch.Tensor:
        """``blocks[start:stop]`` and the downsamples after them; ``run(block, x)`` may wrap each block."""
        blocks, downs = self.blocks, self.block_downsamples()
        stop = len(blocks) if stop is None else stop
        for blk, down in zip(blocks[start:stop], downs[start:stop]):
            x = run(blk, x) if run is not None else blk(x)
            if down is not None:
                x = down(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.layers[1:]:
            x = stage(x)
        return self.neck(channels_first(x))
