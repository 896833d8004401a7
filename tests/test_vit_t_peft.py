"""PEFT on vit_t (TinyViT): per-head q/k/v channels, exact merge into plain MobileSAM keys, micro-sam bases."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from helpers import randomize_trainables
from peft_export.errors import PeftExportError
from peft_export.merge import compare_models, format_merge_report, merge_to_checkpoint
from peft_export.models import build_sam_architecture, load_sam, random_sam
from peft_export.models.encoder_split import encode_with_frozen_prefix, first_trainable_block
from peft_export.peft import PeftConfig, apply_peft, load_adapter, merge_peft, save_adapter
from peft_export.peft.adapters import build_adapted_model, import_micro_sam

warnings.filterwarnings("ignore", message="no checkpoint given")

SIZE = 256
HEAD_DIM = 32  # dim / heads in every TinyViT block

CONFIGS = {
    "lora": dict(method="lora", rank=4, targets=("q", "k", "v", "mlp"), blocks="late", alpha=1.5),
    "lora-qv": dict(method="lora", rank=3, targets=("q", "v"), blocks="all"),
    "fact": dict(method="fact", rank=4, blocks="0,2,9"),
    "ssf": dict(method="ssf", blocks="1-3"),
    "attention": dict(method="attention", blocks="late"),
    "bias": dict(method="bias", blocks="all"),
    "layernorm": dict(method="layernorm", blocks="0,8"),
    "full": dict(method="full", blocks="late"),
    "full-all": dict(method="full", blocks="all"),
}


def adapted_vit_t(config: dict, seed: int = 0):
    adapted = build_adapted_model(PeftConfig(**config), "vit_t", None, SIZE, seed=seed)
    randomize_trainables(adapted.model, seed=seed + 10, scale=0.05)
    return adapted


def hand_merge(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The merged MobileSAM state from raw adapter tensors, with TinyViT's per-head qkv rows spelled out:
    head h owns rows [96h, 96h+32) for q, [96h+32, 96h+64) for k, [96h+64, 96h+96) for v."""
    s = {k: v.double() for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in s.items():
        if re.search(r"\.(w_[ab]_linear_\w+|FacT[uv]|[qv]_FacTs)\.weight$|\.(scale|shift)$", key):
            continue
        m = re.match(r"(.*)\.attn\.qkv\.qkv_proj\.(weight|bias)$", key)
        if m:
            prefix, kind = m.groups()
            w = value.clone()
            if kind == "weight":
                heads = w.shape[0] // (3 * HEAD_DIM)
                for i, t in enumerate("qkv"):
                    deltas = []
                    if f"{prefix}.attn.qkv.w_a_linear_{t}.weight" in s:
                        deltas.append(alpha * s[f"{prefix}.attn.qkv.w_b_linear_{t}.weight"]
                                      @ s[f"{prefix}.attn.qkv.w_a_linear_{t}.weight"])
                    if t != "k" and f"{prefix}.attn.qkv.FacTu.weight" in s:
                        deltas.append(s[f"{prefix}.attn.qkv.FacTv.weight"] @ s[f"{prefix}.attn.qkv.{t}_FacTs.weight"]
                                      @ s[f"{prefix}.attn.qkv.FacTu.weight"])
                    for delta in deltas:
                        for h in range(heads):
                            rows = slice(h * 3 * HEAD_DIM + i * HEAD_DIM, h * 3 * HEAD_DIM + (i + 1) * HEAD_DIM)
                            w[rows] += delta[h * HEAD_DIM:(h + 1) * HEAD_DIM]
            out[f"{prefix}.attn.qkv.{kind}"] = w
            continue
        m = re.match(r"(.*)\.mlp\.mlp_layer\.(fc[12]|norm)\.(weight|bias)$", key)
        if m:
            prefix, layer, kind = m.groups()
            w = value.clone()
            if kind == "weight" and layer != "norm":
                n = layer[-1]
                w += alpha * (s[f"{prefix}.mlp.w_b_linear_{n}.weight"] @ s[f"{prefix}.mlp.w_a_linear_{n}.weight"])
            out[f"{prefix}.mlp.{layer}.{kind}"] = w
            continue
        m = re.match(r"(.*)\.layer\.((?:bn\.|c\.)?)(weight|bias|running_mean|running_var|num_batches_tracked)$", key)
        if m and f"{m.group(1)}.scale" in s:
            prefix, sub, kind = m.groups()
            scale, shift = s[f"{prefix}.scale"], s[f"{prefix}.shift"]
            if sub == "c." or kind not in ("weight", "bias"):
                out[f"{prefix}.{sub}{kind}"] = value  # the conv before BatchNorm and the statistics stay
            elif kind == "weight":
                out[f"{prefix}.{sub}weight"] = value * scale.view(-1, *([1] * (value.dim() - 1)))
            else:
                out[f"{prefix}.{sub}bias"] = value * scale + shift
            continue
        out[key] = value
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_is_exact_against_hand_merge_and_the_adapter_model(name):
    config = CONFIGS[name]
    adapted = adapted_vit_t(config)
    model = adapted.model.eval()
    state = model.state_dict()
    merged = merge_peft(model)
    expected = hand_merge(state, config.get("alpha", 1.0))
    got = merged.state_dict()
    assert set(got) == set(build_sam_architecture("vit_t").state_dict()) == set(expected)
    for k, v in got.items():
        ref = expected[k]
        if v.is_floating_point():
            assert (v.double() - ref).abs().max() <= 1e-5 * max(ref.abs().max().item(), 1e-6), k
        else:
            assert torch.equal(v, ref.to(v.dtype)), k
    base = random_sam("vit_t", SIZE, seed=0).state_dict()
    changed = [k for k in got if k.startswith("image_encoder.") and not torch.equal(got[k], base[k])]
    assert changed, "the adapter changed nothing: the test would prove nothing"
    errors = compare_models(model, merged, SIZE)
    assert errors["embeddings"]["max_rel"] <= 1e-5 and errors["mask_logits"]["max_rel"] <= 1e-5


def test_lora_updates_exactly_the_per_head_channels():
    """A q-only LoRA moves only each head's q rows; k-only only k rows; v-only only v rows."""
    for i, t in enumerate("qkv"):
        adapted = adapted_vit_t(dict(method="lora", rank=2, targets=(t,), blocks="9"))
        qkv = adapted.model.image_encoder.blocks[9].attn.qkv
        x = torch.randn(5, 320)
        with torch.no_grad():
            delta = (qkv(x) - qkv.qkv_proj(x)).abs().amax(0)
        rows = torch.arange(960).view(10, 3, HEAD_DIM)[:, i].flatten()
        assert delta[rows].min() > 0
        mask = torch.ones(960, dtype=torch.bool)
        mask[rows] = False
        assert delta[mask].max() == 0


def test_late_means_the_last_five_of_ten_blocks_and_trains_without_autograd_before():
    adapted = adapted_vit_t(CONFIGS["lora"])
    enc = adapted.model.image_encoder
    assert len(enc.blocks) == 10
    wrapped = [i for i, b in enumerate(enc.blocks) if hasattr(b.attn.qkv, "qkv_proj")]
    assert wrapped == [5, 6, 7, 8, 9]
    first = first_trainable_block(adapted.model)
    assert first == 5
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = enc(x)
    out = encode_with_frozen_prefix(adapted.model, x, first)
    assert torch.allclose(out, ref, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is None for p in enc.blocks[4].parameters())
    assert enc.blocks[5].attn.qkv.w_a_linear_q.weight.grad is not None
    full = adapted_vit_t(CONFIGS["full-all"]).model
    assert first_trainable_block(full) is None
    assert not any(p.requires_grad for n, p in full.image_encoder.named_parameters() if "head" in n)


def test_adaptformer_runs_and_refuses_to_merge():
    adapted = adapted_vit_t(dict(method="adaptformer", blocks="late", bottleneck=8))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        out = adapted.model.image_encoder(x)
        base = random_sam("vit_t", SIZE, seed=0).image_encoder(x)
    assert out.shape == base.shape and not torch.allclose(out, base)
    with pytest.raises(PeftExportError, match="adaptformer cannot be merged"):
        merge_peft(adapted.model)


def test_adapter_round_trip_and_merge_file_loads_in_mobile_sam(tmp_path):
    adapted = adapted_vit_t(CONFIGS["lora"])
    save_adapter(adapted, tmp_path / "run")
    again = load_adapter(tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(adapted.model.state_dict().values(),
                                                  again.model.state_dict().values()))
    report = merge_to_checkpoint(again, tmp_path / "merged.pth")
    assert report["passed"]
    assert "trained at 256 px: pass --image-size 256" in format_merge_report(report)
    state = torch.load(tmp_path / "merged.pth", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mobile_sam = pytest.importorskip("mobile_sam")
        theirs = mobile_sam.sam_model_registry["vit_t"]()
    theirs.load_state_dict(state, strict=True)
    ours, info = load_sam(None, tmp_path / "merged.pth")
    assert info.model_type == "vit_t" and info.image_size == 1024  # MobileSAM's size, as its loader
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())


@pytest.mark.slow
def test_merged_lora_equals_mobile_sam_at_1024():
    adapted = build_adapted_model(PeftConfig(**CONFIGS["lora"]), "vit_t", None, 1024, seed=1)
    randomize_trainables(adapted.model, seed=4)
    merged = merge_peft(adapted.model.eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pytest.importorskip("mobile_sam").sam_model_registry["vit_t"]()
    theirs.load_state_dict(merged.state_dict(), strict=True)
    theirs.eval()
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = adapted.model.image_encoder(x), merged.image_encoder(x), theirs.image_encoder(x)
    scale = c.abs().max()
    assert (a - c).abs().max() <= 1e-5 * scale and (b - c).abs().max() <= 1e-5 * scale


def test_micro_sam_vit_t_checkpoint_is_a_base(tmp_path):
    """A fully fine-tuned micro-sam vit_t file (model_state with 'sam.' keys + decoder_state) as a PEFT base."""
    src = random_sam("vit_t", 1024, seed=7)
    path = tmp_path / "vit_t_lm.pt"
    torch.save({"model_state": {"sam." + k: v for k, v in src.state_dict().items()}, "decoder_state": {}}, path)
    adapted = build_adapted_model(PeftConfig(**CONFIGS["lora-qv"]), "vit_t", path, SIZE)
    assert adapted.base.model_type == "vit_t" and adapted.base.checkpoint == str(path)
    assert torch.equal(adapted.model.image_encoder.layers[3].blocks[1].attn.attention_biases,
                       src.image_encoder.layers[3].blocks[1].attn.attention_biases)
    imported = import_micro_sam(path, PeftConfig(method="freeze-encoder"), "vit_t")
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in imported.model.state_dict().items())
    with pytest.raises(PeftExportError, match="checkpoint is vit_t"):
        import_micro_sam(path, PeftConfig(method="freeze-encoder"), "vit_b")


def test_qlora_on_vit_t_merges_to_plain_mobile_sam_keys():
    pytest.importorskip("bitsandbytes")
    from peft_export.peft.qlora import qlora_device

    try:
        qlora_device()
    except PeftExportError as exc:
        pytest.skip(str(exc))
    adapted = adapted_vit_t(dict(method="qlora", rank=2, targets=("q", "v"), blocks="9"))
    merged = merge_peft(adapted.model.eval())
    assert set(merged.state_dict()) == set(build_sam_architecture("vit_t").state_dict())
    errors = compare_models(adapted.model, merged, SIZE)
    assert errors["embeddings"]["max_rel"] <= 1e-4


def test_counting_trainables_on_meta_device():
    from peft_export.peft.params import count_for_config

    counts = count_for_config("vit_t", PeftConfig(method="lora", rank=4, targets=("q", "v"), blocks="late"))
    # per block: q and v pairs of (dim*4 + 4*dim); blocks 5-7 dim 160, 8-9 dim 320
    assert counts["image_encoder"] == 3 * 2 * 2 * 4 * 160 + 2 * 2 * 2 * 4 * 320
    sam = build_sam_architecture("vit_t", SIZE)
    with pytest.raises(PeftExportError, match="block 10 is out of range"):
        apply_peft(sam, PeftConfig(method="lora", blocks="10"))
