"""Run the commands the docs show, on the tiny model, and write their console output to docs/console/.

    python docs/gen_console.py                 # refresh docs/console/*.txt (about a minute on 2 cores)
    python docs/gen_console.py --out /tmp/c    # write elsewhere (tests/test_docs.py does, to check they still run)

Each file starts with the command line (``$ peftexport ...``) followed by what it printed; the
pages include the files (``--8<--``), so an output shown in the docs is always one this code
printed. The commands run in a scratch folder, so the paths shown are the relative ones a user
types. A command that fails (other than the ones shown failing on purpose) stops the script
with exit code 1.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (file name, command, expected exit code): small sizes and few steps, so the whole run stays short.
COMMANDS = [
    ("make_demo_data", "peftexport make-demo-data -o data --n-images 6 --size 128", 0),
    ("params", "peftexport params --model vit_b --peft lora --rank 32 --blocks late --targets q,k,v,mlp", 0),
    ("finetune", "peftexport finetune --data data --out run --model tiny --peft lora --blocks late --rank 8 "
                 "--patch-size 128 --iterations 6 --lr 1e-3 --objects-per-image 4 --sub-iterations 0 "
                 "--val-every 3 --val-fraction 0.2 -q", 0),
    ("merge", "peftexport merge --adapter run --out merged.pth", 0),
    ("merge_again", "peftexport merge --adapter run --out merged.pth", 2),
    ("merge_and_export", "peftexport merge-and-export --adapter run --out export --precision fp32 -q", 0),
    ("predict_box", "peftexport predict export data/images/demo_000.tif --box 20,20,80,80 --out pred --overlay -q", 0),
    ("predict_everything", "peftexport predict export data/images/demo_001.tif --everything --points-per-side 8 "
                           "--out pred_all -q", 0),
]


def run_all(out: Path, work: Path) -> list[str]:
    """Run every command in ``work``; write OUT/<name>.txt; return the failures (empty: all as expected)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "COLUMNS": "100", "PYTHONUNBUFFERED": "1"}
    exe = [sys.executable, "-m", "peft_export.cli"]
    failures = []
    for name, command, expected in COMMANDS:
        t = time.perf_counter()
        args = shlex.split(command)
        proc = subprocess.run(exe + args[1:], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        text = f"$ {command}\n" + proc.stdout
        (out / f"{name}.txt").write_text(text.rstrip() + "\n")
        print(f"{name}: exit {proc.returncode} in {time.perf_counter() - t:.1f} s", flush=True)
        if proc.returncode != expected:
            failures.append(f"{command}: exit {proc.returncode} (expected {expected})\n{text[-1500:]}")
    return failures


def _io(specs: list[dict]) -> str:
    return "<br>".join(f"`{t['name']}` {tuple(t['shape'])} {t['dtype']}".replace("'", "") for t in specs)


def export_tables(export: Path, out: Path) -> None:
    """OUT/export_files.md: the files of the tiny export the commands wrote, read from its manifest.json;
    OUT/export_io_1024.md: every graph's inputs and outputs at SAM's image size 1024 (``graph_io``)."""
    import json

    manifest = json.loads((export / "manifest.json").read_text())
    rows = ["| file | graph | precision | bytes | inputs | outputs |", "|---|---|---|---|---|---|"]
    for graph, by_precision in manifest["graphs"].items():
        for precision, entry in by_precision.items():
            files = " + ".join(f"`{f['path']}`" for f in entry["files"])
            rows.append(f"| {files} | {graph} | {precision} | {entry['bytes']:,} | {_io(entry['inputs'])} | "
                        f"{_io(entry['outputs'])} |")
    rows.append(f"| `manifest.json` | - | - | {(export / 'manifest.json').stat().st_size:,} | - | - |")
    head = (f"Tiny model at image size {manifest['image_size']}, written by `merge-and-export --precision fp32` "
            f"above; manifest keys: {', '.join(f'`{k}`' for k in manifest)}.\n\n")
    (out / "export_files.md").write_text(head + "\n".join(rows) + "\n")

    from peft_export.export import graph_io

    rows = ["| graph | inputs | outputs |", "|---|---|---|"]
    for graph in ("encoder", "encoder_preprocess", "decoder", "decoder_lowres", "split_image", "split_prompts",
                  "split_masks", "click_decoder", "ais_decoder"):
        inputs, outputs = graph_io(graph, 1024)
        rows.append(f"| {graph} | {_io(inputs)} | {_io(outputs)} |")
    (out / "export_io_1024.md").write_text("\n".join(rows) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "console", help="where the .txt files go")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="peftexport_docs_") as work:
        failures = run_all(args.out.resolve(), Path(work))
        if not failures:
            export_tables(Path(work) / "export", args.out.resolve())
    for f in failures:
        print(f"failed: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
