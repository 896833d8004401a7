"""Finetuning on synthetic data with the tiny model: loss, ownership, resume, NaN, bad data, methods."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from peft_export.peft.adapters import build_adapted_model, load_adapter
from peft_export.data import find_pairs, load_samples, make_demo_data, split_by_file
from peft_export.errors import PeftExportError
from peft_export.models import random_sam
from peft_export.peft import PEFT_METHODS, PeftConfig, apply_peft, merge_peft
from peft_export.training import TrainConfig, encode_with_frozen_prefix, finetune, first_trainable_block
from peft_export.training import losses
from peft_export.training.checkpoint import load_checkpoint
from peft_export.training.plots import read_log
from peft_export.training import validate, validation_set

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow

warnings.filterwarnings("ignore", message="no checkpoint given")


@pytest.fixture(autouse=True)
def one_thread():
    # Two cores shared with other processes: several OpenMP threads per process thrash.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out, n_images=5, size=128, seed=3)
    return out


def cfg(out, data, **kw) -> TrainConfig:
    base = dict(out=str(out), data=str(data), model_type="tiny", image_size=128, patch_size=128, lr=1e-3,
                objects_per_image=4, sub_iterations=1, val_objects=4, val_fraction=0.2, iterations=4,
                val_every=2, progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def lora_run(demo, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "lora"
    summary = finetune(cfg(out, demo, iterations=12, val_every=4, peft="lora", blocks="late", rank=4))
    return out, summary


def test_encode_with_frozen_prefix_matches_encoder():
    sam = random_sam("tiny", 128, seed=0).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref = sam.image_encoder(x)
    for k in (None, 0, 1, 3, 4):
        out = encode_with_frozen_prefix(sam, x, k)
        assert torch.allclose(out, ref, atol=1e-6, rtol=0), k
    apply_peft(sam, PeftConfig("lora", blocks="2-3", rank=2))
    assert first_trainable_block(sam) == 2
    x.requires_grad_(False)
    out = encode_with_frozen_prefix(sam, x, 2, grad_checkpointing=True)
    out.sum().backward()
    grads = {n for n, p in sam.image_encoder.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith(("blocks.2", "blocks.3")) for n in grads)
    ssf = random_sam("tiny", 128, seed=0)
    apply_peft(ssf, PeftConfig("ssf", blocks="late"))
    assert first_trainable_block(ssf) is None  # the patch embedding trains


def test_loss_goes_down_and_only_owned_tensors_change(lora_run):
    out, summary = lora_run
    assert summary["status"] == "completed" and summary["steps"] == 12
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if e["type"] == "step"]
    assert len(steps) == 12 and all(e["peak_memory_mb"] > 0 and e["seconds"] > 0 for e in steps)
    losses_ = [e["loss"] for e in steps]
    assert np.mean(losses_[-4:]) < np.mean(losses_[:4])
    assert [e["step"] for e in log if e["type"] == "val"] == [0, 4, 8, 12]
    assert (out / "training.png").stat().st_size > 1000
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["intensity"]["name"] == "percentile"
    assert meta["training"]["best_step"] == summary["best_step"]
    assert meta["validation"]["metrics"]["mean_dice"] == pytest.approx(summary["best_metric"])

    # Every tensor outside the method's (and decoder's) own set is bit-identical to the base.
    trained = torch.load(out / "last" / "checkpoint.pt", weights_only=True)["trainables"]
    base = build_adapted_model(PeftConfig("lora", blocks="late", rank=4, targets=("q", "k", "v", "mlp")),
                               "tiny", None, 128, seed=1).model
    owned = {n for n, p in base.named_parameters() if p.requires_grad}
    assert set(trained) == owned
    changed = {n for n, p in base.named_parameters() if n in trained and not torch.equal(p, trained[n])}
    assert len(changed) > 0.8 * len(owned)
    assert any("w_b_linear" in n for n in changed) and any("mask_decoder" in n for n in changed)
    assert all(n.startswith(("image_encoder.blocks.2", "image_encoder.blocks.3", "mask_decoder", "prompt_encoder"))
               for n in changed)
    adapter = load_file(str(out / "adapter.safetensors"))
    assert set(adapter) == owned


def test_the_web_page_says_what_the_adapter_learned(lora_run, demo):
    """adapter.json records how many images trained it; a site of its export on a random base says so,
    with the validation Dice it recorded (not called held-out), instead of 'its masks mean nothing'."""
    from peft_export.web.site import model_note

    out, _ = lora_run
    meta = json.loads((out / "adapter.json").read_text())
    _, val_pairs = split_by_file(find_pairs(demo), 0.2, 1)
    assert meta["training"]["train_images"] == 5 - len(val_pairs) == 4
    manifest = {"base": {"sha256": "random-init"}, "source": {"kind": "adapter", "adapter": str(out)}}
    note = model_note(manifest)
    box = meta["validation"]["metrics"]["box_dice"]
    assert note.startswith("The base model has random weights (no checkpoint) and was fine-tuned on 4 images; ")
    assert f"validation box Dice {box:.2f}" in note and "on 1 image (" in note and "mean nothing" not in note
    assert "held-out box Dice" not in note  # validation picked the best step: not a held-out figure
    # a shared-trunk export's adapter entry, and a base that is a real checkpoint (no note)
    assert model_note({"base": manifest["base"], "adapters": {"a": {"source": manifest["source"]}}}, "a") == note
    assert model_note({"base": {"sha256": "ab" * 32}, "source": manifest["source"]}) is None
    assert "mean nothing" in model_note({"base": manifest["base"], "source": {}})


def test_merged_model_reproduces_logged_validation(lora_run, demo):
    out, summary = lora_run
    meta = json.loads((out / "adapter.json").read_text())
    conf = TrainConfig(**{k: v for k, v in meta["training"].items() if k in TrainConfig.__dataclass_fields__})
    _, val_pairs = split_by_file(find_pairs(demo), conf.val_fraction, conf.seed)
    val = validation_set(load_samples(val_pairs, intensity_rule=meta["intensity"]), conf.patch_size,
                         conf.min_object_size, conf.seed)
    assert [name for _, _, name in val] == meta["validation"]["files"]
    merged = merge_peft(load_adapter(out).model)
    got = validate(merged, val, conf.seed, conf.val_objects)
    assert abs(got["mean_dice"] - meta["validation"]["metrics"]["mean_dice"]) <= 1e-4
    assert abs(got["mean_dice"] - summary["best_metric"]) <= 1e-4


def test_resume_is_bit_identical(demo, tmp_path):
    kw = dict(peft="fact", rank=4, dropout=0.2, iterations=6, val_every=3, validate_at_start=False)
    finetune(cfg(tmp_path / "straight", demo, **kw))
    finetune(cfg(tmp_path / "split", demo, **{**kw, "iterations": 3}))
    assert load_checkpoint(tmp_path / "split")["step"] == 3
    summary = finetune(TrainConfig(out=str(tmp_path / "split"), resume=True, iterations=6, progress=False))
    assert summary["steps"] == 6
    a = load_checkpoint(tmp_path / "straight")["trainables"]
    b = load_checkpoint(tmp_path / "split")["trainables"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ta = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    tb = load_file(str(tmp_path / "split" / "adapter.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()
             if json.loads(x)["type"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_after_a_torn_log_line_drops_it_and_says_so(demo, tmp_path):
    """A crash mid-write leaves a half line at the end of train_log.jsonl: --resume drops it with a note."""
    from peft_export.cli.main import app

    out = tmp_path / "torn"
    finetune(cfg(out, demo, iterations=2, val_every=2, validate_at_start=False))
    log = out / "train_log.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"type": "step", "step": 3, "lo')
    res = CliRunner().invoke(app, ["finetune", "-o", str(out), "--resume", "--iterations", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert "half-written last line" in res.output
    entries = [json.loads(x) for x in log.read_text().splitlines()]  # every line whole again
    assert [e["step"] for e in entries if e["type"] == "step"] == [1, 2, 3]
    # a damaged line that is not the last is not a crash's trace: one error line, the log untouched
    damaged = log.read_text().replace('"type": "step"', '"type": "st', 1)
    log.write_text(damaged)
    res = CliRunner().invoke(app, ["finetune", "-o", str(out), "--resume", "--iterations", "4", "-q"])
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1].startswith("error: ")
    assert "train_log.jsonl: line" in res.output and log.read_text() == damaged


def test_nan_loss_stops_and_keeps_best_adapter(demo, tmp_path, monkeypatch):
    real = losses.sam_loss
    calls = {"n": 0}
    # 1 + sub_iterations = 2 loss calls per step and image (all 4 objects in one decoder pass): the 2nd step turns NaN.

    def nan_on_step_2(*args):
        calls["n"] += 1
        loss, d, i, best = real(*args)
        return (loss * float("nan") if calls["n"] > 2 else loss), d, i, best

    monkeypatch.setattr(losses, "sam_loss", nan_on_step_2)
    out = tmp_path / "nan"
    with pytest.raises(PeftExportError, match="loss is nan at step 2"):
        finetune(cfg(out, demo, val_every=1, iterations=5, objects_per_pass=4))
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["training"]["step"] in (0, 1)
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter.safetensors")).values())
    assert load_checkpoint(out)["step"] == 1


def test_ctrl_c_saves_a_resumable_checkpoint(demo, tmp_path, monkeypatch):
    import signal

    real = losses.sam_loss
    calls = {"n": 0}

    def interrupt_in_step_2(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)  # as a Ctrl-C during step 2
        return real(*args)

    monkeypatch.setattr(losses, "sam_loss", interrupt_in_step_2)
    out = tmp_path / "int"
    summary = finetune(cfg(out, demo, iterations=4, val_every=4, validate_at_start=False, objects_per_pass=4))
    assert summary["status"] == "interrupted" and summary["steps"] == 2
    assert load_checkpoint(out)["step"] == 2
    monkeypatch.setattr(losses, "sam_loss", real)
    assert finetune(TrainConfig(out=str(out), resume=True, progress=False))["steps"] == 4


def test_existing_run_dir_refused_and_options_checked(demo, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x.txt").write_text("x")
    with pytest.raises(PeftExportError, match="not empty"):
        finetune(cfg(out, demo))
    with pytest.raises(PeftExportError, match="nothing to resume"):
        finetune(TrainConfig(out=str(tmp_path / "none"), resume=True))
    with pytest.raises(PeftExportError, match="--precision"):
        finetune(cfg(tmp_path / "p", demo, precision="fp8"))
    with pytest.raises(PeftExportError, match="fp16"):
        finetune(cfg(tmp_path / "p16", demo, precision="fp16", device="cpu"))


@pytest.mark.parametrize("option, message", [
    ({"rank": 0}, "--rank must be a positive integer"),
    ({"blocks": "20-30"}, "block 20 is out of range"),
    ({"checkpoint": "missing.pth"}, "missing.pth"),
])
def test_refused_options_leave_nothing_behind(demo, tmp_path, option, message):
    """Every option is checked before the run directory (or its train_config.json) is made."""
    out = tmp_path / "run"
    with pytest.raises(PeftExportError, match=message):
        finetune(cfg(out, demo, **option))
    assert not out.exists()
    # the rerun with a fixed option is a new run, not a half-made one that asks for --resume
    finetune(cfg(out, demo, iterations=1, val_every=1, validate_at_start=False))
    assert (out / "adapter.safetensors").is_file()


def test_resume_refuses_options_that_differ_from_the_run(demo, tmp_path):
    from peft_export.cli.main import app

    out = tmp_path / "run"
    finetune(cfg(out, demo, peft="lora", rank=4, iterations=2, val_every=2, validate_at_start=False))
    before = (out / "train_config.json").read_text()
    # library: a field that differs from both the default and the run is refused
    with pytest.raises(PeftExportError, match=r"--rank 8 \(the run has 4\)"):
        finetune(TrainConfig(out=str(out), resume=True, rank=8, iterations=3, progress=False))
    # CLI: what was typed counts, even when it equals a default (--lr 1e-5 is finetune's default)
    res = CliRunner().invoke(app, ["finetune", "-o", str(out), "--resume", "--rank", "8", "--lr", "1e-5", "-q"])
    assert res.exit_code == 2
    line = [ln for ln in res.output.splitlines() if ln.startswith("error:")][0]
    assert "--rank 8 (the run has 4)" in line and "--lr 1e-05 (the run has 0.001)" in line
    assert (out / "train_config.json").read_text() == before and load_checkpoint(out)["step"] == 2
    # the run's own values, and options a resume may change, are accepted
    res = CliRunner().invoke(app, ["finetune", "-o", str(out), "--resume", "--rank", "4", "-m", "tiny",
                                   "--iterations", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out)["step"] == 3


def test_patch_larger_than_every_image_is_clamped_with_a_note(demo, tmp_path, capsys):
    out = tmp_path / "run"
    finetune(cfg(out, demo, patch_size=1000, iterations=1, val_every=1, validate_at_start=False))
    assert "patch size 1000 (--patch-size) is larger than every training image (the largest side is 128 px)" \
        in capsys.readouterr().out
    assert json.loads((out / "train_config.json").read_text())["patch_size"] == 128


def test_missing_data_directory_is_named(tmp_path):
    with pytest.raises(PeftExportError, match="^nodata: directory not found$"):
        find_pairs("nodata")
    (tmp_path / "f").write_text("x")
    with pytest.raises(PeftExportError, match="not a directory"):
        find_pairs(tmp_path / "f")


def test_bad_data_report_through_cli(tmp_path):
    from peft_export.cli.main import app

    data = tmp_path / "bad"
    make_demo_data(data, n_images=3, size=64, seed=0)
    (data / "labels" / "demo_001.tif").unlink()  # image without labels
    (data / "images" / "demo_002.tif").write_bytes(b"not a tiff")  # corrupt
    tifffile.imwrite(data / "images" / "extra.tif", np.zeros((64, 64), np.uint16))
    tifffile.imwrite(data / "labels" / "extra.tif", np.ones((32, 32), np.int32))  # shape mismatch
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["finetune", "--data", str(data), "--out", str(out), "--model", "tiny",
                                   "--val-fraction", "0"])
    assert res.exit_code == 2, res.output
    msg = res.output + (res.stderr if hasattr(res, "stderr") else "")
    for name in ("demo_001.tif", "demo_002.tif", "extra.tif"):
        assert name in msg
    assert "3 problems" in msg
    assert not out.exists()


def test_cli_make_demo_data_and_short_run(tmp_path):
    from peft_export.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["make-demo-data", "-o", str(tmp_path / "d"), "--n-images", "3", "--size", "96"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "d" / "images").glob("*.tif"))) == 3
    res = runner.invoke(app, ["finetune", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--model",
                              "tiny", "--image-size", "96", "--patch-size", "96", "--iterations", "2", "--lr", "1e-3",
                              "--objects-per-image", "2", "--sub-iterations", "1", "--val-fraction", "0.34",
                              "--no-augment", "--cache-frozen-trunk", "--peft", "lora", "--blocks", "late",
                              "-q", "--min-object-size", "10"])
    assert res.exit_code == 0, res.output
    assert "status: completed" in res.output and "cache of the frozen trunk used" in res.output
    assert (tmp_path / "r" / "adapter.safetensors").is_file()


def test_frozen_trunk_cache_gives_the_same_result(demo, tmp_path):
    kw = dict(augment=False, iterations=3, val_every=3, validate_at_start=False, peft="lora", blocks="late", rank=2)
    s1 = finetune(cfg(tmp_path / "a", demo, cache_frozen_trunk=True, **kw))
    s2 = finetune(cfg(tmp_path / "b", demo, **kw))
    assert s1["cache_frozen_trunk"].startswith("used") and s2["cache_frozen_trunk"] == "off"
    a, b = load_checkpoint(tmp_path / "a")["trainables"], load_checkpoint(tmp_path / "b")["trainables"]
    # same math; the stacked cache only changes float summation order
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    s3 = finetune(cfg(tmp_path / "c", demo, cache_frozen_trunk=True, **{**kw, "augment": True}))
    assert "not used" in s3["cache_frozen_trunk"]


def test_default_objects_per_pass_bounds_mask_pixels_on_the_cpu():
    from peft_export.training.loop import default_objects_per_pass

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_objects_per_pass(cpu, (1024, 1024), 25) == 2
    assert default_objects_per_pass(cpu, (512, 512), 25) == 8
    assert default_objects_per_pass(cpu, (4096, 4096), 25) == 1
    assert default_objects_per_pass(gpu, (1024, 1024), 25) == 25


def test_objects_per_pass_changes_memory_not_the_training(demo, tmp_path):
    kw = dict(augment=False, iterations=3, val_every=3, validate_at_start=False, peft="lora", blocks="late", rank=2,
              objects_per_image=4, sub_iterations=2)
    for k in (1, 3, 4):
        finetune(cfg(tmp_path / str(k), demo, objects_per_pass=k, **kw))
    states = {k: load_checkpoint(tmp_path / str(k))["trainables"] for k in (1, 3, 4)}
    losses_ = {k: [e["loss"] for e in read_log(tmp_path / str(k) / "train_log.jsonl") if e["type"] == "step"]
               for k in (1, 3, 4)}
    # the LoRA B matrices start at zero: they have moved, so equal states say equal gradients
    assert all(states[4][n].abs().max() > 0 for n in states[4] if "w_b" in n)
    for k in (1, 3):  # passes of 1 and of 3 + 1 objects against all 4 at once: float summation order only
        assert all(torch.allclose(states[k][n], states[4][n], atol=1e-4) for n in states[4])
        assert losses_[k] == pytest.approx(losses_[4], rel=1e-4)


@pytest.mark.parametrize("method", [m for m in PEFT_METHODS if m != "qlora"])
def test_every_method_trains_a_step(method, demo, tmp_path):
    summary = finetune(cfg(tmp_path / method, demo, peft=method, iterations=1, val_fraction=0.0,
                           validate_at_start=False, rank=2 if method in ("lora", "fact") else None,
                           blocks="late", batch_size=2))
    assert summary["status"] == "completed" and summary["effective_batch_size"] == 2
    assert (tmp_path / method / "adapter.safetensors").is_file()
    adapted = load_adapter(tmp_path / method)
    assert adapted.config.method == method


def test_qlora_without_bitsandbytes_is_refused_before_any_work(demo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(PeftExportError, match="qlora needs bitsandbytes"):
        finetune(cfg(tmp_path / "q", demo, peft="qlora"))
    assert not (tmp_path / "q").exists()


def test_qlora_trains_a_step_and_its_adapter_loads(demo, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs the optional package bitsandbytes")
    from peft_export.peft.qlora import qlora_device

    device = qlora_device().type  # CUDA when present, else bitsandbytes' CPU kernels
    summary = finetune(cfg(tmp_path / "q", demo, peft="qlora", rank=2, blocks="late", iterations=1,
                           val_fraction=0.0, validate_at_start=False, device=device))
    assert summary["status"] == "completed"
    adapted = load_adapter(tmp_path / "q")
    lora = {n: p for n, p in adapted.model.named_parameters() if "w_b_linear" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # B starts at zero: one step moved it
