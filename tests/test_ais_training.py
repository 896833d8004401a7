"""finetune --instance-decoder on synthetic nuclei with the tiny model: the decoder trains with the
adapter, is stored with it, resumes exactly, and its loss is torch-em's."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from peft_export.cli.main import app
from peft_export.data import make_demo_data
from peft_export.models import random_instance_decoder
from peft_export.peft.adapters import load_adapter
from peft_export.training import TrainConfig, finetune
from peft_export.training.checkpoint import load_checkpoint
from peft_export.training.instance_loss import distance_loss
from test_training import one_thread  # noqa: F401 - the autouse fixture: one torch thread on shared cores

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow

warnings.filterwarnings("ignore", message="no checkpoint given")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aisdemo")
    make_demo_data(out, n_images=4, size=128, seed=3)
    return out


ARGS = ["--model", "tiny", "--image-size", "128", "--patch-size", "128", "--peft", "lora", "--blocks", "late",
        "--rank", "4", "--lr", "1e-3", "--objects-per-image", "4", "--sub-iterations", "0", "--val-objects", "4",
        "--val-fraction", "0.25", "--seed", "1", "-q", "--instance-decoder"]


STEPS = 12  # enough for the instance loss to fall clearly from the decoder's random start


@pytest.fixture(scope="module")
def ais_run(demo, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("aisruns") / "run"
    res = CliRunner().invoke(app, ["finetune", "--data", str(demo), "--out", str(out), "--iterations", str(STEPS),
                                   "--val-every", str(STEPS // 2), *ARGS])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_the_decoder_trains_with_the_adapter(ais_run):
    out, output = ais_run
    assert "AIS decoder 9,591,235" in output and "AIS mSA" in output
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if e["type"] == "step"]
    losses = [e["instance_loss"] for e in steps]
    assert len(steps) == STEPS and all(np.isfinite(x) and 0 < x <= 3 for x in losses)
    # it learns: the instance loss of the last third of the steps is well below that of the first third
    third = STEPS // 3
    assert np.mean(losses[-third:]) < 0.6 * np.mean(losses[:third]), losses  # measured 0.38; untrained ~1.0
    vals = [e for e in log if e["type"] == "val"]
    assert [e["step"] for e in vals] == [0, STEPS // 2, STEPS]
    for e in vals:
        m = e["metrics"]
        assert 0 <= m["ais_msa"] <= 1 and 0 <= m["ais_sa50"] <= 1
        assert m["selection_score"] == pytest.approx(np.mean([m["point_dice"], m["box_dice"], m["ais_msa"]]))
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["training"]["metric"] == "mean of point Dice, box Dice and AIS mSA on validation"
    assert meta["instance_decoder"]["num_parameters"] == 9591235
    tensors = load_file(str(out / "adapter.safetensors"))
    dec = {k[len("instance_decoder."):]: v for k, v in tensors.items() if k.startswith("instance_decoder.")}
    assert len(dec) == 66
    best = meta["training"]["best_step"]
    # BatchNorm statistics are stored too: one training forward per step until the best step.
    assert int(dec["deconv1.block.2.num_batches_tracked"]) == best
    # the last step's decoder (the checkpoint) moved away from the seeded init the run started from
    fresh = random_instance_decoder(1 + 3).state_dict()
    last = load_checkpoint(out)["instance_decoder"]
    assert last["deconv1.block.2.num_batches_tracked"] == STEPS
    assert not torch.equal(last["out_conv.weight"], fresh["out_conv.weight"])
    adapted = load_adapter(out)
    assert adapted.instance_decoder is not None
    assert all(torch.equal(v, dec[k]) for k, v in adapted.instance_decoder.state_dict().items())


def test_resume_restores_the_decoder_exactly(demo, tmp_path):
    common = ["--data", str(demo), "--val-every", "2", *ARGS]
    runner = CliRunner()
    assert runner.invoke(app, ["finetune", "--out", str(tmp_path / "a"), "--iterations", "4", *common]).exit_code == 0
    assert runner.invoke(app, ["finetune", "--out", str(tmp_path / "b"), "--iterations", "2", *common]).exit_code == 0
    res = runner.invoke(app, ["finetune", "--out", str(tmp_path / "b"), "--iterations", "4", "--resume",
                              "-q"])
    assert res.exit_code == 0, res.output
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a["step"] == b["step"] == 4
    assert set(a["instance_decoder"]) == set(b["instance_decoder"])
    for k, v in a["instance_decoder"].items():
        assert torch.equal(v, b["instance_decoder"][k]), k


def test_loss_equals_torch_em():
    loss_mod = pytest.importorskip("torch_em.loss", reason="torch-em is not installed")
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 3, 40, 50, generator=g)
    target = torch.rand(2, 3, 40, 50, generator=g)
    target[:, 0] = (target[:, 0] > 0.5).float()
    ours, parts = distance_loss(pred, target)
    theirs = loss_mod.DiceBasedDistanceLoss(mask_distances_in_bg=True)(pred, target)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    assert sum(parts.values()) == pytest.approx(float(ours), rel=1e-6)
