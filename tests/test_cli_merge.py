"""`peftexport merge` end to end: real files, real segment_anything loading, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.peft.adapters import save_adapter
from peft_export.merge import compare_models
from peft_export.models import build_sam_architecture, random_sam

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "peft_export.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def invoke(*args) -> subprocess.CompletedProcess:
    """The same command through the real Typer app in this process (what ``python -m peft_export.cli``
    runs once imported: option parsing, the command, its one-line errors and exit code), without a
    new interpreter importing torch (~4 s a call on 2 busy cores). Exit code, stdout and stderr apart,
    as run_cli gives them; run_cli keeps the real process for merge's success and refusal, --version,
    and the vit_t and vit_b merges."""
    from typer.testing import CliRunner

    from peft_export.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # escaped the app's own handling: show it, as a traceback would
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def test_help_lists_commands_and_version():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("merge", "params"):
        assert cmd in out.stdout
    assert run_cli("--version").stdout.startswith("peftexport ")


def test_merge_cli_writes_plain_checkpoint_and_report(tmp_path):
    adapted = make_adapted(MERGEABLE_CONFIGS["lora"])
    save_adapter(adapted, tmp_path / "run")
    out = run_cli("merge", "--adapter", tmp_path / "run", "--out", tmp_path / "merged.pth")
    assert out.returncode == 0, out.stderr
    assert "verification: passed" in out.stdout
    report = json.loads((tmp_path / "merged.report.json").read_text())
    assert f"report: {tmp_path / 'merged.report.json'}" in out.stdout
    state = torch.load(tmp_path / "merged.pth", weights_only=True)
    sam = build_sam_architecture("tiny")
    sam.load_state_dict(state, strict=True)
    # the file on disk computes what the adapter model does (measured here, not taken from the report)
    errors = compare_models(adapted.model, sam, 256)
    assert errors["mask_logits"]["max_rel"] <= 1e-4
    # ...and the report describes this file
    assert report["output"] == str(tmp_path / "merged.pth") and report["num_tensors"] == len(state)
    assert report["peft"]["method"] == "lora" and report["source"] == str(tmp_path / "run")
    # Output exists: refused, file untouched.
    before = (tmp_path / "merged.pth").stat().st_mtime_ns
    again = run_cli("merge", "--adapter", tmp_path / "run", "--out", tmp_path / "merged.pth")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert (tmp_path / "merged.pth").stat().st_mtime_ns == before


def test_two_merges_share_one_folder(tmp_path):
    """Each merged checkpoint gets its own report: a second merge into the folder is not refused."""
    for name, config in (("lora", "lora"), ("fact", "fact")):
        save_adapter(make_adapted(MERGEABLE_CONFIGS[config]), tmp_path / f"run_{name}")
        out = invoke("merge", "--adapter", tmp_path / f"run_{name}", "-o", tmp_path / "merged" / f"{name}.pth", "-q")
        if name == "lora":
            assert out.returncode == 2 and "merged: output directory does not exist" in out.stderr
            (tmp_path / "merged").mkdir()
            out = invoke("merge", "--adapter", tmp_path / f"run_{name}", "-o", tmp_path / "merged" / f"{name}.pth")
        assert out.returncode == 0, out.stderr
    names = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert names == ["fact.pth", "fact.report.json", "lora.pth", "lora.report.json"]
    reports = {n: json.loads((tmp_path / "merged" / f"{n}.report.json").read_text()) for n in ("lora", "fact")}
    assert reports["lora"]["peft"]["method"] == "lora" and reports["fact"]["peft"]["method"] == "fact"
    assert reports["fact"]["output"] == str(tmp_path / "merged" / "fact.pth")


def test_merge_report_path_is_named_after_the_output():
    from pathlib import Path

    from peft_export.merge import merge_report_path

    assert merge_report_path(Path("a/merged.pth")) == Path("a/merged.report.json")
    assert merge_report_path(Path("merged")) == Path("merged.report.json")
    assert merge_report_path(Path("m.v2.pt")) == Path("m.v2.report.json")


def test_merge_cli_micro_sam(tmp_path):
    sam = random_sam("tiny", seed=4)
    torch.save({"model_state": {"sam." + k: v for k, v in sam.state_dict().items()}}, tmp_path / "ms.pt")
    out = invoke("merge", "--micro-sam", tmp_path / "ms.pt", "--peft", "bias", "--out", tmp_path / "m.pth")
    assert out.returncode == 0, out.stderr
    no_method = invoke("merge", "--micro-sam", tmp_path / "ms.pt", "--out", tmp_path / "m2.pth")
    assert no_method.returncode == 2 and "--peft" in no_method.stderr


def test_merge_cli_micro_sam_vit_t_needs_no_peft(tmp_path):
    """micro-sam fine-tunes vit_t only fully, so its vit_t files load without --peft: the merged file is
    the checkpoint's model_state (without 'sam.') and its decoder_state, tensor for tensor."""
    from peft_export.models import random_instance_decoder

    sam = random_sam("vit_t", 1024, seed=9)
    with torch.no_grad():  # random non-zero everywhere, BatchNorm statistics included
        for t in list(sam.parameters()) + [b for b in sam.buffers() if b.is_floating_point()]:
            t.add_(torch.rand_like(t) * 0.01 + 0.001)
    state = sam.state_dict()
    decoder = random_instance_decoder(5).state_dict()
    torch.save({"model_state": {"sam." + k: v for k, v in state.items()}, "decoder_state": decoder,
                "optimizer_state": {}}, tmp_path / "vit_t_lm.pt")
    # the merge itself (vit_t at 1024) in its own process: in-process it measured slower here (30 s -> 54 s)
    out = run_cli("merge", "--micro-sam", tmp_path / "vit_t_lm.pt", "--model", "vit_t", "--out", tmp_path / "m.pth")
    assert out.returncode == 0, out.stderr
    merged = torch.load(tmp_path / "m.pth", weights_only=True)
    assert set(merged["model_state"]) == set(state) and set(merged["decoder_state"]) == set(decoder)
    assert all(torch.equal(merged["model_state"][k], v) for k, v in state.items())
    assert all(torch.equal(merged["decoder_state"][k], v) for k, v in decoder.items())
    wrong = invoke("merge", "--micro-sam", tmp_path / "vit_t_lm.pt", "--model", "vit_b", "--out", tmp_path / "b.pth")
    assert wrong.returncode == 2 and "checkpoint is vit_t" in wrong.stderr and not (tmp_path / "b.pth").exists()


