"""``peftexport demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import command, echo
from .options import QuietOpt, SeedOpt


@command("demo", short="The whole pipeline on built-in synthetic data.", help="Run the whole pipeline on built-in synthetic microscopy data.")
def demo(
    out: Path = typer.Option(Path("peftexport_demo"), "--out", "-o", help="Directory for everything the demo makes."),
    model: str = typer.Option("tiny", "--model", "-m", help="tiny (a few minutes on a laptop CPU), vit_t (MobileSAM at 256 px: minutes) or vit_b (slow on CPU)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Real SAM checkpoint (else random init)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    fast: bool = typer.Option(False, "--fast", help="Shorter training and timing (the test suite's run): "
                              "learns less far."),
    seed: int = SeedOpt,
    quiet: bool = QuietOpt,
    instances: bool = typer.Option(
        False, "--instances/--no-instances",
        help="Also train micro-sam's instance decoder with the adapter and show automatic instance segmentation "
             "(AIS) beside the point grid (needs peftexport[ais]; each step costs ~7x more: ~13 min for tiny)."),
    iterations: Optional[int] = typer.Option(
        None, "--iterations", help="Training steps (default: the model's preset, 300 for tiny, 200 with --fast)."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="torch threads (default: the cores other processes leave free, measured at the start "
                                "and printed; OMP_NUM_THREADS is respected)."),
) -> None:
    """make data -> finetune late LoRA -> merge -> export ONNX fp32+int8 -> bench -> evaluate -> predict
    (with --instances also the instance decoder, and AIS beside the point grid), then a
    summary: a short table per stage, held-out box Dice before and after, timings with the
    machine's load. The tiny default learns the synthetic nuclei (held-out box Dice ~0.68) in
    about 3.5 minutes on 2 CPU cores."""
    from peft_export.demo import format_summary, run_demo

    result = run_demo(out, model, checkpoint, overwrite=overwrite, seed=seed, progress=not quiet, log=echo,
                      fast=fast, instances=instances, iterations=iterations, threads=threads)
    echo(format_summary(result))
