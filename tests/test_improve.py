"""peftexport improve: a new export from corrected objects, the old one untouched; its torch source
inside it, so it can be improved again; bad input and a cancel leave nothing; the line protocol
the napari widget runs it with is torch-free."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import import_blocker, make_adapted
from peft_export.data import Sample, make_demo_data
from peft_export.export import merge_and_export
from peft_export.fsutil import sha256_file
from peft_export.improve import improve_export
from peft_export.improve.holdout import hold_out_objects
from peft_export.improve.loop import _read_data, _train
from peft_export.improve.protocol import ImproveProcess
from peft_export.improve.source import load_torch_source
from peft_export.peft.adapters import load_adapter, save_adapter
from peft_export.runtime.intensity import normalize_intensity
from peft_export.training import monitor as monitor_module
from peft_export.training import validate, validation_set
from peft_export.training.monitor import Monitor

pytestmark = pytest.mark.slow  # exports and trains the tiny model

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(steps=3, objects_per_image=4, precisions=("fp32",), progress=False)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An export of a late-LoRA adapter (tiny, 128 px, random non-zero weights) and 4 labelled images."""
    root = tmp_path_factory.mktemp("improve")
    make_demo_data(root / "data", n_images=4, size=128, seed=5)
    adapted = make_adapted(dict(method="lora", rank=4, targets=("q", "v"), blocks="late"), image_size=128)
    save_adapter(adapted, root / "run")
    merge_and_export(load_adapter(root / "run"), root / "exports" / "v1", precisions=("fp32",), progress=False)
    return root


def test_improve_writes_a_new_export_and_keeps_the_old(setup):
    root, v1, v2 = setup, setup / "exports" / "v1", setup / "exports" / "v2"
    before = _digests(v1)
    events = []
    result = improve_export(v1, root / "data" / "images", root / "data" / "labels", v2, on_event=events.append,
                            **{**FAST, "precisions": ("fp32", "int8")})
    assert _digests(v1) == before  # the old export, byte for byte
    assert _hidden(root / "exports") == []  # no temporary folder left
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "result" and kinds.count("step") == 3
    assert [e["stage"] for e in events if e["event"] == "stage"] == ["load", "before", "train", "export", "after", "write"]
    assert all(np.isfinite(e["loss"]) for e in events if e["event"] == "step")
    manifest = json.loads((v2 / "manifest.json").read_text())
    assert manifest["improve"] == result
    assert result["held_out"]["held_out"] >= 1 and set(result["before"]) == {"fp32"}
    assert "fp32" in result["after"] and ("int8" in result["after"] or result["refused"])
    for scores in (*result["before"].values(), *result["after"].values()):
        assert 0.0 <= scores["box_dice"] <= 1.0 and scores["objects"] == result["held_out"]["held_out"]
    # The torch source is inside the new export, recorded with its digest, and holds both parts:
    src = manifest["source"]
    assert src["in_export"] == "adapter" and src["adapter_sha256"] == sha256_file(v2 / "adapter" / "adapter.safetensors")
    tensors = load_file(str(v2 / "adapter" / "adapter.safetensors"))
    old = load_file(str(root / "run" / "adapter.safetensors"))
    for k in (k for k in old if k.startswith("image_encoder.")):  # the old encoder LoRA, carried unchanged
        assert torch.equal(tensors[k], old[k]), k
    assert any(k.startswith("mask_decoder.") and ".w_b_linear." in k for k in tensors)
    # ... and loads as the model the export was made from.
    model = load_torch_source(v2, manifest).model
    lora = [k for k in tensors if ".w_b_linear." in k]
    assert float(max(tensors[k].abs().max() for k in lora)) > 0  # the decoder LoRA trained (B starts at zero)
    assert torch.equal(dict(model.named_parameters())[lora[0]].detach(), tensors[lora[0]])

    # Improving the improved export trains the same decoder LoRA further (no new layers), from a moved copy.
    moved = root / "exports" / "moved"
    shutil.copytree(v2, moved)
    again = improve_export(moved, root / "data" / "images", root / "data" / "labels", root / "exports" / "v3",
                           **{**FAST, "steps": 1})
    assert again["training"]["trainable_parameters"]["mask_decoder"] == result["training"]["trainable_parameters"]["mask_decoder"]
    third = load_file(str(root / "exports" / "v3" / "adapter" / "adapter.safetensors"))
    assert third.keys() == tensors.keys()


@pytest.mark.parametrize("case", ["no labels", "labels of another shape", "missing torch source",
                                  "changed torch source", "out is the export", "out inside the export"])
def test_bad_input_is_one_message_and_writes_nothing(setup, tmp_path, case):
    v1 = setup / "exports" / "v1"
    export, images, labels, out = tmp_path / "v1", tmp_path / "images", tmp_path / "labels", tmp_path / "new"
    shutil.copytree(v1, export)
    shutil.copytree(setup / "data" / "images", images)
    shutil.copytree(setup / "data" / "labels", labels)
    manifest = json.loads((export / "manifest.json").read_text())
    if case == "no labels":
        for p in labels.iterdir():
            p.unlink()
        match = "matches no label files"
    elif case == "labels of another shape":
        first = sorted(labels.iterdir())[0]
        tifffile.imwrite(first, np.ones((64, 80), np.uint16))
        match = "label shape \\(64, 80\\) differs from image"
    elif case == "missing torch source":
        manifest["source"]["adapter"] = str(tmp_path / "gone")
        match = "adapter .*gone, is not on this machine; give .* --source"
    elif case == "changed torch source":
        manifest["source"]["adapter_sha256"] = "0" * 64
        match = "not the 000000000000... the export was made from"
    elif case == "out is the export":
        out = export
        match = "is, holds or lies inside the export being improved"
    else:
        out = export / "v2"
        match = "is, holds or lies inside the export being improved"
    (export / "manifest.json").write_text(json.dumps(manifest))
    before = _digests(export)
    from peft_export.cli.main import app

    res = CliRunner().invoke(app, ["improve", str(export), "--images", str(images), "--labels", str(labels),
                                   "-o", str(out), "--steps", "1", "--precision", "fp32", "-q"])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and __import__("re").search(match, res.output), res.output
    assert _digests(export) == before
    assert out == export or not out.exists()
    assert _hidden(tmp_path) == []


