"""Merging keeps every module's dtype and device: a bf16 or fp16 model merges into a bf16 or fp16
model, its weights equal to a merge computed by hand from the raw tensors (float64, rounded once),
and the merged model runs."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.merge import compare_models
from peft_export.peft import merge_peft

# Tolerance of merged vs unmerged outputs: both run in the 16-bit dtype, so they differ by its rounding.
OUTPUT_LIMITS = {torch.bfloat16: (0.05, 0.95), torch.float16: (0.01, 0.99)}


def _hand_merge(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The merged state dict in float64, from the adapted model's raw tensors by the methods' formulas."""
    s = {k: v.double() for k, v in state.items()}
    alpha = float(config.get("alpha", 1.0))
    out: dict[str, torch.Tensor] = {}
    for key, value in s.items():
        if re.search(r"\.(w_[ab]_linear_\w+|FacT[uv]|[qv]_FacTs)\.weight$|\.(scale|shift)$", key):
            continue  # adapter tensors: folded into the base keys below
        m = re.match(r"(.*)\.attn\.qkv\.qkv_proj\.(weight|bias)$", key)
        if m:
            prefix, kind = m.groups()
            w = value.clone()
            d = w.shape[0] // 3
            if kind == "weight":
                for i, t in enumerate("qkv"):
                    a = s.get(f"{prefix}.attn.qkv.w_a_linear_{t}.weight")
                    if a is not None:
                        w[i * d:(i + 1) * d] += alpha * (s[f"{prefix}.attn.qkv.w_b_linear_{t}.weight"] @ a)
                u = s.get(f"{prefix}.attn.qkv.FacTu.weight")
                if u is not None:
                    v = s[f"{prefix}.attn.qkv.FacTv.weight"]
                    w[:d] += v @ s[f"{prefix}.attn.qkv.q_FacTs.weight"] @ u
                    w[2 * d:] += v @ s[f"{prefix}.attn.qkv.v_FacTs.weight"] @ u
            out[f"{prefix}.attn.qkv.{kind}"] = w
            continue
        m = re.match(r"(.*)\.mlp\.mlp_layer\.lin([12])\.(weight|bias)$", key)
        if m:
            prefix, n, kind = m.groups()
            w = value.clone()
            if kind == "weight":
                w += alpha * (s[f"{prefix}.mlp.w_b_linear_{n}.weight"] @ s[f"{prefix}.mlp.w_a_linear_{n}.weight"])
            out[f"{prefix}.mlp.lin{n}.{kind}"] = w
            continue
        m = re.match(r"(.*)\.layer\.(weight|bias)$", key)
        if m and f"{m.group(1)}.scale" in s:
            prefix, kind = m.groups()
            scale, shift = s[f"{prefix}.scale"], s[f"{prefix}.shift"]
            if kind == "weight":
                out[f"{prefix}.weight"] = value * scale.view(-1, *([1] * (value.dim() - 1)))
            else:
                out[f"{prefix}.bias"] = value * scale + shift
            continue
        out[key] = value
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(MERGEABLE_CONFIGS))
def test_merge_keeps_dtype_and_equals_hand_merge(name, dtype):
    adapted = make_adapted(MERGEABLE_CONFIGS[name])
    model = adapted.model.to(dtype)
    expected = _hand_merge(model.state_dict(), MERGEABLE_CONFIGS[name])
    merged = merge_peft(model)
    state = merged.state_dict()
    assert state.keys() == expected.keys()
    floating = {k: v for k, v in state.items() if v.is_floating_point()}
    assert {v.dtype for v in floating.values()} == {dtype}, name
    assert {v.device for v in state.values()} == {torch.device("cpu")}
    for key, value in floating.items():
        # Rounded once from the float64 fold: bit-identical to rounding the hand merge.
        assert torch.equal(value, expected[key].to(dtype)), f"{name} {key}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["lora", "fact", "ssf"])  # the methods whose layers fold (others copy)
def test_merged_16bit_model_runs_and_matches(name, dtype):
    # 128 px: 16-bit kernels are slow on CPUs without native bf16/fp16 arithmetic.
    model = make_adapted(MERGEABLE_CONFIGS[name], image_size=128).model.to(dtype)
    merged = merge_peft(model)
    errors = compare_models(model, merged, 128)
    max_rel, min_iou = OUTPUT_LIMITS[dtype]
    assert errors["embeddings"]["max_rel"] <= max_rel and errors["mask_iou"] >= min_iou, errors


def test_hand_merge_is_not_the_identity():
    # The reference above would prove nothing if the adapters were zero or its rules never fired.
    for name in ("lora", "fact", "ssf"):
        state = make_adapted(MERGEABLE_CONFIGS[name]).model.state_dict()
        merged = _hand_merge(state, MERGEABLE_CONFIGS[name])
        base = {k.replace(".qkv_proj.", ".").replace(".mlp_layer.", ".").replace(".layer.", "."): v.double()
                for k, v in state.items()}
        folded = [k for k in merged if k not in state]
        assert folded, name
        assert sum(not torch.allclose(merged[k], base[k]) for k in folded) >= len(folded) // 2, name


@pytest.mark.gpu
def test_merge_on_cuda_keeps_device_and_dtype():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for name in ("lora", "fact", "ssf"):
        model = make_adapted(MERGEABLE_CONFIGS[name]).model.to("cuda", torch.bfloat16)
        expected = _hand_merge({k: v.cpu() for k, v in model.state_dict().items()}, MERGEABLE_CONFIGS[name])
        merged = merge_peft(model)
        state = merged.state_dict()
        assert {v.device.type for v in state.values()} == {"cuda"}, name
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.bfloat16}, name
        for key, value in state.items():
            if value.is_floating_point():
                # float64 matmuls on the GPU may sum in another order than the CPU: one bf16 step at most.
                torch.testing.assert_close(value.cpu(), expected[key].to(torch.bfloat16), rtol=2 ** -7, atol=1e-6)
        errors = compare_models(model, merged, merged.image_encoder.img_size)
        assert errors["embeddings"]["max_rel"] <= 0.05 and errors["mask_iou"] >= 0.95, (name, errors)
