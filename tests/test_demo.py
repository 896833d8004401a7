"""`peftexport demo` end to end on the tiny model: every artefact it announces exists and is valid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tifffile
import torch

from peft_export.models import build_sam_architecture


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = subprocess.run([sys.executable, "-m", "peft_export.cli", "demo", "--out", str(out), "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_demo_announces_and_makes_every_artefact(demo_run):
    out, proc = demo_run
    assert "RANDOMLY INITIALISED" in proc.stdout  # said loudly
    assert "== demo summary ==" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for name, path in summary["artefacts"].items():
        assert Path(path).exists(), name
        assert path in proc.stdout, f"{name} not announced"
    for png in [p for p in summary["artefacts"].values() if p.endswith(".png")]:
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_demo_outputs_are_valid(demo_run):
    out, _ = demo_run
    summary = json.loads((out / "summary.json").read_text())
    art = summary["artefacts"]
    # merged checkpoint: with the instance decoder trained, micro-sam's format (SAM state dict + decoder_state)
    sam = build_sam_architecture("tiny")
    merged = torch.load(art["merged checkpoint"], weights_only=True)
    assert set(merged) == {"model_state", "decoder_state"} and len(merged["decoder_state"]) == 66
    sam.load_state_dict(merged["model_state"], strict=True)
    merge = json.loads(Path(art["merge report"]).read_text())
    assert merge["passed"] and merge["errors"]["embeddings"]["max_rel"] <= 1e-4
    # export: manifest lists files that exist with the right hashes, and the graphs are valid ONNX
    manifest = json.loads((Path(art["export"]) / "manifest.json").read_text())
    assert {"fp32", "int8"} <= set(manifest["graphs"]["encoder"])
    for graph in manifest["graphs"].values():
        for entry in graph.values():
            onnx.checker.check_model(str(Path(art["export"]) / entry["path"]))
            assert entry["parity"]["passed"]
    bench = json.loads(Path(art["benchmark json"]).read_text())
    ok = [c for c in bench["cases"] if c["status"] == "ok"]
    assert {c["backend"] for c in ok} >= {"torch", "onnxruntime"}
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert {r["model"] for r in evaluation["rows"]} == {"base", "finetuned", "onnx-fp32", "onnx-int8"}
    mask = tifffile.imread(art["prediction mask"])
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    # the numbers the summary prints come from these files
    n = summary["numbers"]
    assert n["merge max rel error (embeddings)"] == merge["errors"]["embeddings"]["max_rel"]
    assert abs(n["dice box: onnx-fp32"] - n["dice box: finetuned"]) <= 0.005


def test_demo_refuses_non_empty_out(demo_run):
    out, _ = demo_run
    proc = subprocess.run([sys.executable, "-m", "peft_export.cli", "demo", "--out", str(out), "-q"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (out / "summary.json").exists()


def test_demo_shows_automatic_instance_segmentation(demo_run):
    out, proc = demo_run
    assert "automatic instance segmentation (AIS)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    n, art = summary["numbers"], summary["artefacts"]
    ais = json.loads((out / "evaluation_ais.json").read_text())
    row = ais["rows"][0]
    assert row["model"] == "onnx-fp32" and 0 <= row["ais_msa"] <= 1 and 0 <= row["msa"] <= 1
    assert n["AIS mSA: onnx-fp32"] == round(row["ais_msa"], 4)
    assert n["point grid 16x16 mSA: onnx-fp32"] == round(row["msa"], 4)
    labels = tifffile.imread(art["AIS prediction labels"])
    assert labels.max() == n["AIS objects in one held-out image"]
    manifest = json.loads((Path(art["export"]) / "manifest.json").read_text())
    assert manifest["graphs"]["ais_decoder"]["fp32"]["parity"]["passed"]
