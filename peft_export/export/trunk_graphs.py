"""The image encoder cut in two at block ``split``: ``trunk`` (shared by several adapters) and ``head``.

``trunk``: image (1,3,S,S) -> ``trunk_features`` (1,g,g,C), i.e. patch embedding, positional
embedding and blocks ``[0, split)``: the part no adapter changes. ``head``: ``trunk_features``
-> ``image_embeddings`` (1,256,g,g), i.e. blocks ``[split, depth)`` and the neck, with one
adapter merged. ``head(trunk(x))`` is the whole encoder; the split is the same one training
uses for its frozen prefix (``models.encoder_split``).

Precisions as for the whole encoder (``onnx_graphs``): fp32 from the chosen exporter, fp16
traced by dynamo with fp32 LayerNorms and fp32 graph I/O, int8 quantised from fp32 afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from segment_anything.modeling import Sam
from torch import nn

from ..errors import PeftExportError
from ..models.encoder_split import frozen_trunk, trainable_tail, trunk_features_shape
from . import onnx_graphs as og

TRUNK_OUTPUT = "trunk_features"


class TrunkGraph(nn.Module):
    """image -> trunk_features: patch embedding + pos-embed + blocks[:split] (fp16: cast in, fp32 out)."""

    def __init__(self, image_encoder: nn.Module, split: int, fp16: bool = False) -> None:
        super().__init__()
        self.image_encoder = og.half_with_fp32_norms(image_encoder) if fp16 else image_encoder
        self.split, self.fp16 = split, fp16

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.half() if self.fp16 else image
        return frozen_trunk(self, x, self.split).float()


class HeadGraph(nn.Module):
    """trunk_features -> image_embeddings: blocks[split:] + neck (fp16: cast in, fp32 out)."""

    def __init__(self, image_encoder: nn.Module, split: int, fp16: bool = False) -> None:
        super().__init__()
        self.image_encoder = og.half_with_fp32_norms(image_encoder) if fp16 else image_encoder
        self.split, self.fp16 = split, fp16

    def forward(self, trunk_features: torch.Tensor) -> torch.Tensor:
        h = trunk_features.half() if self.fp16 else trunk_features
        with torch.no_grad():
            return trainable_tail(self, h, self.split).float()


def features_shape(model: Sam, split: int = 0) -> list[int]:
    """(1, g, g, C) of the trunk's output (channels last, as SAM's blocks keep it); TinyViT's depends on ``split``."""
    return trunk_features_shape(model.image_encoder, split)


def check_split(model: Sam, split: int) -> None:
    depth = len(model.image_encoder.blocks)
    if not 0 <= split <= depth:
        raise PeftExportError(f"split block {split} is outside 0..{depth}")


def _graph(cls, model: Sam, split: int, precision: str, opset: int) -> nn.Module:
    if precision not in ("fp32", "fp16"):
        raise PeftExportError(f"--precision: {precision} is not exported by torch (int8 is quantised from fp32)")
    check_split(model, split)
    og._check_opset(opset)
    return cls(model.image_encoder, split, fp16=precision == "fp16").eval()


def _export_part(cls, model: Sam, path: Path, split: int, opset: int, precision: str, exporter: str,
                 attention: str, example: torch.Tensor, names: tuple[list[str], list[str]]) -> str:
    """Export ``cls`` (trunk or head) of ``model``; ``attention`` rewrites fp32 as for the whole encoder."""
    graph = _graph(cls, model, split, precision, opset)
    if attention != "plain":
        if precision != "fp32":
            raise PeftExportError(f"--attention {attention}: only fp32 graphs are rewritten (int8 is quantised from them)")
        return og.export_attention_form(model, graph, example, path, opset, *names, attention)
    if precision == "fp16":
        exporter, opset = "dynamo", og.encoder_opset(precision, opset)
    og.check_exporter(exporter, opset)
    return og._export(graph, (example,), path, opset, *names, None, exporter, True)


def export_trunk_onnx(model: Sam, path: str | os.PathLike, split: int, opset: int = 17, precision: str = "fp32",
                      exporter: str = "torchscript", attention: str = "plain") -> str:
    """Write ``trunk.onnx`` (+ ``.data``): ``image`` -> ``trunk_features``. Returns the exporter used.

    ``attention``: ``plain``, ``folded`` or ``fused`` (``fused_attention``; fp32 only).
    """
    return _export_part(TrunkGraph, model, Path(path), split, opset, precision, exporter, attention,
                        og.encoder_example(model), (["image"], [TRUNK_OUTPUT]))


def export_head_onnx(model: Sam, path: str | os.PathLike, split: int, opset: int = 17, precision: str = "fp32",
                     exporter: str = "torchscript", attention: str = "plain") -> str:
    """Write ``head_<NAME>.onnx`` (+ ``.data``): ``trunk_features`` -> ``image_embeddings``."""
    example = torch.randn(*features_shape(model, split), generator=torch.Generator().manual_seed(0))
    return _export_part(HeadGraph, model, Path(path), split, opset, precision, exporter, attention,
                        example, ([TRUNK_OUTPUT], ["image_embeddings"]))


def graph_io(graph: str, model: Sam, split: int = 0) -> tuple[list[dict], list[dict]]:
    """Manifest I/O specs of ``trunk`` and ``head`` graphs."""
    s = model.image_encoder.img_size
    feats = {"name": TRUNK_OUTPUT, "shape": features_shape(model, split), "dtype": "float32"}
    g = s // 16  # the embedding grid
    channels = int(model.image_encoder.neck[0].out_channels)
    if graph == "trunk":
        return [{"name": "image", "shape": [1, 3, s, s], "dtype": "float32"}], [feats]
    if graph == "head":
        return [feats], [{"name": "image_embeddings", "shape": [1, channels, g, g], "dtype": "float32"}]
    raise KeyError(graph)
