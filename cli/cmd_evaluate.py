"""``peftexport evaluate``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import command, echo
from .options import (
    AdaptformerLegacyOpt,
    BlocksOpt,
    CheckpointOpt,
    ForceOpt,
    OverwriteOpt,
    PeftOpt,
    QuietOpt,
    RankOpt,
    TargetsOpt,
    micro_sam_config,
    output_files,
)


@command("evaluate", short="Dice/IoU/mSA of several models on labelled data.", help="Dice/IoU for point, box and iterative prompts (and mSA) of several models, one table.")
def evaluate(
    models: List[str] = typer.Argument(
        ...,
        metavar="MODEL...",
        help="[NAME=]SOURCE[@PRECISION][#ADAPTER]; SOURCE: checkpoint .pth, random:vit_b|vit_t|tiny, adapter run dir, "
        "micro-sam:CKPT (with --peft ...), or export dir (PRECISION fp32|fp16|int8, default fp32; ADAPTER: one "
        "adapter of an export of several).",
    ),
    data: Path = typer.Option(..., "--data", "-d", help="Data directory with images/ and labels/ (instance labels)."),
    prompts: str = typer.Option("point,box,iterative", "--prompts", help="Any of point,box,iterative."),
    iterations: int = typer.Option(8, "--iterations", help="Corrective points added in iterative prompting."),
    start: str = typer.Option("both", "--start", help="Iterative prompting starts from point, box or both."),
    everything: bool = typer.Option(False, "--everything", help="Also automatic segmentation, scored with mSA."),
    points_per_side: int = typer.Option(32, "--points-per-side", help="Point grid of --everything."),
    ais: bool = typer.Option(False, "--ais", help="Also automatic instance segmentation with the models' instance "
                             "decoders (micro-sam's defaults), scored with mSA and SA50."),
    tile: Optional[int] = typer.Option(None, "--tile", help="--ais on large images (TIFF / zarr / OME-Zarr, labels "
                                       "too): tile size in native pixels (default: the export's training scale); "
                                       "only mSA/SA50 of the tiled AIS are evaluated, exports only."),
    halo: Optional[int] = typer.Option(None, "--halo", help="Tiles: context pixels per side (default tile/4)."),
    scale: Optional[float] = typer.Option(None, "--scale", help="Tiles: model input / tile, instead of --tile."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Directory for evaluation.json (full results), evaluation.md (table) and "
        "evaluation.png (Dice per iteration, with iterative prompts)."),
    json_out: Optional[Path] = typer.Option(None, "--json", hidden=True, help="Deprecated: use -o DIR."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", hidden=True, help="Deprecated: use -o DIR."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", hidden=True, help="Deprecated: use -o DIR."),
    checkpoint: Optional[Path] = CheckpointOpt,
    image_size: Optional[int] = typer.Option(
        None, "--image-size", help="Image size of checkpoints / random models (default: the model's own)."
    ),
    backend: str = typer.Option("onnxruntime", "--backend", help="Runtime of export dirs: onnxruntime, openvino or tensorrt."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    seed: int = typer.Option(0, "--seed", help="Random seed (prompts and random models derive from it)."),
    max_objects: Optional[int] = typer.Option(None, "--max-objects", help="Evaluate at most N objects per image."),
    max_images: Optional[int] = typer.Option(None, "--max-images", help="Evaluate only the first N image files."),
    force: bool = ForceOpt,
    peft: Optional[str] = PeftOpt,
    rank: Optional[int] = RankOpt,
    blocks: str = BlocksOpt,
    targets: str = TargetsOpt,
    adaptformer_residual: bool = AdaptformerLegacyOpt,
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
    three_d: bool = typer.Option(False, "--3d", help="z-stacks (images/ and labels/ as ZYX): automatic 3D "
                                 "segmentation of exports scored with 3D mSA, beside their per-plane mSA."),
    track: bool = typer.Option(False, "--track", help="Movies (TYX; labels/NAME.tif tracked, NAME_track.txt the "
                               "lineage): tracking of exports scored with TRA, DET (CTC) and division F1."),
) -> None:
    """Every model gets the same raw images and the same seeded prompts; each applies its
    own intensity rule. One row per model. Without -o only the table is printed."""
    from peft_export.evaluation import evaluate_models
    from peft_export.fsutil import output_dir

    files = output_files(out, {"json": "evaluation.json", "markdown": "evaluation.md", "plot": "evaluation.png"},
                         {"json": json_out, "markdown": markdown_out, "plot": plot_out})
    if out is not None and "iterative" not in {p.strip() for p in prompts.split(",")}:
        files["plot"] = None  # the plot shows Dice per corrective iteration

    if three_d or track:
        return _evaluate_stacks(models, data, three_d, track, out, overwrite, quiet)
    if tile is not None or halo is not None or scale is not None:
        return _evaluate_large(models, data, ais, everything, tile, halo, scale, backend, out, overwrite, quiet)

    micro = next((m.split("=", 1)[-1] for m in models if "micro-sam:" in m), None)
    cfg = micro_sam_config(Path(micro.split("micro-sam:", 1)[1]) if micro else None, peft, rank, blocks, targets,
                           adaptformer_residual)
    with output_dir(out):
        report = evaluate_models(
            models,
            data,
            micro_sam_config=cfg,
            prompts=prompts.split(","),
            iterations=iterations,
            start=start,
            everything=everything,
            checkpoint=checkpoint,
            image_size=image_size,
            backend=backend,
            device=device,
            seed=seed,
            max_objects_per_image=max_objects,
            max_images=max_images,
            everything_options={"points_per_side": points_per_side},
            ais=ais,
            force=force,
            json_out=files["json"],
            markdown_out=files["markdown"],
            plot_out=files["plot"],
            overwrite=overwrite,
            progress=not quiet,
            log=(lambda msg: None) if quiet else None,
        )
    echo(report["table"])
    for path in files.values():
        if path is not None and path.exists():
            echo(f"wrote {path}")


def _evaluate_stacks(models, data, three_d, track, out, overwrite, quiet) -> None:
    from peft_export.errors import PeftExportError
    from peft_export.evaluation import volume

    if three_d and track:
        raise PeftExportError("--3d and --track: evaluate volumes or movies, one at a time")
    run = volume.evaluate_volumes if three_d else volume.evaluate_tracking
    _write_report(lambda: run(models, data, log=None if quiet else echo), out, overwrite)


def _write_report(make, out, overwrite) -> None:
    import json

    from peft_export.errors import PeftExportError
    from peft_export.fsutil import atomic_file, output_dir

    paths = [out / "evaluation.json", out / "evaluation.md"] if out is not None else []
    for path in paths:
        if path.exists() and not overwrite:
            raise PeftExportError(f"{path}: already exists (pass --overwrite to replace it)")
    with output_dir(out):
        report = make()
        for path, text in zip(paths, (json.dumps(report, indent=1), report["table"] + "\n")):
            with atomic_file(path, overwrite=overwrite) as tmp:
                tmp.write_text(text)
    echo(report["table"])
    for path in paths:
        echo(f"wrote {path}")


def _evaluate_large(models, data, ais, everything, tile, halo, scale, backend, out, overwrite, quiet) -> None:
    import json

    from peft_export.errors import PeftExportError
    from peft_export.evaluation.large import evaluate_large
    from peft_export.fsutil import atomic_file, output_dir

    if not ais or everything:
        raise PeftExportError("--tile/--halo/--scale: large images are evaluated with --ais (mSA of the tiled "
                              "instance segmentation), without --everything")
    paths = [out / "evaluation.json", out / "evaluation.md"] if out is not None else []
    for path in paths:
        if path.exists() and not overwrite:
            raise PeftExportError(f"{path}: already exists (pass --overwrite to replace it)")
    with output_dir(out):
        report = evaluate_large(models, data, tile=tile, halo=halo, scale=scale, backend=backend,
                                log=None if quiet else echo)
        for path, text in zip(paths, (json.dumps(report, indent=1), report["table"] + "\n")):
            with atomic_file(path, overwrite=overwrite) as tmp:
                tmp.write_text(text)
    echo(report["table"])
    for path in paths:
        echo(f"wrote {path}")
