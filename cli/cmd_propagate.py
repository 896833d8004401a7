"""``peftexport propagate``: SAM 2 propagation through a movie or a volume (torch-free runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import command, echo
from .options import OverwriteOpt, QuietOpt


@command("propagate", short="Track prompts through a movie or volume (SAM 2).",
         help="Propagate prompts given on some frames through a movie or a volume's slices with a SAM 2 export "
         "that has its memory graphs, following SAM2VideoPredictor (memories of the prompted and the last "
         "frames, object pointers; forward, then backward from the first prompted frame).")
def propagate(
    export_dir: Path = typer.Argument(..., help="SAM 2 export directory with memory graphs."),
    frames: List[Path] = typer.Argument(..., help="One stack (TIFF / NPY: slices or frames), several image files, "
                                        "or a folder of them (sorted by name)."),
    prompts: Path = typer.Option(..., "--prompts", "-p", help="JSON: {object id: {frame index: {\"points\": [[x, y]], "
                                 "\"labels\": [1], \"box\": [x0, y0, x1, y1], \"mask\": \"file\"}}} in frame pixels."),
    out: Path = typer.Option(..., "--out", "-o", help="Label stack to write (.tif, uint16 object ids)."),
    direction: str = typer.Option("both", "--direction", help="both, forward or backward from the first prompted "
                                  "frame."),
    fill_hole_area: Optional[int] = typer.Option(None, "--fill-hole-area", help="Fill mask holes up to this many "
                                                 "low-res pixels (default: the export's, 8 as in SAM 2; 0: off)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Writes OUT (labels per frame) and prints each object's voxel count."""
    from peft_export.predict.propagate import propagate_files

    record = propagate_files(export_dir, frames, prompts, out, direction=direction, overwrite=overwrite,
                             fill_hole_area=fill_hole_area, threads=threads, progress=not quiet)
    for obj, label in record["objects"].items():
        echo(f"object {obj} (label {label}): {record['voxels'][obj]} voxels")
    echo(f"{record['frames']} frames -> {record['labels']}")
