"""Merging is exact for every mergeable method, with random non-zero adapter weights."""

from __future__ import annotations

import sys

import pytest
import torch

from peft_export.errors import PeftExportError
from peft_export.merge import compare_models, merge_and_verify
from peft_export.models import build_sam_architecture, load_sam
from peft_export.peft import PeftConfig, apply_peft, merge_peft

from helpers import MERGEABLE_CONFIGS, hand_merge, make_adapted, randomize_trainables


def _close_to_hand_merge(merged: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = merged.state_dict()
    assert got.keys() == expected.keys()
    for k in got:
        want = expected[k]
        tol = 1e-6 * float(want.abs().max()) + 1e-12
        assert (got[k].double() - want).abs().max() <= tol, k


@pytest.mark.parametrize("name", sorted(MERGEABLE_CONFIGS))
def test_merge_matches_weights_merged_by_hand(name):
    config = MERGEABLE_CONFIGS[name]
    adapted = make_adapted(config)
    base, _ = load_sam("tiny", warn_random=False)
    expected = hand_merge(adapted.model.state_dict(), config)
    merged, report = merge_and_verify(adapted)
    _close_to_hand_merge(merged, expected)
    # The hand-merged weights compute what the unmerged adapter model computes.
    reference = build_sam_architecture("tiny")
    reference.load_state_dict({k: v.float() for k, v in expected.items()}, strict=True)
    assert compare_models(adapted.model, reference, 256)["mask_logits"]["max_rel"] <= 1e-4
    # The adapter really changed the model (otherwise equality would prove nothing).
    if name != "freeze-encoder":
        diff = compare_models(base, merged, 256)
        assert diff["embeddings"]["max_rel"] > 1e-3, name
    # The report measures the merged model against the adapter model.
    assert report["errors"]["embeddings"]["max_rel"] == pytest.approx(
        compare_models(adapted.model, merged, 256)["embeddings"]["max_rel"], rel=1e-3, abs=1e-9)


def test_merged_state_loads_strictly_into_plain_sam():
    adapted = make_adapted(MERGEABLE_CONFIGS["ssf"])
    merged, _ = merge_and_verify(adapted)
    fresh = build_sam_architecture("tiny")
    fresh.load_state_dict(merged.state_dict(), strict=True)
    assert compare_models(adapted.model, fresh, 256)["embeddings"]["max_rel"] <= 1e-4


def test_merge_at_other_image_size():
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=192)
    merged, _ = merge_and_verify(adapted)
    _close_to_hand_merge(merged, hand_merge(adapted.model.state_dict(), MERGEABLE_CONFIGS["lora"]))
    assert merged.image_encoder.img_size == 192


def test_adaptformer_refuses_merge_and_says_why():
    adapted = make_adapted(dict(method="adaptformer", blocks="late", bottleneck=8))
    with pytest.raises(PeftExportError, match="non-linear.*merge-and-export"):
        merge_peft(adapted.model)


@pytest.mark.parametrize("residual", [False, True])
def test_adaptformer_math_matches_reference(residual):
    """lin2(gelu(lin1 x)) + alpha*up(relu(down(x))) (+ x for micro-sam <= 1.8), from the raw tensors."""
    import torch.nn.functional as F

    adapted = make_adapted(dict(method="adaptformer", blocks="all", bottleneck=8, adaptformer_residual=residual))
    layer = adapted.model.image_encoder.blocks[0].mlp
    w = {k: v.detach() for k, v in layer.state_dict().items()}
    x = torch.randn(1, 4, 4, 64)
    mlp = F.linear(F.gelu(F.linear(x, w["mlp_proj.lin1.weight"], w["mlp_proj.lin1.bias"])),
                   w["mlp_proj.lin2.weight"], w["mlp_proj.lin2.bias"])
    branch = F.linear(torch.relu(F.linear(x, w["down_proj.weight"], w["down_proj.bias"])),
                      w["up_proj.weight"], w["up_proj.bias"])
    assert float(w["alpha"].reshape(-1)[0]) != 1.0  # a learnt scale, not the default
    expected = mlp + w["alpha"] * branch + (x if residual else 0)
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
    """Large-magnitude deltas: the merged weights are the float64 sum rounded once to float32."""
    adapted = make_adapted(dict(method="lora", rank=8, targets=("q", "v", "mlp"), blocks="all"))
    randomize_trainables(adapted.model, seed=3, scale=0.3)
    merged = merge_peft(adapted.model)
    expected = hand_merge(adapted.model.state_dict(), {})
    for k, got in merged.state_dict().items():
        want = expected[k].float()
        ulp = torch.finfo(torch.float32).eps * want.abs().clamp_min(1e-30)
        assert ((got - want).abs() <= ulp).all(), k  # at most one rounding step apart


def test_qlora_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    sam = build_sam_architecture("tiny")
    with pytest.raises(PeftExportError, match="qlora needs bitsandbytes"):
        apply_peft(sam, PeftConfig("qlora", rank=4))
