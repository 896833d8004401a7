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
