"""micro-sam's instance decoder for automatic instance segmentation (AIS), as our own module.

micro-sam puts torch-em's UNETR (``torch_em/model/unetr.py``, backbone "sam", no skip
connections, 3 outputs, sigmoid) on SAM's image encoder and stores everything but the
encoder as ``decoder_state``. This module is that decoder without the encoder: it takes
the image embedding (B, 256, g, g) and returns three maps (B, 3, 16g, 16g) in [0, 1] at
the model's input resolution: foreground probability, distance to the object centre and
distance to the object boundary (both normalised per object, small inside objects).

Its module names are torch-em's, so a ``decoder_state`` loads strictly. The architecture,
with F = (512, 256, 128, 64) features::

    z9 = deconv1(emb)  (F0, 2g)   z6 = deconv2(z9) (F1, 4g)   z3 = deconv3(z6) (F2, 8g)
    z0 = deconv4(z3)   (F3, 16g)  x = base(emb)    (F0, g)
    x = decoder(x, [z9, z6, z3])  (F3, 8g)   x = deconv_out(x)  (F3, 16g)
    out = sigmoid(out_conv(decoder_head(cat(x, z0))))

``deconvN`` is upsample x2 -> conv 3x3 -> BatchNorm -> ReLU; ``base``, ``decoder.blocks``
and ``decoder_head`` are (InstanceNorm -> conv 3x3 -> ReLU) twice (InstanceNorm without
affine weights). Upsampling is bilinear x2 + 1x1 conv, or (older micro-sam models) a 2x2
transposed conv; ``decoder_from_state`` picks the variant from the keys. The decoder level i
concatenates its upsampled input with the *centre channels* of the skip feature: torch-em
crops the skip tensor to the upsampled tensor's shape from dimension 1 on, channels
included (z9 has 512 channels, 256 are used: 128..383).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PeftExportError
from .state import load_state_strict

EMBED_DIM = 256  # SAM's neck output; the decoder does not depend on the encoder's width
FEATURES = (512, 256, 128, 64)
OUT_CHANNELS = 3
MAP_NAMES = ("foreground", "center_distances", "boundary_distances")


class ConvBlock(nn.Module):
    """torch-em ConvBlock2d: (InstanceNorm -> conv 3x3 -> ReLU) x 2; keys ``block.1.*``, ``block.4.*``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.InstanceNorm2d(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.InstanceNorm2d(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Upsample(nn.Module):
    """Bilinear x2 then a 1x1 conv (torch-em Upsampler2d; key ``conv.*``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


class TransposedUpsample(nn.Module):
    """A 2x2 stride-2 transposed conv (torch-em SingleDeconv2DBlock; key ``block.*``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _upsampler(conv_transpose: bool, in_channels: int, out_channels: int) -> nn.Module:
    return (TransposedUpsample if conv_transpose else Upsample)(in_channels, out_channels)


class _Conv3x3(nn.Module):
    """torch-em SingleConv2DBlock (key ``block.*``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DeconvBlock(nn.Module):
    """torch-em Deconv2DBlock: upsample x2 -> conv 3x3 -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, conv_transpose: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(
            _upsampler(conv_transpose, in_channels, out_channels), _Conv3x3(out_channels),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def centre_channels(skip: torch.Tensor, channels: int) -> torch.Tensor:
    """The middle ``channels`` channels of ``skip`` (torch-em's crop, which starts at dimension 1)."""
    start = (skip.shape[1] - channels) // 2
    return skip[:, start:start + channels]


class Decoder(nn.Module):
    """torch-em's UNet decoder: per level upsample, concatenate the (cropped) skip, ConvBlock."""

    def __init__(self, features: tuple[int, ...], conv_transpose: bool) -> None:
        super().__init__()
        pairs = list(zip(features[:-1], features[1:]))
        self.blocks = nn.ModuleList([ConvBlock(cin, cout) for cin, cout in pairs])
        self.samplers = nn.ModuleList([_upsampler(conv_transpose, cin, cout) for cin, cout in pairs])

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for block, sampler, skip in zip(self.blocks, self.samplers, skips):
            x = sampler(x)
            x = block(torch.cat([x, centre_channels(skip, x.shape[1])], dim=1))
        return x


class InstanceDecoder(nn.Module):
    """Image embedding (B, 256, g, g) -> foreground, centre- and boundary-distance maps (B, 3, 16g, 16g)."""

    def __init__(self, conv_transpose: bool = False, embed_dim: int = EMBED_DIM,
                 out_channels: int = OUT_CHANNELS) -> None:
        super().__init__()
        f = FEATURES
        self.conv_transpose = conv_transpose
        self.deconv1 = DeconvBlock(embed_dim, f[0], conv_transpose)
        self.deconv2 = DeconvBlock(f[0], f[1], conv_transpose)
        self.deconv3 = DeconvBlock(f[1], f[2], conv_transpose)
        self.deconv4 = DeconvBlock(f[2], f[3], conv_transpose)
        self.base = ConvBlock(embed_dim, f[0])
        self.decoder = Decoder(f, conv_transpose)
        self.deconv_out = _upsampler(conv_transpose, f[3], f[3])
        self.decoder_head = ConvBlock(2 * f[3], f[3])
        self.out_conv = nn.Conv2d(f[3], out_channels, 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        z9 = self.deconv1(embedding)
        z6 = self.deconv2(z9)
        z3 = self.deconv3(z6)
        z0 = self.deconv4(z3)
        x = self.decoder(self.base(embedding), [z9, z6, z3])
        x = self.decoder_head(torch.cat([self.deconv_out(x), z0], dim=1))
        return torch.sigmoid(self.out_conv(x))


def postprocess_maps(maps: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor:
    """Maps at the model's input resolution (B, C, S, S) -> the original image size.

    torch-em's ``UNETR.postprocess_masks`` (and so SAM's): crop the resized image's area
    (``input_size``), then resize bilinearly to ``original_size``.
    """
    maps = maps[..., : input_size[0], : input_size[1]]
    if tuple(maps.shape[-2:]) == tuple(original_size):
        return maps
    return F.interpolate(maps, size=tuple(original_size), mode="bilinear", align_corners=False)


def uses_conv_transpose(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a ``decoder_state`` upsamples with transposed convs (micro-sam's own test: ``.block.``
    in a ``decoder.samplers`` key; interpolation + conv has ``.conv.`` there)."""
    return any(".block." in k for k in state if k.startswith("decoder.samplers"))


def decoder_from_state(state: Mapping[str, torch.Tensor], path: str = "decoder_state") -> InstanceDecoder:
    """An ``InstanceDecoder`` with micro-sam's ``decoder_state`` loaded strictly (every key, every shape)."""
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PeftExportError(f"{path}: decoder_state entry {bad[0]!r} is not a tensor")
    decoder = InstanceDecoder(conv_transpose=uses_conv_transpose(state))
    load_state_strict(decoder, {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                      f"{path} (decoder_state)")
    return decoder.eval()


def random_instance_decoder(seed: int = 0, conv_transpose: bool = False) -> InstanceDecoder:
    """A reproducible freshly initialised decoder (PyTorch's default init), as micro-sam starts one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return InstanceDecoder(conv_transpose=conv_transpose).eval()