def test_cancel_in_the_middle_leaves_nothing(setup, tmp_path):
    """The napari widget's way: a subprocess with --events, cancelled after its first training step."""
    out = tmp_path / "new"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = ImproveProcess(setup / "exports" / "v1", setup / "data" / "images", setup / "data" / "labels", out,
                          ["--steps", "200", "--precision", "fp32", "--objects-per-image", "2"], env=env)
    seen = []
    for event in proc.events():
        seen.append(event)
        if event["event"] == "step":
            proc.cancel()
    code = proc.wait(timeout=600)
    assert code == 130, "\n".join(proc.stderr_tail)
    assert seen[0]["event"] == "start" and seen[-1]["event"] == "cancelled"
    assert sum(e["event"] == "step" for e in seen) < 200
    assert not out.exists() and _hidden(tmp_path) == []


def test_the_protocol_client_imports_without_torch():
    code = import_blocker(("torch", "segment_anything", "onnx", "safetensors")) + (
        "import peft_export.improve.protocol as p\n"
        "assert p.parse_event(p.event_line({'event': 'step', 'step': 1})) == {'event': 'step', 'step': 1}\n"
        "assert p.parse_event('0%|  | 0/3') is None\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr


def test_learning_curve_leaves_the_training_as_it_is(setup, tmp_path, monkeypatch):
    """``curve_every``: points before the first step, every k steps and after the last, on the torch model
    (starting and final points agree with the exports' held-out Dice); the adapter is bitwise the one
    trained without the curve, and the measurements' time is left out of the training seconds."""
    v1, images, labels = setup / "exports" / "v1", setup / "data" / "images", setup / "data" / "labels"
    run = {**FAST, "steps": 5}
    plain = improve_export(v1, images, labels, tmp_path / "plain", **run)
    torch.rand(3)  # the global generator moved on: the new decoder LoRA is drawn from improve's own seed
    pause = 2.0  # each measurement made this much slower: it would show in the training seconds if counted
    real = monitor_module.validate

    def slow_validate(*args, **kwargs):
        time.sleep(pause)
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "validate", slow_validate)
    result = improve_export(v1, images, labels, tmp_path / "curve", curve_every=2, **run)
    assert "curve" not in plain["training"]
    curve = result["training"]["curve"]
    points = curve["points"]
    assert [p["step"] for p in points] == [0, 2, 4, 5] and curve["every"] == 2
    assert all(p["objects"] == result["held_out"]["held_out"] for p in points)
    tensors, reference = (load_file(str(tmp_path / name / "adapter" / "adapter.safetensors")) for name in ("curve", "plain"))
    assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in tensors)
    assert result["after"] == plain["after"]
    # torch before the first step / after the last agree with the fp32 exports' scores of the same objects
    assert abs(points[0]["box_dice"] - result["before"]["fp32"]["box_dice"]) < 0.01
    assert abs(points[-1]["box_dice"] - result["after"]["fp32"]["box_dice"]) < 0.01
    # the pauses (4 x 2 s) are in the monitor's seconds, not in the training's
    assert curve["seconds"] >= len(points) * pause
    assert result["training"]["seconds"] < plain["training"]["seconds"] + pause
    seconds = [p["train_seconds"] for p in points]
    assert seconds == sorted(seconds) and seconds[-1] <= result["training"]["seconds"]
    assert points[-1]["encoded"] >= 1 and 0 < points[-1]["encode_seconds"] <= seconds[-1]


def test_learning_curve_with_the_encoder_training(setup, tmp_path):
    """benchmarks/bench_improve.py's encoder case (late encoder LoRA, no cached embeddings): the monitor's
    embeddings follow the changing encoder, and the adapter is the same as without it."""
    v1, images, labels = setup / "exports" / "v1", setup / "data" / "images", setup / "data" / "labels"
    manifest = json.loads((v1 / "manifest.json").read_text())
    rule = manifest["preprocessing"]["intensity"]
    samples = [Sample(s.name, normalize_intensity(s.image, rule), s.label) for s in _read_data(images, labels)]
    hold = hold_out_objects(samples, 0.2, 0, 25)
    runs = {}
    for name, monitor in (("plain", None), ("curve", Monitor(hold.check, 2))):
        torch.manual_seed(0)
        adapted = load_torch_source(v1, manifest)
        summary = _train(adapted, hold.train, tmp_path / name, rule, 3, 1e-3, 4, 1, True, None,
                         25, 0, False, lambda e: None, None, cache_embeddings=False, monitor=monitor)
        runs[name] = (summary, load_file(str(tmp_path / name / "adapter.safetensors")), adapted)
    (summary, tensors, adapted), (_, reference, _) = runs["curve"], runs["plain"]
    assert any(k.startswith("image_encoder.") for k in tensors)  # the encoder trained
    assert tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in tensors)
    points = summary["monitor"]["points"]
    assert [p["step"] for p in points] == [0, 2, 3] and "encoded" not in points[0]
    # the last point is the trained model's Dice measured afresh (no embedding of an older encoder reused)
    fresh = validate(adapted.model, validation_set(hold.check, 128, 25, 0), 0, None)
    assert points[-1]["box_dice"] == pytest.approx(fresh["box_dice"], abs=1e-6)
