"""`peftexport evaluate`: model specs, torch vs ONNX parity, finetuned vs base, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.peft.adapters import save_adapter
from peft_export.data import make_demo_data, synthetic_sample
from peft_export.errors import PeftExportError
from peft_export.evaluation import evaluate_models, load_raw_samples
from peft_export.evaluation.specs import TorchPredictor, parse_model_spec, parse_model_specs

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow

warnings.filterwarnings("ignore", message="no checkpoint given")


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "peft_export.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    make_demo_data(d, n_images=2, size=128, seed=3, n_objects=(2, 4), radius=(8.0, 16.0))
    return d


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "lora_run"
    save_adapter(make_adapted(MERGEABLE_CONFIGS["lora"]), run)
    return run


# ---------------------------------------------------------------------- specs

def test_parse_model_specs(tmp_path, lora_run):
    (tmp_path / "model.pth").write_bytes(b"x")
    export = tmp_path / "exp"
    export.mkdir()
    (export / "manifest.json").write_text("{}")

    s = parse_model_spec("random:tiny")
    assert (s.kind, s.name, s.precision) == ("random", "random:tiny", None)
    s = parse_model_spec(f"mine={lora_run}")
    assert (s.kind, s.name, s.source) == ("adapter", "mine", str(lora_run))
    assert parse_model_spec(str(lora_run / "adapter.json")).kind == "adapter"
    s = parse_model_spec(f"{export}@int8")
    assert (s.kind, s.name, s.precision, s.source) == ("export", "exp@int8", "int8", str(export))
    s = parse_model_spec(str(tmp_path / "model.pth"))
    assert (s.kind, s.name) == ("checkpoint", "model")

    for bad, words in [("random:vit_x", "unknown model type"), (str(tmp_path / "nope.pth"), "no such file"),
                       (f"{export}@int4", "unknown precision"), (f"{lora_run}@int8", "needs an export dir"),
                       (str(tmp_path), "neither manifest.json")]:
        with pytest.raises(PeftExportError, match=words) as exc:
            parse_model_spec(bad)
        assert bad in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(PeftExportError, match="display name"):
        parse_model_specs(["random:tiny", "random:tiny"])
    assert [s.name for s in parse_model_specs(["random:tiny", "b=random:tiny"])] == ["random:tiny", "b"]


def test_raw_samples_keep_intensities(demo_dir):
    samples = load_raw_samples(demo_dir)
    assert [s.name for s in samples] == ["demo_000", "demo_001"]
    assert samples[0].image.dtype == np.uint16 and samples[0].image.max() > 255  # not normalised
    assert samples[0].label.dtype == np.int32 and samples[0].label.max() >= 2


def test_torch_predictor_matches_sampredictor_on_normalised_uint8():
    """Raw uint16 in, same result as SamPredictor given the normalised uint8 image by hand."""
    from segment_anything import SamPredictor

    from peft_export.runtime.intensity import DEFAULT_INTENSITY_RULE, normalize_intensity

    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128)
    image, label = synthetic_sample(96, seed=5, n_objects=2, radius=(8.0, 12.0))
    pred = TorchPredictor(adapted.model, adapted.intensity)
    pred.set_image(image)
    ref = SamPredictor(adapted.model)
    rgb = np.clip(np.rint(normalize_intensity(image, DEFAULT_INTENSITY_RULE)), 0, 255).astype(np.uint8)
    ref.set_image(rgb)
    box = np.array([10, 12, 50, 60], np.float32)
    m1, s1, l1 = pred.predict(box=box, multimask_output=False)
    m2, s2, l2 = ref.predict(box=box, multimask_output=False)
    assert m1.shape == (1, 96, 96) and l1.shape == (1, 32, 32)  # 128px model: 4g = 32
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_allclose(l1, l2, atol=1e-5)
    labels, records = pred.segment_everything(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert labels.shape == (96, 96) and labels.dtype == np.int32 and len(records) >= 1
    assert labels.max() <= len(records)


# ---------------------------------------------------------------------- finetuned model

@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny model finetuned (decoder only) on synthetic nuclei, with held-out data."""
    from peft_export.training import TrainConfig, finetune  # our own code: an ImportError fails
    root = tmp_path_factory.mktemp("ft")
    make_demo_data(root / "train", n_images=4, size=128, seed=11, n_objects=(3, 5), radius=(8.0, 16.0))
    make_demo_data(root / "test", n_images=2, size=128, seed=12, n_objects=(3, 5), radius=(8.0, 16.0))
    summary = finetune(TrainConfig(
        out=str(root / "run"), data=str(root / "train"), model_type="tiny", image_size=128,
        peft="freeze-encoder", patch_size=128, lr=3e-3, iterations=20, val_fraction=0.0, objects_per_image=5,
        sub_iterations=0, validate_at_start=False, device="cpu", seed=0, progress=False,
    ))
    assert summary["status"] == "completed"
    return {"run": root / "run", "test": root / "test"}


def test_finetuned_beats_base_on_held_out_boxes(finetuned):
    report = evaluate_models(["base=random:tiny", f"finetuned={finetuned['run']}"], finetuned["test"],
                             prompts=["box"], image_size=128, progress=False, log=quiet)
    base = report["models"]["base"]["interactive"]["metrics"]["box"]["dice"]
    tuned = report["models"]["finetuned"]["interactive"]["metrics"]["box"]["dice"]
    print(f"box Dice on held-out data: base {base:.4f}, finetuned {tuned:.4f}")
    assert tuned > base + 0.1


# ---------------------------------------------------------------------- parity

