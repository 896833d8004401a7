"""Adapter files, base checks, and micro-sam checkpoint import (their key layout, written here)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.peft.adapters import import_micro_sam, load_adapter, save_adapter
from peft_export.errors import PeftExportError
from peft_export.merge import compare_models
from peft_export.models import build_sam_architecture, random_sam
from peft_export.peft import PeftConfig, merge_peft


def test_adapter_round_trip_gives_the_same_model(tmp_path):
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"])
    save_adapter(adapted, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert meta["peft"]["method"] == "lora" and meta["base"]["model_type"] == "tiny"
    assert meta["base"]["sha256"] == "random-init" and meta["intensity"]["name"] == "percentile"
    loaded = load_adapter(tmp_path / "run")
    assert compare_models(adapted.model, loaded.model, 256)["embeddings"]["max_abs"] == 0.0


def test_adapter_holds_only_trained_tensors(tmp_path):
    adapted = make_adapted(dict(method="lora", rank=4, blocks="late", train_mask_decoder=False, train_prompt_encoder=False))
    save_adapter(adapted, tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter.safetensors"))
    assert tensors and all("w_a_linear" in k or "w_b_linear" in k for k in tensors)
    n_params = sum(v.numel() for v in tensors.values())
    n_model = sum(p.numel() for p in adapted.model.parameters())
    assert n_params < 0.05 * n_model


def test_adapter_on_other_base_is_refused_then_forced(tmp_path):
    base_a = tmp_path / "a.pth"
    base_b = tmp_path / "b.pth"
    torch.save(random_sam("tiny", seed=1).state_dict(), base_a)
    torch.save(random_sam("tiny", seed=2).state_dict(), base_b)
    from peft_export.peft.adapters import build_adapted_model

    adapted = build_adapted_model(PeftConfig("lora", rank=2), "tiny", base_a)
    save_adapter(adapted, tmp_path / "run")
    assert load_adapter(tmp_path / "run").base.checkpoint == str(base_a)  # recorded path reused
    with pytest.raises(PeftExportError, match="sha256.*--force"):
        load_adapter(tmp_path / "run", checkpoint=base_b)
    with pytest.warns(UserWarning, match="differs"):
        load_adapter(tmp_path / "run", checkpoint=base_b, force=True)
    with pytest.raises(PeftExportError, match="image size 256"):
        load_adapter(tmp_path / "run", image_size=512)


def test_adapter_on_other_model_type_is_refused(tmp_path):
    adapted = make_adapted(dict(method="lora", rank=2))
    save_adapter(adapted, tmp_path / "run")
    other = tmp_path / "vit.pth"
    sam = build_sam_architecture("tiny")
    state = sam.state_dict()
    # A checkpoint of a different architecture: drop two blocks -> not tiny.
    state = {k: v for k, v in state.items() if not k.startswith(("image_encoder.blocks.2.", "image_encoder.blocks.3."))}
    torch.save(state, other)
    with pytest.raises(PeftExportError, match="unknown SAM encoder|trained on tiny"):
        load_adapter(tmp_path / "run", checkpoint=other)


def test_corrupt_adapter_is_a_clear_error(tmp_path):
    adapted = make_adapted(dict(method="lora", rank=2))
    save_adapter(adapted, tmp_path / "run")
    (tmp_path / "run" / "adapter.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(PeftExportError, match="adapter.safetensors: not a readable safetensors"):
        load_adapter(tmp_path / "run")


def test_weights_and_json_from_different_saves_are_refused(tmp_path):
    """adapter.json records the sha256 of its adapter.safetensors: a mixed pair is refused by name."""
    first, second = tmp_path / "first", tmp_path / "second"
    save_adapter(make_adapted(dict(method="lora", rank=2), seed=1), first)
    save_adapter(make_adapted(dict(method="lora", rank=2), seed=2), second)
    meta = json.loads((first / "adapter.json").read_text())
    from peft_export.fsutil import sha256_file

    assert meta["weights_sha256"] == sha256_file(first / "adapter.safetensors")
    # as a crash between the two renames leaves it: the new weights beside the old adapter.json
    (first / "adapter.safetensors").write_bytes((second / "adapter.safetensors").read_bytes())
    with pytest.raises(PeftExportError, match=r"first/adapter.safetensors: sha256 .* recorded in .*first/adapter.json"):
        load_adapter(first)
    # an adapter saved before the digest was recorded still loads (the check is skipped)
    del meta["weights_sha256"]
    (first / "adapter.json").write_text(json.dumps(meta))
    assert load_adapter(first).meta.get("weights_sha256") is None


# ---------------------------------------------------------------- micro-sam import
# The checkpoint is built by renaming a plain SAM state dict per micro-sam's key layout
# (micro_sam/models/peft_sam.py's module names), independently of our PEFT modules; expected outputs use hand-merged weights.


def _micro_sam_file(path, state: dict) -> None:
    torch.save({"model_state": {"sam." + k: v for k, v in state.items()}, "optimizer_state": {}}, path)


def _rand(*shape, g):
    return torch.randn(*shape, generator=g) * 0.05


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v", "mlp")])
def test_micro_sam_lora_import_matches_hand_merge(tmp_path, targets):
    g = torch.Generator().manual_seed(0)
    base = random_sam("tiny", seed=5)
    plain = base.state_dict()
    ckpt, expected = {}, dict(plain)
    d, r, blocks = 64, 4, [2, 3]
    for k, v in plain.items():
        ckpt[k] = v
    for i in blocks:
        p = f"image_encoder.blocks.{i}."
        ckpt[p + "attn.qkv.qkv_proj.weight"] = ckpt.pop(p + "attn.qkv.weight")
        ckpt[p + "attn.qkv.qkv_proj.bias"] = ckpt.pop(p + "attn.qkv.bias")
        w = plain[p + "attn.qkv.weight"].clone()
        for j, t in enumerate("qkv"):
            if t in targets:
                a, b = _rand(r, d, g=g), _rand(d, r, g=g)
                ckpt[p + f"attn.qkv.w_a_linear_{t}.weight"], ckpt[p + f"attn.qkv.w_b_linear_{t}.weight"] = a, b
                w[j * d : (j + 1) * d] += b @ a
        expected[p + "attn.qkv.weight"] = w
        if "mlp" in targets:
            for n, (i_dim, o_dim) in (("1", (d, 4 * d)), ("2", (4 * d, d))):
                ckpt[p + f"mlp.mlp_layer.lin{n}.weight"] = ckpt.pop(p + f"mlp.lin{n}.weight")
                ckpt[p + f"mlp.mlp_layer.lin{n}.bias"] = ckpt.pop(p + f"mlp.lin{n}.bias")
                a, b = _rand(r, i_dim, g=g), _rand(o_dim, r, g=g)
                ckpt[p + f"mlp.w_a_linear_{n}.weight"], ckpt[p + f"mlp.w_b_linear_{n}.weight"] = a, b
                expected[p + f"mlp.lin{n}.weight"] = plain[p + f"mlp.lin{n}.weight"] + b @ a
    _micro_sam_file(tmp_path / "ms.pt", ckpt)
    cfg = PeftConfig("lora", rank=r, blocks="2-3", targets=targets, ssf_patch_embed=False)
    adapted = import_micro_sam(tmp_path / "ms.pt", cfg, "tiny")
    reference = build_sam_architecture("tiny")
    reference.load_state_dict(expected)
    assert compare_models(reference, merge_peft(adapted.model), 256)["embeddings"]["max_rel"] <= 1e-5
    assert compare_models(reference, adapted.model, 256)["mask_logits"]["max_rel"] <= 1e-4


def test_micro_sam_fact_and_ssf_import_match_hand_merge(tmp_path):
    g = torch.Generator().manual_seed(1)
    plain = random_sam("tiny", seed=6).state_dict()
    d, r = 64, 3
    # FacT on block 1
    ckpt, expected = dict(plain), dict(plain)
    p = "image_encoder.blocks.1.attn.qkv."
    ckpt[p + "qkv_proj.weight"] = ckpt.pop(p + "weight")
    ckpt[p + "qkv_proj.bias"] = ckpt.pop(p + "bias")
    u, v, sq, sv = _rand(r, d, g=g), _rand(d, r, g=g), _rand(r, r, g=g) * 20, _rand(r, r, g=g) * 20
    ckpt.update({p + "FacTu.weight": u, p + "FacTv.weight": v, p + "q_FacTs.weight": sq, p + "v_FacTs.weight": sv})
    w = plain[p + "weight"].clone()
    w[:d] += v @ sq @ u
    w[2 * d :] += v @ sv @ u
    expected[p + "weight"] = w
    _micro_sam_file(tmp_path / "fact.pt", ckpt)
    adapted = import_micro_sam(tmp_path / "fact.pt", PeftConfig("fact", rank=r, blocks="1"))
    reference = build_sam_architecture("tiny")
    reference.load_state_dict(expected)
    assert compare_models(reference, merge_peft(adapted.model), 256)["embeddings"]["max_rel"] <= 1e-5

    # SSF on block 0 (norm1 and lin1 folded by hand); micro-sam never wraps the patch embedding
    ckpt, expected = dict(plain), dict(plain)
    p = "image_encoder.blocks.0."
    layers = {"attn.qkv": 3 * d, "attn.proj": d, "mlp.lin1": 4 * d, "mlp.lin2": d, "norm1": d, "norm2": d}
    for name, dim in layers.items():
        s, t = 1 + _rand(dim, g=g) * 4, _rand(dim, g=g)
        for suffix in ("weight", "bias"):
            ckpt[p + f"{name}.layer.{suffix}"] = ckpt.pop(p + f"{name}.{suffix}")
        ckpt[p + f"{name}.scale"], ckpt[p + f"{name}.shift"] = s, t
        wkey = p + f"{name}.weight"
        expected[wkey] = plain[wkey] * (s[:, None] if plain[wkey].ndim == 2 else s)
        expected[p + f"{name}.bias"] = plain[p + f"{name}.bias"] * s + t
    _micro_sam_file(tmp_path / "ssf.pt", ckpt)
    adapted = import_micro_sam(tmp_path / "ssf.pt", PeftConfig("ssf", blocks="0", ssf_patch_embed=False))
    reference = build_sam_architecture("tiny")
    reference.load_state_dict(expected)
    assert compare_models(reference, merge_peft(adapted.model), 256)["embeddings"]["max_rel"] <= 1e-5


@pytest.mark.parametrize("residual", [False, True])
def test_micro_sam_adaptformer_import_both_variants(tmp_path, residual):
    g = torch.Generator().manual_seed(2)
    plain = random_sam("tiny", seed=7).state_dict()
    ckpt = dict(plain)
    p = "image_encoder.blocks.3.mlp."
    for n in ("1", "2"):
        for suffix in ("weight", "bias"):
            ckpt[p + f"mlp_proj.lin{n}.{suffix}"] = ckpt.pop(p + f"lin{n}.{suffix}")
    down_w, down_b, up_w, up_b = _rand(16, 64, g=g), _rand(16, g=g), _rand(64, 16, g=g), _rand(64, g=g)
    ckpt.update({p + "down_proj.weight": down_w, p + "down_proj.bias": down_b, p + "up_proj.weight": up_w,
                 p + "up_proj.bias": up_b, p + "alpha": torch.tensor([1.7])})
    _micro_sam_file(tmp_path / "af.pt", ckpt)
    cfg = PeftConfig("adaptformer", blocks="3", bottleneck=16, adaptformer_residual=residual)
    adapted = import_micro_sam(tmp_path / "af.pt", cfg)
    mlp = adapted.model.image_encoder.blocks[3].mlp
    x = torch.randn(2, 5, 64, generator=g)
    lin1 = lambda z: z @ plain[p + "lin1.weight"].t() + plain[p + "lin1.bias"]  # noqa: E731
    lin2 = lambda z: z @ plain[p + "lin2.weight"].t() + plain[p + "lin2.bias"]  # noqa: E731
    branch = torch.relu(x @ down_w.t() + down_b) @ up_w.t() + up_b
    expected = lin2(torch.nn.functional.gelu(lin1(x))) + 1.7 * branch + (x if residual else 0)
    assert torch.allclose(mlp(x), expected, atol=1e-5)


def test_micro_sam_with_wrong_method_says_so(tmp_path):
    _micro_sam_file(tmp_path / "plain.pt", random_sam("tiny").state_dict())
    with pytest.raises(PeftExportError, match="check --peft lora"):
        import_micro_sam(tmp_path / "plain.pt", PeftConfig("lora", rank=4))


@pytest.mark.slow
def test_vit_b_lora_adapter_is_a_few_mb(tmp_path):
    """vit_b LoRA r32 on q,v: 1,179,648 parameters = 4.7 MB in fp32, not the 375 MB model."""
    from peft_export.peft.adapters import build_adapted_model

    cfg = PeftConfig("lora", rank=32, targets=("q", "v"), train_mask_decoder=False, train_prompt_encoder=False)
    adapted = build_adapted_model(cfg, "vit_b")
    save_adapter(adapted, tmp_path)
    size = (tmp_path / "adapter.safetensors").stat().st_size
    assert 4.7e6 <= size < 4.8e6
    with_decoder = build_adapted_model(PeftConfig("lora", rank=32), "vit_b")
    save_adapter(with_decoder, tmp_path / "dec")
    assert (tmp_path / "dec" / "adapter.safetensors").stat().st_size < 25e6  # + the 4.06M-parameter decoder
