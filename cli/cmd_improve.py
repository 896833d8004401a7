"""``peftexport improve``: an export's decoder fine-tuned on corrected objects, written as a new export."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer

from peft_export.improve.protocol import DEFAULT_LR

from .app import command, echo
from .options import CheckpointOpt, OverwriteOpt, QuietOpt, SeedOpt


@command("improve", short="Fine-tune an export's decoder on your objects.",
         help="Train LoRA on an export's mask decoder from your images + corrected labels (cached embeddings), "
              "merge, export fp32 + int8 through the gates into a NEW export, and print held-out Dice before/after.")
def improve(
    export: Path = typer.Argument(..., help="The export folder to improve (kept unchanged)."),
    images: Path = typer.Option(..., "--images", help="Folder of images."),
    labels: Path = typer.Option(..., "--labels", help="Folder of instance labels, paired with the images by file name."),
    out: Path = typer.Option(..., "--out", "-o", help="The new export folder (written whole at the end, or not at all)."),
    source: Optional[Path] = typer.Option(None, "--source", help="The export's torch source (adapter run or "
                                          "checkpoint) when its manifest's is missing or moved."),
    checkpoint: Optional[Path] = CheckpointOpt,
    targets: str = typer.Option("dec.all", "--targets", help="Decoder layers to adapt (docs/peft_methods.md)."),
    rank: int = typer.Option(8, "--rank", help="Decoder LoRA rank."),
    steps: int = typer.Option(60, "--steps", help="Training steps (one image view each)."),
    lr: float = typer.Option(DEFAULT_LR, "--lr", help="AdamW learning rate of the decoder LoRA."),
    holdout: float = typer.Option(0.2, "--holdout", help="Share of the objects held out for the before/after check."),
    objects_per_image: int = typer.Option(8, "--objects-per-image", help="Objects prompted per step."),
    sub_iterations: int = typer.Option(1, "--sub-iterations", help="Corrective prompting rounds per step."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Flips and 90-degree rotations "
                                 "(each view encoded once)."),
    precision: str = typer.Option("fp32,int8", "--precision", help="Encoder precisions of the new export."),
    embedding_store: Optional[Path] = typer.Option(None, "--embedding-store", help="Keep the embeddings on disk too."),
    seed: int = SeedOpt,
    overwrite: bool = OverwriteOpt,
    events: bool = typer.Option(False, "--events", help="Progress as JSON lines on stdout (for a viewer: "
                                "peft_export.improve.protocol); everything else goes to stderr."),
    cancel_file: Optional[Path] = typer.Option(None, "--cancel-file", help="Stop (writing nothing) when this file "
                                               "appears."),
    quiet: bool = QuietOpt,
) -> None:
    from peft_export.errors import PeftExportError
    from peft_export.improve.loop import ImproveCancelled, improve_export
    from peft_export.improve.protocol import event_line

    out_stream = sys.stdout

    def emit(event: dict) -> None:
        if events:
            print(event_line(event), file=out_stream, flush=True)
        elif not quiet and event["event"] == "stage":
            print(event["message"], file=sys.stderr, flush=True)

    def should_stop() -> bool:
        return cancel_file is not None and cancel_file.exists()

    # With --events stdout holds only events: the library's own progress lines go to stderr.
    quiet_stdout = contextlib.redirect_stdout(sys.stderr) if events else contextlib.nullcontext()
    try:
        with quiet_stdout:
            result = improve_export(
                export, images, labels, out, source=source, checkpoint=checkpoint, targets=targets, rank=rank,
                steps=steps, lr=lr, holdout=holdout, objects_per_image=objects_per_image,
                sub_iterations=sub_iterations, augment=augment,
                precisions=tuple(p.strip() for p in precision.split(",") if p.strip()),
                embedding_store=embedding_store, seed=seed, overwrite=overwrite, progress=not (quiet or events),
                on_event=emit, should_stop=should_stop)
    except ImproveCancelled as exc:
        emit({"event": "cancelled", "message": str(exc)})
        print(f"cancelled: {exc}", file=sys.stderr)
        raise typer.Exit(130)
    except PeftExportError as exc:
        emit({"event": "error", "message": str(exc)})
        raise
    if events:
        return
    held = result["held_out"]
    echo(f"held out {held['held_out']} of {held['objects']} objects; box Dice on them (point Dice):")
    for precision_name in sorted(set(result["before"]) | set(result["after"])):
        b, a = result["before"].get(precision_name), result["after"].get(precision_name)
        show = lambda r: "-" if r is None else f"{r['box_dice']:.4f} ({r['point_dice']:.4f})"  # noqa: E731
        echo(f"  {precision_name:<5} before {show(b)}  after {show(a)}")
    for line in result["refused"]:
        echo(f"refused: {line} (left out of the new export)")
    echo(f"new export: {out} ({result['seconds']:.0f} s; its torch source: {out / 'adapter'})")
