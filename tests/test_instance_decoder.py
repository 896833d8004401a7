"""micro-sam's instance decoder (AIS) as a model: micro-sam-layout weights load strictly through every
model source and stay with the model (adapter files, merge), and it equals torch-em's UNETR."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.errors import PeftExportError
from peft_export.merge import merge_to_checkpoint
from peft_export.models import InstanceDecoder, decoder_from_state, load_sam_and_decoder, random_sam
from peft_export.peft import PeftConfig
from peft_export.peft.adapters import load_adapter, load_model_source, save_adapter

FEATURES = (512, 256, 128, 64)


def micro_sam_decoder_state(conv_transpose: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``decoder_state`` written key by key from torch-em's UNETR layout (backbone "sam",
    use_skip_connection=False, out_channels=3), not by our module: 66 tensors."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}

    def upsampler(prefix: str, cin: int, cout: int) -> None:
        if conv_transpose:  # SingleDeconv2DBlock: ConvTranspose2d(k=2, s=2)
            shapes[f"{prefix}.block.weight"] = (cin, cout, 2, 2)
            shapes[f"{prefix}.block.bias"] = (cout,)
        else:  # Upsampler2d: interpolate, then Conv2d 1x1
            shapes[f"{prefix}.conv.weight"] = (cout, cin, 1, 1)
            shapes[f"{prefix}.conv.bias"] = (cout,)

    def conv_block(prefix: str, cin: int, cout: int) -> None:  # ConvBlock2d with InstanceNorm (no weights)
        shapes[f"{prefix}.block.1.weight"] = (cout, cin, 3, 3)
        shapes[f"{prefix}.block.1.bias"] = (cout,)
        shapes[f"{prefix}.block.4.weight"] = (cout, cout, 3, 3)
        shapes[f"{prefix}.block.4.bias"] = (cout,)

    for i, (cin, cout) in enumerate([(256, 512), (512, 256), (256, 128), (128, 64)], start=1):  # Deconv2DBlock
        upsampler(f"deconv{i}.block.0", cin, cout)
        shapes[f"deconv{i}.block.1.block.weight"] = (cout, cout, 3, 3)
        shapes[f"deconv{i}.block.1.block.bias"] = (cout,)
        for stat in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"deconv{i}.block.2.{stat}"] = (cout,)
        shapes[f"deconv{i}.block.2.num_batches_tracked"] = ()
    conv_block("base", 256, 512)
    for i, (cin, cout) in enumerate([(512, 256), (256, 128), (128, 64)]):
        conv_block(f"decoder.blocks.{i}", cin, cout)  # input: upsampled (cout) + centre of the skip (cout)
        upsampler(f"decoder.samplers.{i}", cin, cout)
    upsampler("deconv_out", 64, 64)
    conv_block("decoder_head", 128, 64)
    shapes["out_conv.weight"] = (3, 64, 1, 1)
    shapes["out_conv.bias"] = (3,)
    state = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7, dtype=torch.int64)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("running_mean"):
            state[k] = torch.randn(shape, generator=g) * 0.1
        elif k.endswith(".weight") and len(shape) == 1:  # BatchNorm scale
            state[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            state[k] = torch.randn(shape, generator=g) / np.sqrt(fan_in)
    return state


def _equal_state(decoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = decoder.state_dict()
    return set(own) == set(state) and all(torch.equal(own[k].cpu(), state[k]) for k in state)


@pytest.mark.parametrize("conv_transpose", [False, True])
def test_micro_sam_layout_loads_strictly(conv_transpose):
    state = micro_sam_decoder_state(conv_transpose)
    assert len(state) == 66
    decoder = decoder_from_state(state)
    assert decoder.conv_transpose is conv_transpose and _equal_state(decoder, state)
    with torch.no_grad():
        maps = decoder(torch.randn(1, 256, 8, 8))
    assert maps.shape == (1, 3, 128, 128) and float(maps.min()) >= 0 and float(maps.max()) <= 1


def test_bad_decoder_state_is_refused_by_name():
    state = micro_sam_decoder_state()
    missing = {k: v for k, v in state.items() if k != "out_conv.bias"}
    with pytest.raises(PeftExportError, match=r"decoder_state\): weights do not fit the model: 1 missing \(e.g. out_conv.bias\)"):
        decoder_from_state(missing, "ckpt.pt")
    wrong = dict(state, **{"out_conv.weight": torch.zeros(2, 64, 1, 1)})
    with pytest.raises(PeftExportError, match=r"1 of wrong shape \(e.g. out_conv.weight: \(2, 64, 1, 1\)"):
        decoder_from_state(wrong, "ckpt.pt")


def test_every_model_source_keeps_the_decoder(tmp_path):
    """micro-sam's exported model format ({model_state, decoder_state}) via --checkpoint / --merged, and its
    training format (sam.-prefixed model_state + PEFT layers + decoder_state) via --micro-sam."""
    sam = random_sam("tiny", 128, seed=1)
    state = micro_sam_decoder_state(seed=2)
    torch.save({"model_state": sam.state_dict(), "decoder_state": state}, tmp_path / "vit_lm_like.pt")
    loaded, info, decoder = load_sam_and_decoder(None, tmp_path / "vit_lm_like.pt")
    assert info.model_type == "tiny" and _equal_state(decoder, state)
    assert _equal_state(load_model_source(merged=tmp_path / "vit_lm_like.pt").instance_decoder, state)

    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128)
    training = {"model_state": {"sam." + k: v for k, v in adapted.model.state_dict().items()},
                "decoder_state": state, "optimizer_state": {}}
    torch.save(training, tmp_path / "best.pt")
    cfg = PeftConfig(**MERGEABLE_CONFIGS["lora"])
    imported = load_model_source(micro_sam=tmp_path / "best.pt", micro_sam_config=cfg)
    assert _equal_state(imported.instance_decoder, state)

    torch.save({"model_state": sam.state_dict()}, tmp_path / "no_decoder.pt")
    assert load_sam_and_decoder(None, tmp_path / "no_decoder.pt")[2] is None


def test_adapter_stores_the_decoder_and_merge_carries_it(tmp_path):
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128)
    adapted.instance_decoder = decoder_from_state(micro_sam_decoder_state(seed=3))
    save_adapter(adapted, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert meta["instance_decoder"]["maps"] == ["foreground", "center_distances", "boundary_distances"]
    tensors = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert sum(k.startswith("instance_decoder.") for k in tensors) == 66 and meta["num_tensors"] == len(tensors) - 66
    back = load_adapter(tmp_path / "run")
    assert _equal_state(back.instance_decoder, {k: v for k, v in adapted.instance_decoder.state_dict().items()})

    report = merge_to_checkpoint(back, tmp_path / "merged.pt")
    assert report["instance_decoder"] and report["format"].startswith("micro-sam")
    assert report["errors"]["instance_maps"]["max_abs"] < 1e-4  # merged embedding -> the same AIS maps
    obj = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert set(obj) == {"model_state", "decoder_state"}
    merged = load_model_source(merged=tmp_path / "merged.pt")
    assert _equal_state(merged.instance_decoder, obj["decoder_state"])
    assert merged.config is None and merged.model.image_encoder.img_size == 128


def test_without_decoder_merge_stays_a_segment_anything_state_dict(tmp_path):
    report = merge_to_checkpoint(make_adapted(MERGEABLE_CONFIGS["lora"]), tmp_path / "m.pth")
    assert report["format"] == "segment_anything state dict" and "instance_maps" not in report["errors"]
    assert "model_state" not in torch.load(tmp_path / "m.pth", weights_only=True)


@pytest.mark.parametrize("conv_transpose", [False, True])
def test_equals_torch_em_unetr(conv_transpose):
    """torch-em's own UNETR (micro-sam's get_unetr settings) on SAM's encoder vs SAM + our decoder."""
    unetr_mod = pytest.importorskip("torch_em.model.unetr", reason="torch-em is not installed")
    sam = random_sam("tiny", 128, seed=4).eval()
    unetr = unetr_mod.UNETR(backbone="sam", encoder=sam.image_encoder, out_channels=3, use_sam_stats=True,
                            final_activation="Sigmoid", use_skip_connection=False, resize_input=True,
                            use_conv_transpose=conv_transpose, img_size=128)
    state = micro_sam_decoder_state(conv_transpose, seed=5)
    unetr.load_state_dict({**{"encoder." + k: v for k, v in sam.image_encoder.state_dict().items()}, **state})
    unetr.eval()
    ours = decoder_from_state(state)
    from peft_export.models import postprocess_maps

    image = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(6)) * 255  # landscape: crop + resize
    with torch.no_grad():
        want = unetr(image)
        x, input_size = unetr.preprocess(image)
        got = postprocess_maps(ours(sam.image_encoder(x)), tuple(input_size), (96, 128))
    assert got.shape == want.shape == (1, 3, 96, 128)
    assert float((got - want).abs().max()) <= 1e-5
    assert isinstance(ours, InstanceDecoder)
