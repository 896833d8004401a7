"""The training scale (native crop -> model input) recorded in adapter.json and manifest.json,
and the tiled runtime's default tile that reproduces it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.export import merge_and_export
from peft_export.peft.adapters import load_adapter, save_adapter
from peft_export.runtime import SamSession

pytestmark = pytest.mark.slow  # one tiny export


def test_training_scale_goes_from_adapter_to_manifest_to_default_tile(tmp_path):
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128)
    save_adapter(adapted, tmp_path / "run", extra={"training": {"patch_size": 48}})
    meta = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert meta["training_scale"] == {"crop_size": 48, "model_input": 128}
    manifest = merge_and_export(load_adapter(tmp_path / "run"), tmp_path / "export", precisions=("fp32",),
                                progress=False)
    assert manifest["training_scale"] == {"crop_size": 48, "model_input": 128}
    session = SamSession(tmp_path / "export")
    spec = session.tiled(np.zeros((300, 300), "uint8")).spec
    assert (spec.tile, spec.halo) == (48, 12) and abs(spec.scale - 128 / 48) < 1e-9  # 48-px tiles resized to 128
    assert session.tiled(np.zeros((300, 300), "uint8"), tile=128).spec.scale == 1.0  # --tile wins
    # an export without the record: tile = the model input, scale 1
    old = json.loads((tmp_path / "export" / "manifest.json").read_text())
    del old["training_scale"]
    (tmp_path / "export" / "manifest.json").write_text(json.dumps(old))
    assert SamSession(tmp_path / "export").tiled(np.zeros((300, 300), "uint8")).spec.tile == 128


def test_shared_trunk_adapters_each_record_their_scale_and_the_default_tile_follows_the_adapter(tmp_path):
    from peft_export.export import merge_and_export_adapters

    adapters = {}
    for name, patch in (("small", 32), ("large", 64)):
        adapted = make_adapted(MERGEABLE_CONFIGS["freeze-encoder"], image_size=128, seed=0)
        save_adapter(adapted, tmp_path / name, extra={"training": {"patch_size": patch}})
        adapters[name] = load_adapter(tmp_path / name)
    manifest = merge_and_export_adapters(adapters, tmp_path / "export", progress=False)
    assert manifest["adapters"]["small"]["training_scale"] == {"crop_size": 32, "model_input": 128}
    assert manifest["adapters"]["large"]["training_scale"] == {"crop_size": 64, "model_input": 128}
    session = SamSession(tmp_path / "export")
    image = np.zeros((300, 300), "uint8")
    assert session.tiled(image, adapter="small").spec.tile == 32  # 4x, as "small" was trained
    assert session.tiled(image, adapter="large").spec.tile == 64  # 2x
    assert session.tiled(image).spec.tile == 128  # no adapter chosen and the records differ: scale 1
    assert session.tiled(image, adapter="small", tile=100).spec.tile == 100  # --tile wins
    from peft_export.predict.large_prompts import predict_large_prompts

    np.save(tmp_path / "img.npy", np.random.default_rng(0).integers(0, 255, (150, 140), dtype=np.uint8))
    rec, = predict_large_prompts(tmp_path / "export", [tmp_path / "img.npy"], tmp_path / "m.zarr",
                                 points="70,80", adapter="large")
    assert (rec["tile"], rec["adapter"]) == (64, "large")  # the command line's default follows --adapter too
