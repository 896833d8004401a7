"""QLoRA with real bitsandbytes 4-bit layers: quantised at once on their device (the CPU here, where
bitsandbytes has CPU 4-bit kernels; CUDA in benchmarks/gpu_check.sh), merged into a plain fp32 SAM
whose every Linear is the dequantised 4-bit weight plus the LoRA delta, and that loads like an
official checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="QLoRA needs the optional package bitsandbytes")

import bitsandbytes.functional as bnbf  # noqa: E402

from helpers import make_adapted, randomize_trainables  # noqa: E402
from peft_export.merge import format_merge_report, merge_and_verify, merge_to_checkpoint  # noqa: E402
from peft_export.models import build_sam_architecture, load_sam  # noqa: E402
from peft_export.peft import PeftConfig, load_adapter, merge_peft, save_adapter  # noqa: E402
from peft_export.peft.adapters import build_adapted_model  # noqa: E402
from peft_export.peft.base import is_4bit  # noqa: E402
from peft_export.peft.qlora import qlora_device  # noqa: E402

QLORA = dict(method="qlora", rank=4, targets=("q", "v"), blocks="late")
SIZE = 128


def _four_bit(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if is_4bit(m)}


def _expected_merge(model: torch.nn.Module, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Merged encoder Linear weights from raw tensors: bitsandbytes' dequantised NF4 plus alpha * B @ A."""
    enc = model.image_encoder
    out = {}
    for name, m in _four_bit(enc).items():
        out[name.replace(".qkv_proj", "")] = bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).double().cpu()
    for name, m in enc.named_modules():
        for i, t in enumerate("qkv"):
            a = getattr(m, f"w_a_linear_{t}", None)
            if a is not None:
                d = m.out_dim
                b = getattr(m, f"w_b_linear_{t}")
                out[name][i * d:(i + 1) * d] += alpha * (b.weight.double().cpu() @ a.weight.double().cpu())
    return out


def _embeddings_rel(merged: torch.nn.Module, four_bit_model: torch.nn.Module, size: int) -> float:
    """Max relative difference of the merged fp32 encoder's embeddings vs the 4-bit model's (with its
    LoRA) on a probe image, each on its own device: recomputed here, not the merge report's verdict."""
    from peft_export.merge import probe_inputs

    image, _ = probe_inputs(size, seed=2)
    with torch.no_grad():
        want = four_bit_model.eval().image_encoder(image.to(next(four_bit_model.parameters()).device)).double().cpu()
        got = merged.eval().image_encoder(image.to(next(merged.parameters()).device)).double().cpu()
    return float((got - want).abs().max() / want.abs().max())


def test_every_encoder_linear_is_quantised_at_once_on_its_device():
    model = make_adapted(QLORA, image_size=SIZE).model
    four_bit = _four_bit(model.image_encoder)
    depth = len(model.image_encoder.blocks)
    assert len(four_bit) == 4 * depth  # qkv, proj, lin1, lin2 of every block, wrapped by LoRA or not
    device = qlora_device()
    for name, m in four_bit.items():
        assert m.weight.bnb_quantized and m.weight.quant_state is not None, name
        assert m.weight.device.type == device.type and m.weight.dtype == torch.uint8, name
    assert {p.device.type for p in model.parameters()} == {device.type}


