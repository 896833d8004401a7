"""The exported mask decoder's rewrites (folded attention projections, channel-last upscaling) are exact.

Reference: segment_anything's own ``MaskDecoder.predict_masks``, one prompt at a time, on a
decoder with random non-zero weights (the biases included: several terms of the folding
exist only because of them), for prompts from one point to more tokens than the folding
saves on, with and without a mask input.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from segment_anything.utils.onnx import SamOnnxModel

from peft_export.export.onnx_graphs import LowResDecoderGraph, export_decoder_onnx
from peft_export.models import random_sam


def random_decoder_sam(image_size: int, seed: int = 0):
    sam = random_sam("tiny", image_size, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(sam.mask_decoder.parameters()) + list(sam.prompt_encoder.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.3))
    return sam


def prompts(sam, num_points: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    s, low = sam.image_encoder.img_size, 4 * sam.prompt_encoder.image_embedding_size[0]
    coords = torch.rand(batch, num_points, 2, generator=g) * s
    labels = torch.randint(0, 4, (batch, num_points), generator=g).float()
    labels[:, -1] = -1  # Meta's padding point
    mask_input = torch.randn(batch, 1, low, low, generator=g) * 3
    has_mask = (torch.arange(batch) % 2).float()  # mixed in one batch
    return coords, labels, mask_input, has_mask


@torch.no_grad()
def reference(sam, embedding, coords, labels, mask_input, has_mask):
    """segment_anything's decoder per prompt, on Meta's point and mask embedding."""
    meta = SamOnnxModel(sam, return_single_mask=False)
    lows, ious = [], []
    for i in range(coords.shape[0]):
        sparse = meta._embed_points(coords[i:i + 1], labels[i:i + 1])
        dense = meta._embed_masks(mask_input[i:i + 1], has_mask[i].reshape(1, 1, 1, 1))
        low, iou = sam.mask_decoder.predict_masks(embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense)
        lows.append(low)
        ious.append(iou)
    return torch.cat(lows), torch.cat(ious)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    err = (actual - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), (err, expected.abs().max().item())


@pytest.mark.parametrize("image_size", [256, 320])
@pytest.mark.parametrize("num_points", [2, 5, 14])  # T = 5 + points: 7, 10, 19 tokens (19 > 16: more work folded)
def test_lowres_decoder_graph_equals_segment_anything(image_size, num_points):
    sam = random_decoder_sam(image_size, seed=num_points)
    g = image_size // 16
    embedding = torch.randn(1, 256, g, g, generator=torch.Generator().manual_seed(1))
    inputs = prompts(sam, num_points, batch=3, seed=num_points)
    with torch.no_grad():
        low, iou = LowResDecoderGraph(sam).eval()(embedding, *inputs)
    ref_low, ref_iou = reference(sam, embedding, *inputs)
    assert low.shape == ref_low.shape == (3, 4, 4 * g, 4 * g)
    assert ref_low.abs().max() > 1  # a decoder that does something
    assert_close(low, ref_low)
    assert_close(iou, ref_iou)


def test_exported_lowres_decoder_runs_any_point_count(tmp_path):
    sam = random_decoder_sam(256, seed=3)
    path = tmp_path / "decoder_lowres.onnx"
    export_decoder_onnx(sam, path, "decoder_lowres")  # traced with 3 points, batch 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    embedding = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(2))
    for num_points, batch in [(1, 1), (6, 2), (16, 3)]:
        inputs = prompts(sam, num_points, batch, seed=num_points)
        feeds = dict(zip(["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"],
                         [t.numpy() for t in (embedding, *inputs)]))
        low, iou = session.run(["low_res_masks", "iou_predictions"], feeds)
        ref_low, ref_iou = reference(sam, embedding, *inputs)
        assert_close(torch.from_numpy(low), ref_low)
        assert_close(torch.from_numpy(iou), ref_iou)
        assert np.isfinite(low).all()
