"""Building SAM, loading every checkpoint format, other image sizes, parameter counts."""

from __future__ import annotations

import pickle

import pytest
import torch

from peft_export.errors import PeftExportError
from peft_export.models import ARCHITECTURES, build_sam_architecture, load_sam, random_sam
from peft_export.peft import PeftConfig, resolve_blocks
from peft_export.peft.params import count_for_config


def test_random_init_is_reproducible_and_warns():
    with pytest.warns(UserWarning, match="only good for testing"):
        a, info = load_sam("tiny", seed=3)
    b = random_sam("tiny", seed=3)
    assert info.sha256 == "random-init"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_official_layout_and_micro_sam_layout_load(tmp_path):
    sam = random_sam("tiny", seed=1)
    torch.save(sam.state_dict(), tmp_path / "official.pth")
    torch.save({"model_state": {"sam." + k: v for k, v in sam.state_dict().items()}, "decoder_state": {}},
               tmp_path / "micro.pt")
    torch.save({"model_state": sam.state_dict(), "decoder_state": {}}, tmp_path / "micro_export.pt")
    for name in ("official.pth", "micro.pt", "micro_export.pt"):
        loaded, info = load_sam(None, tmp_path / name)
        assert info.model_type == "tiny" and info.image_size == 256 and len(info.sha256) == 64
        assert all(torch.equal(x, y) for x, y in zip(sam.state_dict().values(), loaded.state_dict().values()))


def test_type_mismatch_is_refused_by_name(tmp_path):
    torch.save(random_sam("tiny").state_dict(), tmp_path / "t.pth")
    with pytest.raises(PeftExportError, match=r"checkpoint is tiny \(SAM, 64-dim\), --model vit_b was asked"):
        load_sam("vit_b", tmp_path / "t.pth")


def test_bad_files_give_one_line_errors(tmp_path):
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PeftExportError, match="trunc.pth: not a readable PyTorch checkpoint"):
        load_sam(None, tmp_path / "trunc.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(PeftExportError, match="evil.pth: .*(pickled|not a readable)"):
        load_sam(None, tmp_path / "evil.pth")
    torch.save({"foo": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(PeftExportError, match="other.pth: no 'image_encoder"):
        load_sam(None, tmp_path / "other.pth")
    with pytest.raises(PeftExportError, match="missing.pth: checkpoint file not found"):
        load_sam(None, tmp_path / "missing.pth")


@pytest.mark.parametrize("size", [128, 192, 512])
def test_other_image_size_from_checkpoint(tmp_path, size):
    sam = random_sam("tiny", seed=2)
    torch.save(sam.state_dict(), tmp_path / "t.pth")
    small, info = load_sam("tiny", tmp_path / "t.pth", image_size=size)
    g = size // 16
    assert info.image_size == size and small.image_encoder.pos_embed.shape[1:3] == (g, g)
    assert small.prompt_encoder.image_embedding_size == (g, g)
    assert small.image_encoder.blocks[1].attn.rel_pos_h.shape[0] == 2 * g - 1  # global block
    assert small.image_encoder.blocks[0].attn.rel_pos_h.shape[0] == 2 * 7 - 1  # windowed block unchanged
    with torch.no_grad():
        emb = small.image_encoder(torch.randn(1, 3, size, size))
    assert emb.shape == (1, 256, g, g) and torch.isfinite(emb).all()


def test_interpolation_keeps_channels_apart(tmp_path):
    """A per-channel constant pos_embed / rel_pos must stay per-channel constant (no axis mix-up)."""
    sam = random_sam("tiny", seed=2)
    state = sam.state_dict()
    c = torch.arange(64, dtype=torch.float32) / 100
    state["image_encoder.pos_embed"] = c.view(1, 1, 1, 64).expand(1, 16, 16, 64).clone()
    state["image_encoder.blocks.1.attn.rel_pos_h"] = c[:16].view(1, 16).expand(31, 16).clone()
    torch.save(state, tmp_path / "t.pth")
    small, _ = load_sam("tiny", tmp_path / "t.pth", image_size=160)
    assert torch.allclose(small.image_encoder.pos_embed[0], c.view(1, 1, 64).expand(10, 10, 64), atol=1e-6)
    assert torch.allclose(small.image_encoder.blocks[1].attn.rel_pos_h, c[:16].view(1, 16).expand(19, 16), atol=1e-6)


def test_image_size_must_be_multiple_of_16():
    with pytest.raises(PeftExportError, match="multiple of 16"):
        build_sam_architecture("tiny", 250)


def test_paper_parameter_counts():
    """vit_b, LoRA r32 on q,v, all blocks: 1,179,648 encoder parameters (the paper's count; 12 blocks x 2 x 32 x (768 + 768))."""
    counts = count_for_config("vit_b", PeftConfig("lora", rank=32, targets=("q", "v")))
    assert counts["image_encoder"] == 1_179_648
    assert counts["mask_decoder"] > 0 and counts["prompt_encoder"] > 0  # they train by default
    frozen = count_for_config("vit_b", PeftConfig("lora", rank=32, train_mask_decoder=False, train_prompt_encoder=False))
    assert frozen["total"] == 1_179_648
    assert count_for_config("vit_b", PeftConfig("full", blocks="all"))["image_encoder"] == 89_670_912  # 89.67M
    assert count_for_config("vit_b", PeftConfig("fact", rank=16))["image_encoder"] == 301_056  # ~0.30M
    assert count_for_config("vit_b", PeftConfig("ssf"))["image_encoder"] == 204_288  # ~0.20M
    assert count_for_config("vit_b", PeftConfig("adaptformer"))["image_encoder"] == 1_189_644  # ~1.19M
    assert count_for_config("vit_b", PeftConfig("freeze-encoder"))["image_encoder"] == 0
    lora_all = count_for_config("vit_b", PeftConfig("lora", rank=32, targets=("q", "k", "v", "mlp")))["image_encoder"]
    assert lora_all == 12 * (3 * 2 * 768 * 32 + 32 * (768 + 3072) * 2)  # = 4.72M as reported
    assert count_for_config("vit_h", PeftConfig("lora", rank=32, blocks="late"))["image_encoder"] == 16 * 2 * 2 * 1280 * 32


@pytest.mark.parametrize(
    "spec,expected",
    [("all", list(range(12))), ("late", list(range(6, 12))), ("6-11", list(range(6, 12))), ("0,3,5", [0, 3, 5])],
)
def test_block_placement(spec, expected):
    assert resolve_blocks(spec, 12) == expected


@pytest.mark.parametrize("spec", ["12", "3-20", "x", "5-2"])
def test_bad_block_placement(spec):
    with pytest.raises(PeftExportError, match="--blocks"):
        resolve_blocks(spec, 12)


def test_architectures_match_segment_anything():
    from segment_anything import sam_model_registry

    for name in ("vit_b",):
        ours = build_sam_architecture(name)
        theirs = sam_model_registry[name]()
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ARCHITECTURES["vit_l"].global_attn_indexes == (5, 11, 17, 23)
    assert ARCHITECTURES["vit_h"].global_attn_indexes == (7, 15, 23, 31)