@pytest.mark.parametrize(
    "setup,args,message",
    [
        ("corrupt", ["--adapter", "{d}/run"], "not a readable safetensors"),
        ("none", ["--adapter", "{d}/nothing"], "/nothing: not found (expected a finetune run directory"),
        ("emptydir", ["--adapter", "{d}/empty"], "/empty: no adapter.json in this directory"),
        ("afile", ["--adapter", "{d}/weights.bin"], "/weights.bin: not an adapter (weights.json not found"),
        ("ok", ["--adapter", "{d}/run", "--checkpoint", "{d}/missing.pth"], "checkpoint file not found"),
        ("none", ["--micro-sam", "{d}/x.pt", "--peft", "nosuch"], "unknown PEFT method"),
        ("microsam", ["--micro-sam", "{d}/ms.pt", "--peft", "lora", "--blocks", "0-9"], "out of range"),
        ("microsam", ["--micro-sam", "{d}/ms.pt", "--peft", "bias", "--model", "vit_b"], "checkpoint is tiny"),
        ("pickle", ["--micro-sam", "{d}/evil.pt", "--peft", "bias"], "pickled Python objects"),
        ("adaptformer", ["--adapter", "{d}/run"], "adaptformer cannot be merged"),
    ],
)
def test_merge_cli_bad_input(tmp_path, setup, args, message):
    if setup in ("corrupt", "ok"):
        save_adapter(make_adapted(dict(method="lora", rank=2)), tmp_path / "run")
        if setup == "corrupt":
            (tmp_path / "run" / "adapter.safetensors").write_bytes(b"broken")
    if setup == "emptydir":
        (tmp_path / "empty").mkdir()
    if setup == "afile":
        (tmp_path / "weights.bin").write_bytes(b"x")
    if setup == "adaptformer":
        save_adapter(make_adapted(dict(method="adaptformer", bottleneck=4)), tmp_path / "run")
    if setup == "microsam":
        torch.save({"model_state": {"sam." + k: v for k, v in random_sam("tiny").state_dict().items()}}, tmp_path / "ms.pt")
    if setup == "pickle":
        import collections

        torch.save({"model_state": collections.OrderedDict(), "obj": object}, tmp_path / "evil.pt")
    out = invoke("merge", *[a.format(d=tmp_path) for a in args], "--out", tmp_path / "merged.pth")
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "merged.pth").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


