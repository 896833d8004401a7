"""Fine-tuning SAM 2 with our trainer on its image path: iterative prompting, resume bit for bit, and the
adapter merges and exports (random hiera_t at 128 px)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("sam2", reason="sam2 is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)")

from peft_export.data import make_demo_data  # noqa: E402
from peft_export.training import TrainConfig, finetune  # noqa: E402
from peft_export.training.checkpoint import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow  # trains


def cfg(out, data, **kw) -> TrainConfig:
    base = dict(out=str(out), data=str(data), model_type="sam2.1_hiera_t", image_size=128, patch_size=128, lr=1e-3,
                objects_per_image=3, sub_iterations=1, val_objects=3, val_fraction=0.25, iterations=2, val_every=2,
                progress=False, seed=1, peft="lora", blocks="late", rank=4, validate_at_start=False)
    base.update(kw)
    return TrainConfig(**base)


def test_sam2_finetune_trains_the_hiera_adapter_and_resumes_bit_for_bit(tmp_path):
    torch.set_num_threads(1)
    data = tmp_path / "data"
    make_demo_data(data, n_images=4, size=128, seed=3)
    finetune(cfg(tmp_path / "straight", data, iterations=3))
    finetune(cfg(tmp_path / "split", data, iterations=2))
    summary = finetune(TrainConfig(out=str(tmp_path / "split"), resume=True, iterations=3, progress=False))
    assert summary["steps"] == 3
    a = load_checkpoint(tmp_path / "straight")["trainables"]
    b = load_checkpoint(tmp_path / "split")["trainables"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    lora_b = [v for k, v in a.items() if "w_b_linear" in k]
    assert lora_b and all(k.startswith(("image_encoder.trunk.blocks.", "sam_")) for k in a)
    assert any(v.abs().max() > 0 for v in lora_b)  # zero-initialised, moved by training
    meta = json.loads((tmp_path / "straight" / "adapter.json").read_text())
    assert meta["base"]["model_type"] == "sam2.1_hiera_t" and meta["training_scale"]["model_input"] == 128
    assert meta["validation"]["metrics"]["n_objects"] > 0
    tensors = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    assert not any(k.startswith(("memory_", "obj_ptr", "maskmem")) for k in tensors)
