"""The folded relative-position attention equals segment_anything's own Attention.

Random, non-zero rel-pos tables (SAM initialises them to zero, which would hide a wrong
fold); windowed (14x14, tiny's 7x7) and global grids of 256/512/1024 px images.
"""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from helpers import make_adapted
from peft_export.models import random_sam
from peft_export.models.folded_attention import FoldedAttention, folded_attention, folded_parity, key_indicators


def _attention(dim: int, heads: int, grid: int, seed: int, dtype=torch.float64) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(dim, heads, qkv_bias=True, use_rel_pos=True, input_size=(grid, grid)).to(dtype)
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    return attn.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("grid,batch", [(7, 3), (14, 4), (16, 1), (32, 1), (64, 1)])
def test_folded_equals_sam_attention_fp64(grid, batch):
    attn = _attention(64, 2, grid, seed=grid)
    x = torch.randn(batch, grid, grid, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = attn(x)
        out = FoldedAttention(attn)(x)
    assert ref.abs().max() > 0.1
    assert _rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("grid", [14, 64])
def test_folded_equals_sam_attention_fp32_vit_b_heads(grid):
    # vit_b's head layout (12 heads of 64) at a window and at a 1024 px global grid.
    attn = _attention(768, 12, grid, seed=1, dtype=torch.float32)
    x = torch.randn(1, grid, grid, 768)
    with torch.no_grad():
        ref, out = attn(x), FoldedAttention(attn)(x)
    assert _rel_err(out, ref) < 1e-5


def test_rel_pos_table_of_other_length_is_interpolated_like_sam():
    # A table made for a 32 grid used on a 20 grid: get_rel_pos interpolates it in both paths.
    attn = _attention(32, 2, 32, seed=3)
    x = torch.randn(1, 20, 20, 32, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(FoldedAttention(attn)(x), attn(x)) < 1e-12


def test_key_indicators_are_row_major():
    rows, cols = key_indicators(2, 3, torch.float32, torch.device("cpu"))
    # key n = r * 3 + c
    assert rows.argmax(1).tolist() == [0, 0, 0, 1, 1, 1]
    assert cols.argmax(1).tolist() == [0, 1, 2, 0, 1, 2]


def test_whole_encoder_with_adapter_folded_and_restored():
    # A LoRA-wrapped qkv is shared, not copied; the swap leaves the state dict untouched and is undone.
    adapted = make_adapted({"method": "lora", "rank": 4, "blocks": "all", "targets": ("q", "k", "v", "mlp")}, seed=5)
    sam = adapted.model.eval()
    with torch.no_grad():
        for blk in sam.image_encoder.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.5)
            blk.attn.rel_pos_w.normal_(0, 0.5)
    keys_before = {k: v.clone() for k, v in sam.state_dict().items()}
    x = torch.randn(1, 3, sam.image_encoder.img_size, sam.image_encoder.img_size)
    with torch.no_grad():
        ref = sam.image_encoder(x)
        with folded_attention(sam) as m:
            assert all(isinstance(b.attn, FoldedAttention) for b in m.image_encoder.blocks)
            assert set(sam.state_dict()) == set(keys_before)
            out = sam.image_encoder(x)
    assert all(isinstance(b.attn, Attention) for b in sam.image_encoder.blocks)
    assert _rel_err(out, ref) < 1e-5
    for k, v in sam.state_dict().items():
        assert torch.equal(v, keys_before[k])


def test_restored_after_an_error():
    sam = random_sam("tiny", 256)
    with pytest.raises(RuntimeError):
        with folded_attention(sam):
            raise RuntimeError("export failed")
    assert all(isinstance(b.attn, Attention) for b in sam.image_encoder.blocks)


@pytest.mark.parametrize("grid", [7, 14, 16])
def test_padding_to_a_multiple_of_8_changes_nothing(grid):
    # 64 + 14 + 14 = 92 columns in a 14x14 window; CUDA's fused kernels want multiples of 8.
    attn = _attention(64, 2, grid, seed=grid + 1)
    x = torch.randn(2, grid, grid, 64, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(FoldedAttention(attn, pad_to=8)(x), attn(x)) < 1e-12


def test_encoder_parity_gate_numbers():
    # The gate benchmarks/gpu_bench.py applies before it times the SDPA path: fp32 and bf16 (autocast) on CPU.
    sam = random_sam("tiny", 128, seed=2)
    with torch.no_grad():
        for blk in sam.image_encoder.blocks:
            blk.attn.rel_pos_h.normal_(0, 0.5)
            blk.attn.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(1, 3, 128, 128)
    fp32 = folded_parity(sam.image_encoder, x, pad_to=8)
    assert fp32["finite"] and fp32["max_rel"] < 1e-5 and fp32["cosine"] > 0.999999
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = folded_parity(sam.image_encoder, x, pad_to=8)
    assert bf16["finite"] and bf16["cosine"] > 0.999
    assert all(isinstance(b.attn, Attention) for b in sam.image_encoder.blocks)
