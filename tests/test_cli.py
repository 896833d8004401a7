"""The command line reads as one tool: option spellings, command order, one-line usage errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from peft_export.cli.app import PIPELINE_ORDER
from peft_export.cli.main import app
from peft_export.data import make_demo_data

runner = CliRunner()


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "peft_export.cli", *map(str, args)], capture_output=True, text=True)


def _commands() -> dict:
    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in group.commands}


def _visible_opts(command) -> dict[str, list[str]]:
    """Long option -> all its spellings, for the options --help shows."""
    out = {}
    for p in command.params:
        if p.param_type_name == "option" and not p.hidden:
            longs = [o for o in p.opts if o.startswith("--")]
            out[max(longs, key=len) if longs else p.opts[0]] = list(p.opts) + list(p.secondary_opts)
    return out


def test_every_command_takes_quiet_and_writers_take_out_and_overwrite():
    no_files = {"params"}  # prints only
    for name, command in _commands().items():
        opts = _visible_opts(command)
        assert set(opts.get("--quiet", [])) == {"--quiet", "-q"}, name
        assert "--no-progress" not in opts, name
        if name not in no_files:
            assert set(opts.get("--out", [])) == {"--out", "-o"}, name
            assert "--overwrite" in opts, name
        for old in ("--json", "--markdown", "--plot"):
            # one output scheme: -o; --json only where it means "print JSON"
            assert old not in opts or name in ("params", "make-demo-data"), (name, old)


def test_one_short_spelling_per_long_option_across_commands():
    short_of: dict[str, set[str]] = {}
    long_of: dict[str, set[str]] = {}
    for name, command in _commands().items():
        for long, spellings in _visible_opts(command).items():
            for s in spellings:
                if not s.startswith("--"):
                    short_of.setdefault(long, set()).add(s)
                    long_of.setdefault(s, set()).add(long)
    assert all(len(longs) == 1 for longs in long_of.values()), long_of
    assert long_of["-o"] == {"--out"} and long_of["-q"] == {"--quiet"} and long_of["-m"] == {"--model"}
    assert long_of["-c"] == {"--checkpoint"} and long_of["-d"] == {"--data"}
    # where a command has --data/--model/--checkpoint, it has the same short form
    for name, command in _commands().items():
        opts = _visible_opts(command)
        for long, short in (("--data", "-d"), ("--out", "-o"), ("--quiet", "-q"), ("--checkpoint", "-c")):
            if long in opts:
                assert short in opts[long], (name, long)


def test_help_lists_commands_in_pipeline_order():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    body = res.output.split("Commands:")[1]
    listed = [ln.split()[0] for ln in body.splitlines() if ln.startswith("  ") and ln.split()]
    known = [c for c in listed if c in PIPELINE_ORDER]
    assert known == sorted(known, key=PIPELINE_ORDER.index)
    assert known[:3] == ["make-demo-data", "params", "finetune"] and "demo" in known


@pytest.mark.parametrize("args, line", [
    (["finetune", "--bogus", "1"], "error: --bogus: no such option"),
    (["merge"], "error: --out: required option missing"),
    (["finetune", "--out", "x", "--rank", "abc"], "error: --rank: "),
    (["predict"], "error: EXPORT_DIR: required argument missing"),
    (["merg"], "error: merg: no such command; did you mean 'merge'?"),
    (["bench", "x", "--jsn", "f"], "error: --jsn: no such option"),
])
def test_usage_errors_are_one_line_exit_2(args, line, tmp_path):
    res = run_cli(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), res.stderr
    assert "Usage:" not in res.stderr and "Traceback" not in res.stderr
    # the same line in-process (the app object, as tests and embedders call it)
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and line in res.output


def test_unknown_option_suggests_visible_spellings_only():
    res = run_cli("finetune", "--no-progres")
    assert res.returncode == 2 and "did you mean" not in res.stderr  # --no-progress is deprecated: not offered
    res = run_cli("finetune", "--quite")
    assert res.returncode == 2 and "did you mean --quiet" in res.stderr


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_deprecated_spellings_still_work_with_a_warning(tmp_path):
    res = invoke("make-demo-data", tmp_path / "d", "--n-images", "1", "--size", "64")
    assert res.exit_code == 0, res.output
    assert "warning: the positional OUT of make-demo-data is deprecated" in res.output
    assert len(list((tmp_path / "d" / "images").iterdir())) == 1
    res = invoke("make-demo-data", tmp_path / "d", "-o", tmp_path / "e")
    assert res.exit_code == 2 and "not both" in res.output and not (tmp_path / "e").exists()

    ev = ["evaluate", "random:tiny", "--data", tmp_path / "d", "--prompts", "box", "--max-objects", "1", "-q"]
    res = invoke(*ev, "--json", tmp_path / "old.json")
    assert res.exit_code == 0, res.output
    assert "warning: --json FILE is deprecated" in res.output and "-o/--out DIR" in res.output
    assert json.loads((tmp_path / "old.json").read_text())["rows"][0]["model"] == "random:tiny"
    res = invoke(*ev, "--json", tmp_path / "x.json", "-o", tmp_path / "ev")
    assert res.exit_code == 2 and "not both" in res.output and not (tmp_path / "ev").exists()


def test_finetune_no_progress_alias_is_accepted(tmp_path):
    make_demo_data(tmp_path / "d", n_images=3, size=64, seed=0)
    res = invoke("finetune", "-d", tmp_path / "d", "-o", tmp_path / "r", "-m", "tiny", "--image-size", "64",
                 "--patch-size", "64", "--iterations", "1", "--objects-per-image", "1", "--sub-iterations", "0",
                 "--val-fraction", "0.34", "--val-objects", "1", "--min-object-size", "5", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "warning: --no-progress is deprecated" in res.output and "-q/--quiet" in res.output
    assert "%|" not in res.output  # no progress bar drawn


@pytest.mark.parametrize("option, line", [
    (["--n-images", "-2"], "error: --n-images: must be >= 1, got -2"),
    (["--size", "8"], "error: --size: must be >= 44"),
])
def test_make_demo_data_names_its_options_and_writes_nothing(tmp_path, option, line):
    res = runner.invoke(app, ["make-demo-data", "-o", str(tmp_path / "d"), *option])
    assert res.exit_code == 2 and res.output.strip() == res.output.strip().splitlines()[0]
    assert res.output.startswith(line), res.output
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- no traceback a user can reach


@pytest.mark.parametrize("raised, line", [
    (RuntimeError("boom\nsecond line"), "error: RuntimeError: boom (unexpected; rerun with PEFTEXPORT_DEBUG=1"),
    (MemoryError("Unable to allocate 74.5 GiB"), "error: out of memory: Unable to allocate 74.5 GiB (unexpected;"),
])
def test_unexpected_errors_are_one_line_exit_1_traceback_on_request(monkeypatch, raised, line):
    """An exception the code did not foresee (a bug, a library's own error) is one line, exit 1 (not 2:
    the input may be fine); PEFTEXPORT_DEBUG=1 lets the traceback through."""
    import peft_export.peft.params as params

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(params, "count_for_config", fail)
    monkeypatch.delenv("PEFTEXPORT_DEBUG", raising=False)
    res = runner.invoke(app, ["params", "-m", "tiny"])
    assert res.exit_code == 1 and res.output.splitlines() == [res.output.splitlines()[0]], res.output
    assert res.output.startswith(line) and "Traceback" not in res.output
    monkeypatch.setenv("PEFTEXPORT_DEBUG", "1")
    res = runner.invoke(app, ["params", "-m", "tiny"])
    assert res.exception is raised


def test_onnxruntime_run_errors_are_a_peft_export_error(tmp_path):
    """ORT's own exceptions at run time (here: a Reshape to an impossible shape, as an allocation
    failure would be) come out of OrtBackend.run as one PeftExportError naming the graph."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from peft_export.errors import PeftExportError
    from peft_export.runtime.backends.ort import OrtBackend

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [2, 3])])
    path = tmp_path / "reshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    backend = OrtBackend({"decoder": path}, "cpu", 1)
    assert backend.run("decoder", {"x": np.arange(6, dtype=np.float32)})["y"].shape == (2, 3)
    with pytest.raises(PeftExportError, match=r"^decoder: onnxruntime failed running this graph \((?!\[ONNX).*\)$"):
        backend.run("decoder", {"x": np.arange(5, dtype=np.float32)})


def test_a_command_without_its_extra_names_the_extra_to_install():
    # The core install is torch-free: a torch-side command must say which extra to install, in one line.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, n, p=None, t=None):\n"
        "        if n.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['peftexport', 'params', '--model', 'tiny']\n"
        "from peft_export.cli.main import main\n"
        "main()\n"
    )
    import subprocess
    import sys as _sys

    res = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == "error: params needs torch, which is not installed: pip install 'peftexport[torch]'"
