"""AIS with vit_t: micro-sam's vit_t decoder layout (torch-em UNETR on the TinyViT encoder) loads strictly,
equals torch-em's UNETR, and trains with the adapter."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from peft_export.models import decoder_from_state, random_instance_decoder, random_sam
from peft_export.models import postprocess_maps

warnings.filterwarnings("ignore", message="no checkpoint given")


def unetr_on(encoder: torch.nn.Module, img_size: int):
    """micro-sam's get_unetr settings for its AIS decoders (vit_t_lm_decoder etc.)."""
    unetr_mod = pytest.importorskip("torch_em.model.unetr", reason="torch-em is not installed")
    return unetr_mod.UNETR(backbone="sam", encoder=encoder, out_channels=3, use_sam_stats=True,
                           final_activation="Sigmoid", use_skip_connection=False, resize_input=True,
                           use_conv_transpose=False, img_size=img_size)


def decoder_state_of(unetr: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """What micro-sam stores as ``decoder_state``: the UNETR without its encoder, here with random values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in unetr.state_dict().items():
        if k.startswith("encoder."):
            continue
        if k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif v.is_floating_point():
            state[k] = torch.randn(v.shape, generator=g) * 0.05
        else:
            state[k] = v.clone()
    return state


def test_mobile_sam_unetr_decoder_layout_loads_strictly():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mobile_sam = pytest.importorskip("mobile_sam")
        theirs = mobile_sam.sam_model_registry["vit_t"]()
    unetr = unetr_on(theirs.image_encoder, 1024)
    state = decoder_state_of(unetr, seed=1)
    ours = decoder_from_state(state)  # strict: every key and shape
    assert set(ours.state_dict()) == set(state)


def test_equals_torch_em_unetr_on_our_tiny_vit():
    sam = random_sam("vit_t", 256, seed=4).eval()
    unetr = unetr_on(sam.image_encoder, 256)
    state = decoder_state_of(unetr, seed=5)
    unetr.load_state_dict({**{"encoder." + k: v for k, v in sam.image_encoder.state_dict().items()}, **state})
    unetr.eval()
    ours = decoder_from_state(state)
    image = torch.rand(1, 3, 192, 256, generator=torch.Generator().manual_seed(6)) * 255  # landscape
    with torch.no_grad():
        want = unetr(image)
        x, input_size = unetr.preprocess(image)
        got = postprocess_maps(ours(sam.image_encoder(x)), tuple(input_size), (192, 256))
        other = postprocess_maps(random_instance_decoder(9)(sam.image_encoder(x)), tuple(input_size), (192, 256))
    assert got.shape == want.shape == (1, 3, 192, 256)
    assert float((got - want).abs().max()) <= 1e-5
    assert float((other - want).abs().max()) > 1e-3  # the comparison can tell decoders apart


@pytest.mark.slow
def test_finetune_with_instance_decoder_on_vit_t(tmp_path):
    from peft_export.cli.main import app
    from peft_export.data import make_demo_data

    torch.set_num_threads(1)
    data = tmp_path / "data"
    make_demo_data(data, n_images=3, size=128, seed=3)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, [
        "finetune", "--data", str(data), "--out", str(out), "--iterations", "2", "--val-every", "2",
        "--model", "vit_t", "--image-size", "128", "--patch-size", "128", "--peft", "lora", "--blocks", "late",
        "--rank", "4", "--lr", "1e-3", "--objects-per-image", "3", "--sub-iterations", "0", "--val-objects", "3",
        "--val-fraction", "0.34", "--seed", "1", "-q", "--instance-decoder"])
    assert res.exit_code == 0, res.output
    steps = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in steps if e["type"] == "step"]
    assert len(steps) == 2 and all(np.isfinite(e["instance_loss"]) for e in steps)
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["base"]["model_type"] == "vit_t" and meta["instance_decoder"] is not None