@pytest.mark.slow
def test_vit_b_merge_loads_with_segment_anything_registry(tmp_path):
    """Real vit_b size: the merged file loads with plain sam_model_registry and matches."""
    from segment_anything import sam_model_registry

    from peft_export.peft.adapters import build_adapted_model
    from peft_export.peft import PeftConfig, merge_peft
    from helpers import randomize_trainables

    torch.save(random_sam("vit_b", seed=0).state_dict(), tmp_path / "base.pth")
    adapted = build_adapted_model(PeftConfig("lora", rank=8, blocks="late", targets=("q", "k", "v", "mlp")),
                                  "vit_b", tmp_path / "base.pth")
    randomize_trainables(adapted.model, seed=1, scale=0.02)
    save_adapter(adapted, tmp_path / "run")
    out = run_cli("merge", "--adapter", tmp_path / "run", "--out", tmp_path / "merged.pth")
    assert out.returncode == 0, out.stderr
    # The CLI ran the unmerged adapter and the merged model at 1024 on the probe (its report); the
    # file it wrote loads with plain sam_model_registry and holds exactly the merge of this adapter.
    report = json.loads((tmp_path / "merged.report.json").read_text())
    assert report["passed"] and report["errors"]["embeddings"]["max_rel"] <= 1e-4
    assert report["errors"]["mask_iou"] >= 0.999
    sam = sam_model_registry["vit_b"](checkpoint=str(tmp_path / "merged.pth"))
    expected = merge_peft(adapted.model).state_dict()
    loaded = sam.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    base = random_sam("vit_b", seed=0).state_dict()
    assert not all(torch.equal(loaded[k], base[k]) for k in base)  # the adapter changed the weights


def test_a_model_option_contradicting_the_adapter_is_refused(tmp_path):
    # `merge-and-export --adapter <vit_t run> --model vit_b` once exported vit_t and exited 0.
    from peft_export.peft import PeftConfig
    from peft_export.peft.adapters import build_adapted_model

    adapted = build_adapted_model(PeftConfig("lora", rank=2, blocks="late"), "vit_t", None, 256, seed=0)
    save_adapter(adapted, tmp_path / "run")
    for command, model, out_path in ((["merge-and-export", "--precision", "fp32"], "vit_b", tmp_path / "export"),
                                     (["merge"], "tiny", tmp_path / "merged.pth")):
        out = invoke(*command, "--adapter", tmp_path / "run", "--model", model, "--out", out_path)
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert out.returncode == 2 and len(errors) == 1, out.stdout + out.stderr
        assert f"adapter was trained on vit_t, --model {model} was asked" in errors[0]
        assert "Traceback" not in out.stderr and not out_path.exists()
    # several adapters: each one is checked against the option
    out = invoke("merge-and-export", "--adapter", f"a={tmp_path / 'run'}", "--adapter", f"b={tmp_path / 'run'}",
                 "--model", "vit_b", "--out", tmp_path / "multi")
    assert out.returncode == 2 and "--model vit_b was asked" in out.stderr and not (tmp_path / "multi").exists()
    # the option that agrees (or none) is accepted
    out = invoke("merge", "--adapter", tmp_path / "run", "--model", "vit_t", "--out", tmp_path / "merged.pth")
    assert out.returncode == 0, out.stderr
