"""Merging is exact for every mergeable method, with random non-zero adapter weights."""

from __future__ import annotations

import sys

import pytest
import torch

from peft_export.errors import PeftExportError
from peft_export.merge import compare_models, merge_and_verify
from peft_export.models import build_sam_architecture, load_sam
from peft_export.peft import PeftConfig, apply_peft, merge_peft

from helpers import MERGEABLE_CONFIGS, make_adapted, randomize_trainables


@pytest.mark.parametrize("name", sorted(MERGEABLE_CONFIGS))
def test_merge_matches_adapter_model(name):
    adapted = make_adapted(MERGEABLE_CONFIGS[name])
    base, _ = load_sam("tiny", warn_random=False)
    merged, report = merge_and_verify(adapted)
    e = report["errors"]
    assert e["embeddings"]["max_rel"] <= 1e-4 and e["mask_logits"]["max_rel"] <= 1e-4
    assert e["mask_iou"] >= 0.999
    # The adapter really changed the model (otherwise equality would prove nothing).
    if name != "freeze-encoder":
        diff = compare_models(base, merged, 256)
        assert diff["embeddings"]["max_rel"] > 1e-3, name
    # Merged structure is plain segment_anything: same keys and shapes as a fresh model.
    plain = build_sam_architecture("tiny").state_dict()
    merged_state = merged.state_dict()
    assert merged_state.keys() == plain.keys()
    assert all(merged_state[k].shape == plain[k].shape for k in plain)


def test_merged_state_loads_strictly_into_plain_sam():
    adapted = make_adapted(MERGEABLE_CONFIGS["ssf"])
    merged, _ = merge_and_verify(adapted)
    fresh = build_sam_architecture("tiny")
    fresh.load_state_dict(merged.state_dict(), strict=True)
    assert compare_models(adapted.model, fresh, 256)["embeddings"]["max_rel"] <= 1e-4


def test_merge_at_other_image_size():
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=192)
    _, report = merge_and_verify(adapted)
    assert report["errors"]["embeddings"]["max_rel"] <= 1e-4


def test_adaptformer_refuses_merge_and_says_why():
    adapted = make_adapted(dict(method="adaptformer", blocks="late", bottleneck=8))
    with pytest.raises(PeftExportError, match="non-linear.*merge-and-export"):
        merge_peft(adapted.model)


@pytest.mark.parametrize("residual", [False, True])
def test_adaptformer_math_matches_reference(residual):
    """mlp(x) + alpha*up(relu(down(x))) (+ x for micro-sam <= 1.8)."""
    adapted = make_adapted(dict(method="adaptformer", blocks="all", bottleneck=8, adaptformer_residual=residual))
    layer = adapted.model.image_encoder.blocks[0].mlp
    x = torch.randn(1, 4, 4, 64)
    expected = layer.mlp_proj(x) + layer.alpha * layer.up_proj(torch.relu(layer.down_proj(x)))
    if residual:
        expected = expected + x
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_merge_does_not_modify_the_adapter_model():
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"])
    before = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    merge_peft(adapted.model)
    after = adapted.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_lora_delta_is_alpha_b_a_on_the_right_slices():
    adapted = make_adapted(dict(method="lora", rank=2, targets=("k",), blocks="0", alpha=3.0))
    qkv = adapted.model.image_encoder.blocks[0].attn.qkv
    merged = qkv.merged()
    d = qkv.out_dim
    delta = merged.weight - qkv.qkv_proj.weight
    expected = 3.0 * qkv.w_b_linear_k.weight @ qkv.w_a_linear_k.weight
    assert torch.allclose(delta[d : 2 * d], expected, atol=1e-6)
    assert torch.count_nonzero(delta[:d]) == 0 and torch.count_nonzero(delta[2 * d :]) == 0


def test_merge_is_exact_in_float64_accumulation():
    """Large-magnitude deltas still merge within tolerance (deltas computed in float64)."""
    adapted = make_adapted(dict(method="lora", rank=8, targets=("q", "v", "mlp"), blocks="all"))
    randomize_trainables(adapted.model, seed=3, scale=0.3)
    _, report = merge_and_verify(adapted)
    assert report["errors"]["embeddings"]["max_rel"] <= 1e-4


def test_qlora_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    sam = build_sam_architecture("tiny")
    with pytest.raises(PeftExportError, match="qlora needs bitsandbytes"):
        apply_peft(sam, PeftConfig("qlora", rank=4))
