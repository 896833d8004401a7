"""`--micro-sam` works as input to the commands that take an adapter (merge is tested elsewhere)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import randomize_trainables
from peft_export.data import make_demo_data
from peft_export.models import build_sam_architecture
from peft_export.peft import PeftConfig, apply_peft

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow


def _micro_sam_lora(path):
    """A micro-sam-layout LoRA checkpoint (same key names as micro-sam's peft_sam.py)."""
    sam = build_sam_architecture("tiny")
    apply_peft(sam, PeftConfig("lora", rank=4, blocks="2-3", targets=("q", "v")))
    randomize_trainables(sam, seed=1)
    torch.save({"model_state": {"sam." + k: v for k, v in sam.state_dict().items()}}, path)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "peft_export.cli", *map(str, args)], capture_output=True, text=True)


def test_evaluate_bench_and_export_take_micro_sam(tmp_path):
    _micro_sam_lora(tmp_path / "ms.pt")
    make_demo_data(tmp_path / "data", n_images=1, size=128, seed=3)
    peft = ["--peft", "lora", "--rank", "4", "--blocks", "2-3", "--targets", "q,v"]
    ev = run_cli("evaluate", f"ms=micro-sam:{tmp_path / 'ms.pt'}", "--data", tmp_path / "data", "--prompts", "box",
                 "--max-objects", "3", "-o", tmp_path / "ev", "-q", *peft)
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["rows"][0]["model"] == "ms"
    bench = run_cli("bench", "--micro-sam", tmp_path / "ms.pt", *peft, "--backend", "torch", "--no-base",
                    "--components", "encoder", "--iterations", "2", "-o", tmp_path / "b", "-q")
    assert bench.returncode == 0, bench.stderr
    cases = {c["case"]: c["status"] for c in json.loads((tmp_path / "b" / "bench.json").read_text())["cases"]}
    assert cases.get("merged torch fp32") == "ok" and cases.get("unmerged torch fp32") == "ok"
    export = run_cli("merge-and-export", "--micro-sam", tmp_path / "ms.pt", *peft, "--out", tmp_path / "exp")
    assert export.returncode == 0, export.stderr
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert manifest["merged"] and manifest["peft"]["method"] == "lora"
    wrong = run_cli("bench", "--micro-sam", tmp_path / "ms.pt", "--peft", "fact", "--backend", "torch", "-q")
    assert wrong.returncode == 2 and "check --peft fact" in wrong.stderr
