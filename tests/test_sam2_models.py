"""SAM 2.1 behind the model-family seam: built from sam2's own configs, PEFT on Hiera's blocks, an exact merge
that ``sam2.build_sam.build_sam2`` loads strictly, and one-line errors for checkpoints of the wrong family or size.

Random weights and random non-zero adapters; hiera_t at 128 px (the state dict does not depend on the size).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("sam2", reason="sam2 is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)")

from helpers import randomize_trainables  # noqa: E402
from peft_export.errors import PeftExportError  # noqa: E402
from peft_export.merge import compare_models, merge_to_checkpoint  # noqa: E402
from peft_export.models import load_sam, random_sam  # noqa: E402
from peft_export.models.sam2 import SAM2_ARCHITECTURES, random_sam2, sam2_config_name, sam2_overrides  # noqa: E402
from peft_export.peft import PeftConfig, build_adapted_model, merge_peft  # noqa: E402

SIZE = 128
T = "sam2.1_hiera_t"


def adapted_sam2(method: str, **kw):
    cfg = PeftConfig(method, blocks="late", rank=4, **kw)
    adapted = build_adapted_model(cfg, T, None, SIZE, seed=0)
    randomize_trainables(adapted.model, seed=3, scale=0.05)
    return adapted.model.eval(), adapted


def test_architecture_table_matches_sam2s_packaged_configs():
    import inspect

    from hydra import compose
    from sam2.modeling.backbones.hieradet import Hiera

    defaults = {k: v.default for k, v in inspect.signature(Hiera).parameters.items()}
    for model_type, (dim, depth) in SAM2_ARCHITECTURES.items():
        trunk = compose(config_name=sam2_config_name(model_type)).model.image_encoder.trunk
        found = (trunk.get("embed_dim", defaults["embed_dim"]), sum(trunk.get("stages", defaults["stages"])))
        assert found == (dim, depth), model_type


def test_random_sam2_is_reproducible_and_hieras_positional_embeddings_are_not_zero():
    a, b = random_sam2(T, SIZE, seed=4), random_sam2(T, SIZE, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.image_encoder.trunk.pos_embed.abs().min() > 0 and a.image_size == SIZE


def test_late_blocks_are_hieras_last_stages_and_every_method_touches_only_them():
    model, _ = adapted_sam2("lora", targets=("q", "k", "v", "mlp"))
    trunk = model.image_encoder.trunk
    late = list(range(trunk.stage_ends[1] + 1, len(trunk.blocks)))  # stages 3 and 4: blocks 3-11 of hiera_t
    assert late == list(range(3, 12))
    wrapped = sorted({int(n.split(".")[3]) for n, p in model.named_parameters()
                      if p.requires_grad and n.startswith("image_encoder.trunk.blocks.")})
    assert wrapped == late
    assert type(trunk.blocks[3].attn.qkv).__name__ == "QKVLoRA" and type(trunk.blocks[3].mlp).__name__ == "MLPLoRA"
    assert type(trunk.blocks[2].attn.qkv).__name__ == "Linear"
    ssf, _ = adapted_sam2("ssf")
    block = ssf.image_encoder.trunk.blocks[10]  # first block of stage 4: its skip projection changes the width
    assert type(block.proj).__name__ == "ScaleShift" and type(block.mlp.layers[0]).__name__ == "ScaleShift"
    # Only the image path trains: SAM 2's memory modules stay frozen.
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(("memory_", "obj_ptr")))


def test_params_cli_counts_hiera_adapters():
    out = subprocess.run([sys.executable, "-m", "peft_export.cli", "params", "--model", T, "--peft", "lora", "--rank", "4",
                          "--blocks", "late", "--freeze-decoder", "--freeze-prompt-encoder", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import json

    counts = json.loads(out.stdout)
    model, _ = adapted_sam2("lora")
    q_v = sum(p.numel() for n, p in model.named_parameters() if "w_a_linear" in n or "w_b_linear" in n)
    assert counts == {"image_encoder": q_v, "prompt_encoder": 0, "mask_decoder": 0, "total": q_v}


@pytest.mark.slow
@pytest.mark.parametrize("method,kw", [("lora", {"targets": ("q", "k", "v", "mlp")}), ("fact", {}), ("ssf", {})],
                         ids=["lora", "fact", "ssf"])  # the methods whose layers fold (the others copy tensors)
def test_merged_checkpoint_loads_strictly_into_build_sam2_and_equals_the_adapted_model(tmp_path, method, kw):
    from sam2.build_sam import build_sam2

    model, adapted = adapted_sam2(method, **kw)
    out = tmp_path / "merged.pt"
    report = merge_to_checkpoint(adapted, out)
    assert report["passed"] and report["format"].startswith("sam2")
    loaded = build_sam2(sam2_config_name(T), str(out), device="cpu", hydra_overrides_extra=sam2_overrides(SIZE))
    errors = compare_models(model, loaded, SIZE)
    assert errors["embeddings"]["max_rel"] <= 1e-5 and errors["mask_logits"]["max_rel"] <= 1e-5, errors
    # The adapters did something: the folded Hiera weights are not the base's.
    base = random_sam2(T, SIZE, seed=0).state_dict()
    changed = [k for k, v in loaded.state_dict().items() if k.startswith("image_encoder.trunk.blocks.")
               and not torch.equal(v, base[k])]
    assert len(changed) >= 9, changed


@pytest.mark.slow
def test_qlora_on_hiera_quantises_every_trunk_linear_and_merges_to_a_strict_sam2_checkpoint(tmp_path):
    """QLoRA with real bitsandbytes NF4 layers (CPU kernels here): every Linear of Hiera's trunk is 4-bit
    (LoRA on the late blocks' q, v on top), the merge writes plain fp32 that ``build_sam2`` loads strictly
    and that computes what the 4-bit model with its LoRA computes; the quantisation error is reported."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the optional package bitsandbytes")
    from sam2.build_sam import build_sam2

    from peft_export.peft.base import is_4bit

    model, adapted = adapted_sam2("qlora", targets=("q", "v"))
    four_bit = {n.replace(".qkv_proj", "") for n, m in model.named_modules() if is_4bit(m)}  # LoRA wraps qkv
    linears = {n for n, m in random_sam2(T, SIZE, seed=0).image_encoder.trunk.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert four_bit == {f"image_encoder.trunk.{n}" for n in linears} and len(four_bit) > 40
    out = tmp_path / "merged.pt"
    report = merge_to_checkpoint(adapted, out)
    assert report["passed"]
    state = torch.load(out, weights_only=True)["model"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    loaded = build_sam2(sam2_config_name(T), str(out), device="cpu", hydra_overrides_extra=sam2_overrides(SIZE))
    errors = compare_models(model, loaded, SIZE)
    assert errors["embeddings"]["max_rel"] <= 1e-5 and errors["mask_logits"]["max_rel"] <= 1e-5, errors
    assert report["qlora_vs_fp32_base"]["embeddings"]["max_rel"] > 1e-3  # NF4 is not the fp32 base


def test_bf16_merge_is_the_exact_fold_rounded_once_and_runs():
    model, _ = adapted_sam2("lora", targets=("q", "v", "mlp"))
    model = model.to(torch.bfloat16)
    merged = merge_peft(model)
    block = model.image_encoder.trunk.blocks[5]
    qkv = block.attn.qkv
    w = qkv.qkv_proj.weight.double().clone()
    d = w.shape[0] // 3
    w[:d] += qkv.w_b_linear_q.weight.double() @ qkv.w_a_linear_q.weight.double()
    w[2 * d:] += qkv.w_b_linear_v.weight.double() @ qkv.w_a_linear_v.weight.double()
    got = merged.image_encoder.trunk.blocks[5].attn.qkv.weight
    assert got.dtype == torch.bfloat16 and torch.equal(got, w.to(torch.bfloat16))
    mlp = block.mlp
    w1 = mlp.mlp_layer.layers[0].weight.double() + mlp.w_b_linear_1.weight.double() @ mlp.w_a_linear_1.weight.double()
    assert torch.equal(merged.image_encoder.trunk.blocks[5].mlp.layers[0].weight, w1.to(torch.bfloat16))
    errors = compare_models(model, merged, SIZE)  # both in bf16: they differ by its rounding only
    assert errors["mask_iou"] >= 0.95 and errors["embeddings"]["max_rel"] <= 0.05, errors


def test_lora_r4_adapter_file_holds_only_the_adapter(tmp_path):
    from peft_export.peft import save_adapter

    cfg = PeftConfig("lora", blocks="late", rank=4, train_mask_decoder=False, train_prompt_encoder=False)
    adapted = build_adapted_model(cfg, T, None, SIZE, seed=0)
    save_adapter(adapted, tmp_path)
    size_mb = (tmp_path / "adapter.safetensors").stat().st_size / 1e6
    n = sum(p.numel() for p in adapted.model.parameters() if p.requires_grad)
    assert n < 100_000 and size_mb < 4 * n / 1e6 + 0.05, size_mb  # float32 tensors and a small header
    print(f"LoRA r=4 late q,v hiera_t adapter: {size_mb:.3f} MB ({n} parameters)")


def _save(state, path):
    torch.save(state, path)
    return path


def test_checkpoints_of_the_wrong_family_or_size_are_refused_by_name(tmp_path):
    sam1 = _save(random_sam("tiny").state_dict(), tmp_path / "sam1_tiny.pth")
    sam2 = _save({"model": random_sam2(T, SIZE).state_dict()}, tmp_path / "sam2_t.pt")
    with pytest.raises(PeftExportError, match=r"sam1_tiny.pth: checkpoint is tiny \(SAM, 64-dim\), --model sam2.1_hiera_t"):
        load_sam(T, sam1)
    with pytest.raises(PeftExportError, match=r"sam2_t.pt: checkpoint is sam2.1_hiera_t \(SAM 2, Hiera 96-dim, 12 blocks\), "
                                              r"--model vit_b was asked"):
        load_sam("vit_b", sam2)
    with pytest.raises(PeftExportError, match=r"sam2_t.pt: checkpoint is sam2.1_hiera_t .*--model sam2.1_hiera_s"):
        load_sam("sam2.1_hiera_s", sam2)
    with pytest.raises(PeftExportError, match="image size 100: SAM 2 needs a positive multiple of 32"):
        load_sam(T, sam2, image_size=100)
    model, info = load_sam(None, sam2, image_size=SIZE)  # inferred from the weights
    assert info.model_type == T and info.checkpoint == str(sam2)
    # Through the command line: one error line naming the file, exit 2, nothing written.
    out = subprocess.run([sys.executable, "-m", "peft_export.cli", "merge-and-export", "--merged", str(sam1), "--model", T,
                          "--out", str(tmp_path / "export")], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(f"error: {sam1}: checkpoint is tiny")
    assert not (tmp_path / "export").exists()