def test_merge_is_plain_fp32_sam_of_dequantised_weights_plus_lora():
    adapted = make_adapted(QLORA, image_size=SIZE)
    expected = _expected_merge(adapted.model)
    merged, report = merge_and_verify(adapted)
    assert not _four_bit(merged)
    state = merged.state_dict()
    plain = build_sam_architecture("tiny", SIZE)
    assert state.keys() == plain.state_dict().keys()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    plain.load_state_dict(state, strict=True)
    for name, weight in expected.items():
        torch.testing.assert_close(merged.image_encoder.get_submodule(name).weight.double().cpu(), weight,
                                   rtol=0, atol=1e-6)
    # The 4-bit base is really quantised: close to the fp32 base, not equal to it.
    fp32, _ = load_sam("tiny", None, SIZE, seed=adapted.base.seed, warn_random=False)
    w0 = fp32.image_encoder.blocks[0].mlp.lin1.weight.detach().double()
    wq = expected["blocks.0.mlp.lin1"]
    rel = float((wq - w0).norm() / w0.norm())
    assert 1e-3 < rel < 0.2, rel
    assert _embeddings_rel(merged, adapted.model, SIZE) <= 1e-4
    assert report["errors"]["embeddings"]["max_rel"] <= 1e-4
    q = report["qlora_vs_fp32_base"]
    assert 1e-4 < q["embeddings"]["max_rel"] < 1.0, q  # the quantisation error, reported
    assert "QLoRA vs the same LoRA on the fp32 base" in format_merge_report(report)


def test_qlora_adapter_merges_to_a_checkpoint_that_loads_strictly(tmp_path):
    adapted = make_adapted(QLORA, image_size=SIZE)
    save_adapter(adapted, tmp_path / "run")
    loaded = load_adapter(tmp_path / "run")
    assert all(m.weight.quant_state is not None for m in _four_bit(loaded.model).values())
    report = merge_to_checkpoint(loaded, tmp_path / "merged.pth")
    state = torch.load(tmp_path / "merged.pth", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    assert {v.device.type for v in state.values()} == {"cpu"}
    plain = build_sam_architecture("tiny", SIZE)
    plain.load_state_dict(state, strict=True)
    assert _embeddings_rel(plain, loaded.model, SIZE) <= 1e-4  # the file computes what the adapter does
    written = json.loads(Path(report["report_path"]).read_text())
    assert written["qlora_vs_fp32_base"]["embeddings"]["max_rel"] > 1e-4


def _vit_b_qlora():
    adapted = build_adapted_model(PeftConfig(**QLORA), "vit_b", None, None, seed=0)
    randomize_trainables(adapted.model, seed=3)
    return adapted


@pytest.mark.slow
def test_vit_b_qlora_merge_loads_with_sam_model_registry(tmp_path):
    # The real architecture's keys, shapes and dtypes (no forward at 1024 on the CPU: the tiny tests
    # above check the numbers; the GPU test below runs the verified merge on vit_b).
    from segment_anything import sam_model_registry

    merged = merge_peft(_vit_b_qlora().model)
    assert not _four_bit(merged)
    state = {k: v.cpu() for k, v in merged.state_dict().items()}
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    torch.save(state, tmp_path / "merged.pth")
    sam = sam_model_registry["vit_b"](checkpoint=str(tmp_path / "merged.pth"))  # strict, as for Meta's files
    qkv = sam.image_encoder.blocks[11].attn.qkv.weight
    assert torch.equal(qkv, state["image_encoder.blocks.11.attn.qkv.weight"])


@pytest.mark.gpu
def test_qlora_on_cuda_merges_and_loads_with_sam_model_registry(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from segment_anything import sam_model_registry

    adapted = _vit_b_qlora()
    assert {m.weight.device.type for m in _four_bit(adapted.model).values()} == {"cuda"}
    report = merge_to_checkpoint(adapted, tmp_path / "merged.pth")
    sam = sam_model_registry["vit_b"](checkpoint=str(tmp_path / "merged.pth"))
    assert not _four_bit(sam)
    for name, weight in _expected_merge(adapted.model).items():  # the formula, from the 4-bit layers
        torch.testing.assert_close(sam.image_encoder.get_submodule(name).weight.double(), weight, rtol=0, atol=1e-6)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for both sides
    assert _embeddings_rel(sam.cuda(), adapted.model, 1024) <= 1e-4
    assert report["qlora_vs_fp32_base"]["embeddings"]["max_rel"] > 1e-4