def test_torch_and_onnx_fp32_export_agree(tmp_path, demo_dir, finetuned):
    """Unmerged adapter, merged checkpoint (torch) and its ONNX fp32 export score the same."""
    pytest.importorskip("onnxruntime")
    from peft_export.peft.adapters import load_adapter
    from peft_export.export import merge_and_export
    from peft_export.merge import merge_to_checkpoint
    from peft_export.evaluation.specs import load_predictor

    if finetuned is not None:
        adapted, run, data = load_adapter(finetuned["run"]), finetuned["run"], finetuned["test"]
    else:  # random adapter weights: still a parity check, on near-meaningless masks
        adapted, run, data = make_adapted(MERGEABLE_CONFIGS["lora"]), tmp_path / "run", demo_dir
        save_adapter(adapted, run)
    merge_to_checkpoint(adapted, tmp_path / "merged.pth", overwrite=False)
    merge_and_export(adapted, tmp_path / "exp", precisions=("fp32",), progress=False)
    specs = [f"torch={tmp_path / 'merged.pth'}", f"onnx={tmp_path / 'exp'}@fp32"]
    report = evaluate_models(specs, data, iterations=3, everything=True, progress=False, log=quiet,
                             everything_options={"points_per_side": 6, "pred_iou_thresh": 0.0,
                                                 "stability_score_thresh": 0.0})
    print(report["table"])
    t, o = report["models"]["torch"], report["models"]["onnx"]
    assert (t["backend"], o["backend"]) == ("torch", "onnxruntime")
    for key, m in t["interactive"]["metrics"].items():
        assert abs(m["dice"] - o["interactive"]["metrics"][key]["dice"]) <= 0.005, key
        if "dice_curve" in m:
            np.testing.assert_allclose(m["dice_curve"], o["interactive"]["metrics"][key]["dice_curve"], atol=0.005)
    assert all(e["n_pred"] > 0 for e in o["automatic"]["per_image"])
    assert abs(t["automatic"]["msa"] - o["automatic"]["msa"]) <= 0.02
    # The unmerged adapter (torch, PEFT layers in place) scores as its merged checkpoint.
    unmerged = evaluate_models([f"adapter={run}"], data, prompts=["point", "box"], progress=False, log=quiet)
    for key, m in unmerged["models"]["adapter"]["interactive"]["metrics"].items():
        assert abs(m["dice"] - t["interactive"]["metrics"][key]["dice"]) <= 0.005, key
    # Same prompts for every model (they come from the labels only).
    for it, io in zip(t["interactive"]["per_image"], o["interactive"]["per_image"]):
        assert [x["prompt_box"] for x in it["objects"]] == [x["prompt_box"] for x in io["objects"]]
        assert [x["prompt_point"] for x in it["objects"]] == [x["prompt_point"] for x in io["objects"]]

    # The masks themselves, from the raw uint16 image: same pixels in, same logits out.
    sample = load_raw_samples(data)[0]
    preds = [load_predictor(parse_model_spec(s)).predictor for s in specs]
    box = np.array([20, 24, 70, 80], np.float32)
    outs = []
    for p in preds:
        p.set_image(sample.image)
        outs.append(p.predict(box=box, multimask_output=False))
    (m_t, s_t, l_t), (m_o, s_o, l_o) = outs
    assert 0 < m_t.sum() and m_t.shape == m_o.shape
    assert (m_t != m_o).mean() < 0.002
    np.testing.assert_allclose(l_t, l_o, atol=2e-3 * max(1.0, float(np.abs(l_t).max())))
    np.testing.assert_allclose(s_t, s_o, atol=1e-3)


# ---------------------------------------------------------------------- CLI

def test_cli_writes_json_markdown_plot(tmp_path, demo_dir, lora_run):
    from typer.testing import CliRunner

    from peft_export.cli.main import app

    # In-process (a subprocess is tested below): the same Typer app the console script runs.
    args = ["evaluate", "random:tiny", lora_run, "--data", demo_dir, "--iterations", "2", "--max-objects", "2",
            "-o", tmp_path / "ev", "--quiet"]
    out = CliRunner().invoke(app, [str(a) for a in args])
    assert out.exit_code == 0, (out.output, out.exception)
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["model", "objects", "dice_point", "dice_box", "dice_iterative_point",
                                "dice_iterative_box"]
    assert [ln.split()[0] for ln in lines[2:4]] == ["random:tiny", "lora_run"]
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["random:tiny", "lora_run"]
    for row in report["rows"]:
        for k in ("dice_point", "dice_box", "dice_iterative_point", "dice_iterative_box"):
            assert 0.0 <= row[k] <= 1.0
        assert row["objects"] == 4  # 2 images, at most 2 objects each
    curve = report["models"]["lora_run"]["interactive"]["metrics"]["iterative_box"]["dice_curve"]
    assert len(curve) == 3
    assert report["models"]["lora_run"]["peft"]["method"] == "lora"
    assert report["models"]["random:tiny"]["kind"] == "random"
    md = (tmp_path / "ev" / "evaluation.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| random:tiny") or ln.startswith("| lora_run")]
    assert len(table) == 4  # metrics table + model description table
    assert (tmp_path / "ev" / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Existing outputs are refused without overwrite, before any model runs.
    with pytest.raises(PeftExportError, match="evaluation.json: already exists"):
        evaluate_models(["random:tiny"], demo_dir, json_out=tmp_path / "ev" / "evaluation.json", progress=False,
                        log=quiet)


def test_cli_bad_model_spec_exits_2(tmp_path, demo_dir):
    out = run_cli("evaluate", "random:tiny", tmp_path / "missing_run", "--data", demo_dir,
                  "-o", tmp_path / "o")
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "missing_run" in errors[0]
    assert not (tmp_path / "o").exists()  # the refused command leaves no output directory
