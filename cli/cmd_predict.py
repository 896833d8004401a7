"""``peftexport predict``: segment image files with an export dir (torch-free runtime)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import cmd_volume as vol
from .app import command, echo
from .options import OverwriteOpt, QuietOpt
from .stopped_runs import interrupted, say_resuming


@command("predict", short="Segment images: prompts, everything or AIS.", help="Segment images with an export: point/box prompts, segment-everything, or automatic instance segmentation (--instances).")
def predict(
    export_dir: Path = typer.Argument(..., help="Export directory (manifest.json + ONNX graphs)."),
    images: List[Path] = typer.Argument(..., help="Image files (TIFF, PNG, JPEG, NPY; 2D gray or RGB), zarr / "
                                        "OME-Zarr stores, or folders of them."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (created if missing), or OUT.zarr for the "
                             "labels of one large image."),
    points: Optional[str] = typer.Option(None, "--points", help="'x,y[,label];...' pixels; label 1 positive (default), 0 negative."),
    box: Optional[str] = typer.Option(None, "--box", help="'x0,y0,x1,y1' pixels."),
    everything: bool = typer.Option(False, "--everything", help="Segment every object (instance labels)."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write <stem>_overlay.png."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or int8 encoder; bf16 with --backend openvino (an export made with --precision bf16, on a CPU with native bfloat16)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    backend: str = typer.Option("onnxruntime", "--backend", help="Runtime: onnxruntime (CPU or CUDA), openvino (CPU; "
                                "with --precision bf16 on CPUs with native bfloat16) or tensorrt (the export's engines)."),
    multimask: bool = typer.Option(True, "--multimask/--single-mask", help="3 candidate masks (keep the best) or 1."),
    all_masks: bool = typer.Option(False, "--all-masks", help="Write every candidate mask (CxHxW), not only the best."),
    points_per_side: int = typer.Option(32, "--points-per-side", help="--everything: grid size."),
    pred_iou_thresh: float = typer.Option(0.88, "--pred-iou-thresh", help="--everything: predicted IoU filter."),
    stability_thresh: float = typer.Option(0.95, "--stability-thresh", help="--everything: stability score filter."),
    box_nms_thresh: float = typer.Option(0.7, "--box-nms-thresh", help="--everything: box IoU above which NMS drops the lower-scored mask."),
    min_area: int = typer.Option(0, "--min-area", help="--everything: remove holes/islands smaller than this."),
    adapter: Optional[str] = typer.Option(
        None, "--adapter", help="Export of several adapters: which one, or 'all' (results in OUT/<adapter>/)."),
    instances: bool = typer.Option(False, "--instances",
                                   help="Automatic instance segmentation with the export's instance decoder (AIS)."),
    center_distance_threshold: float = typer.Option(0.5, "--center-distance-threshold", help="--instances: seed threshold."),
    boundary_distance_threshold: float = typer.Option(0.5, "--boundary-distance-threshold", help="--instances: seed threshold."),
    foreground_threshold: float = typer.Option(0.5, "--foreground-threshold", help="--instances: foreground threshold."),
    foreground_smoothing: float = typer.Option(1.0, "--foreground-smoothing", help="--instances: Gaussian sigma (0: off)."),
    distance_smoothing: float = typer.Option(1.6, "--distance-smoothing", help="--instances: Gaussian sigma (0: off)."),
    min_size: int = typer.Option(0, "--min-size", help="--instances: remove objects with fewer pixels."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Large images (--instances, --everything or "
                                       "prompts): tile size in native pixels, resized to the model input (default: "
                                       "the export's training scale, else the model input). Results go to zarr."),
    halo: Optional[int] = typer.Option(None, "--halo", help="Tiles: context pixels per side (default tile/4)."),
    scale: Optional[float] = typer.Option(None, "--scale", help="Tiles: magnification into the model "
                                          "(model input / tile); instead of --tile."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Run tiles and images on a local Dask "
                                          "cluster of N processes (peftexport[distributed])."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Run on an existing Dask cluster: its "
                                            "scheduler address, e.g. tcp://host:8786."),
    resume: bool = typer.Option(False, "--resume", help="Skip images whose outputs are complete (their _scores.json, "
                                "written last, exists; a large image's .zarr; a stack's OUT) and redo the rest: "
                                "continues a stopped run over a folder. A stopped --instances run on a large image, or "
                                "--3d run into OUT.zarr, resumes without it."),
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
    three_d: bool = vol.ThreeDOpt,
    propagate: bool = vol.PropagateOpt,
    track: bool = vol.TrackOpt,
    axes: Optional[str] = vol.AxesOpt,
    channel: Optional[int] = vol.ChannelOpt,
    embeddings: Optional[Path] = vol.EmbeddingsOpt,
    propagation: str = vol.PropagationOpt,
    projection: str = vol.ProjectionOpt,
    iou_threshold: float = vol.IouThresholdOpt,
    box_extension: float = vol.BoxExtensionOpt,
    stop_lower: bool = vol.StopLowerOpt,
    stop_upper: bool = vol.StopUpperOpt,
    gap_closing: Optional[int] = vol.GapClosingOpt,
    min_z_extent: Optional[int] = vol.MinZExtentOpt,
    max_distance: Optional[float] = vol.MaxDistanceOpt,
    divisions: bool = vol.DivisionsOpt,
) -> None:
    """Writes <stem>_mask.tif (prompts) or <stem>_labels.tif (--everything, --instances) and <stem>_scores.json per image.
    --instances uses micro-sam's post-processing defaults. Stacks (--3d, --propagate, --track): OUT is the labels
    file, OUT.zarr or OUT.tif; prompts are z,y,x."""
    from peft_export.errors import PeftExportError
    from peft_export.predict import predict_images

    instance_options = dict(center_distance_threshold=center_distance_threshold,
                            boundary_distance_threshold=boundary_distance_threshold,
                            foreground_threshold=foreground_threshold, foreground_smoothing=foreground_smoothing,
                            distance_smoothing=distance_smoothing, min_size=min_size)
    opts = dict(points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_thresh, box_nms_thresh=box_nms_thresh, min_mask_region_area=min_area)
    if (stop_lower or stop_upper) and not propagate:
        raise PeftExportError("--stop-lower/--stop-upper: options of --propagate (where the object's propagation "
                              "stops)")
    if three_d or propagate or track:
        vol.refuse_2d_only_options(overlay=overlay, all_masks=all_masks, multimask=multimask)
        return vol.predict_stack(export_dir, images, out, three_d or propagate, propagate, track, points, box, everything,
                                 instances, instance_options, opts, axes, channel, embeddings, projection, iou_threshold,
                                 box_extension, gap_closing, min_z_extent, max_distance, divisions, precision, adapter,
                                 tile, halo, scale, workers, scheduler, overwrite, quiet, propagation, resume, device,
                                 backend, stop_lower, stop_upper)
    from peft_export.predict.large import expand_inputs

    images = expand_inputs(images)  # a folder gives its images (and .zarr stores)
    if use_large_path(images, out, tile, halo, scale, workers, scheduler):
        refuse_on_large_path(overlay=overlay, all_masks=all_masks)
        if not instances:
            return _predict_large_prompts(export_dir, images, out, points, box, everything, opts, tile, halo, scale,
                                          workers, scheduler, precision, multimask, adapter, overwrite, device,
                                          resume, quiet, backend)
        return _predict_large(export_dir, images, out, everything or bool(points) or bool(box), instances, tile,
                              halo, scale, workers, scheduler, instance_options, precision, overwrite, resume, quiet,
                              adapter, device, backend)

    records = predict_images(export_dir, images, out, points=points, box=box, everything=everything,
                             overlay=overlay, precision=precision, device=device, backend=backend, multimask=multimask,
                             all_masks=all_masks, overwrite=overwrite, everything_options=opts,
                             progress=not quiet, adapter=adapter, instances=instances, resume=resume,
                             instance_options=instance_options)
    skipped = [r for r in records if r.get("skipped")]
    if skipped:
        echo(f"skipped {len(skipped)} image(s) whose outputs are complete (--resume)")
    for r in records:
        if r.get("skipped"):
            continue
        who = f" [{r['adapter']}]" if "adapter" in r else ""
        if r["mode"] in ("everything", "instances"):
            echo(f"{r['image']}{who}: {r['n_objects']} objects -> {r['outputs']['labels']}")
            if r.get("hint"):
                echo(f"  {r['hint']}")
        else:
            echo(f"{r['image']}{who}: mask {r['best']} (predicted IoU {r['scores'][r['best']]:.3f}, "
                 f"{r['mask_area']} px) -> {r['outputs']['mask']}")
    echo(f"wrote {len(records) - len(skipped)} result(s) to {out}")


def use_large_path(images, out, tile, halo, scale, workers, scheduler) -> bool:
    """Tiles, zarr, or a Dask cluster: the large-image path (labels into zarr)."""
    from peft_export.predict.arrays import is_zarr

    return (any(v is not None for v in (tile, halo, scale, workers, scheduler)) or str(out).lower().endswith(".zarr")
            or any(is_zarr(Path(p)) for p in images))


def refuse_on_large_path(overlay: bool, all_masks: bool) -> None:
    """Options of ordinary images that the large-image path (OME-Zarr labels) does not write."""
    from peft_export.errors import PeftExportError

    why = "large images (--tile/--halo/--scale/--workers/--scheduler, zarr in or out) give OME-Zarr labels only"
    if overlay:
        raise PeftExportError(f"--overlay: not written for {why}; open the labels over the image in napari")
    if all_masks:
        raise PeftExportError(f"--all-masks: not written for {why} (the best mask of the prompt's tile)")


def _predict_large(export_dir, images, out, other_mode, instances, tile, halo, scale, workers, scheduler,
                   instance_options, precision, overwrite, resume, quiet, adapter=None, device="cpu",
                   backend="onnxruntime") -> None:
    from peft_export.errors import PeftExportError
    from peft_export.predict.large import plan_large_images, run_large, total_steps

    if other_mode:
        raise PeftExportError("--instances: cannot be combined with --points/--box/--everything")
    client = None
    if workers is not None or scheduler is not None:
        from peft_export.distributed import connect

        client = connect(workers, scheduler)  # before any output: an address that does not answer stops here
    try:
        jobs = plan_large_images(export_dir, images, out, tile=tile, halo=halo, scale=scale,
                                 instance_options=instance_options, precision=precision, overwrite=overwrite,
                                 resume=resume, adapter=adapter, device=device, backend=backend)
        say_resuming(jobs, total_steps)
        try:
            if client is not None:
                from peft_export.distributed import run_jobs

                records = run_jobs(client, jobs, progress=not quiet)
            else:
                records = [run_large(job, progress=not quiet) for job in jobs]
        except KeyboardInterrupt:
            kept = [j["partial"] for j in jobs if Path(j["partial"]).is_dir()]
            where = (f"the finished steps are kept in {kept[0]}" if len(kept) == 1 else
                     f"the finished steps of {len(kept)} images are kept in their .zarr.partial folders in {out}")
            raise interrupted(where, "run the same command again to resume") from None
    finally:
        if client is not None:
            from peft_export.distributed import close

            close(client)
    for r in records:
        echo(f"{r['image']}: {r['n_objects']} objects ({r['tiles']} tile(s) of {r['tile']} px, scale "
             f"{r['scale']:g}) -> {r['outputs']['labels']}")
        cut = (r.get("watershed") or {}).get("blocks_at_context_limit")
        if cut:
            echo(f"  warning: in {cut} watershed block(s) an object reached the {r['watershed']['largest_context']}-px "
                 "context limit: objects wider than that may be cut at block borders there")
    echo(f"wrote {len(records)} result(s) to {out}")


def _predict_large_prompts(export_dir, images, out, points, box, everything, opts, tile, halo, scale, workers,
                           scheduler, precision, multimask, adapter, overwrite, device="cpu", resume=False,
                           quiet=False, backend="onnxruntime") -> None:
    from peft_export.errors import PeftExportError
    from peft_export.predict.large_prompts import predict_large_prompts

    if workers is not None or scheduler is not None:
        raise PeftExportError("--workers/--scheduler: run --instances on a cluster; prompts and --everything on "
                              "large images run in this process")
    try:
        records = predict_large_prompts(export_dir, images, out, points=points, box=box, everything=everything,
                                        everything_options=opts, tile=tile, halo=halo, scale=scale,
                                        precision=precision, multimask=multimask, adapter=adapter,
                                        overwrite=overwrite, device=device, resume=resume, progress=not quiet,
                                        backend=backend)
    except KeyboardInterrupt:
        if str(out).endswith(".zarr"):
            raise interrupted("nothing was written (an image's result appears only when complete)",
                              "run the command again") from None
        raise interrupted(f"the images finished so far are in {out}",
                          "run the same command with --resume to skip them") from None
    skipped = [r for r in records if r.get("skipped")]
    if skipped:
        echo(f"skipped {len(skipped)} image(s) whose outputs are complete (--resume)")
    records = [r for r in records if not r.get("skipped")]
    for r in records:
        what = (f"{r['n_objects']} objects" if r["mode"] == "everything" else
                f"mask {r['best']} (predicted IoU {r['scores'][r['best']]:.3f}, {r['mask_area']} px)")
        echo(f"{r['image']}: {what} ({r['tiles']} tile(s) of {r['tile']} px, scale {r['scale']:g}) -> "
             f"{r['outputs']['labels']}")
    echo(f"wrote {len(records)} result(s) to {out}")
