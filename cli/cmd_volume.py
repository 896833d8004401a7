"""The stack options of ``peftexport predict`` (``--3d``, ``--propagate``, ``--track``): one place
that turns them into a call of ``peft_export.volume.run`` (and, for ``--workers``/``--scheduler``,
of the Dask runner), so ``cmd_predict`` stays short."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import typer

from .app import echo
from .stopped_runs import interrupted, say_resuming

# Options of `predict` that only stacks use (added to its signature).
ThreeDOpt = typer.Option(False, "--3d", help="The input is a z-stack: automatic 3D instances (per-plane AIS or "
                         "segment-everything merged across z), or with --points/--box one object (see --propagate).")
PropagateOpt = typer.Option(False, "--propagate", help="--3d with --points 'z,y,x[,label];...' / --box "
                            "'z,x0,y0,x1,y1': carry the object from its annotated planes through the volume.")
TrackOpt = typer.Option(False, "--track", help="The input is a movie (time axis named in the file or by --axes): "
                        "per-frame instances linked into tracks with divisions; writes OUT, OUT_ctc/ (Cell "
                        "Tracking Challenge) and OUT_tracks.csv (napari Tracks).")
AxesOpt = typer.Option(None, "--axes", help="Stacks: the input's axes when the file does not name them right, e.g. "
                       "zyx, tyx, czyx.")
ChannelOpt = typer.Option(None, "--channel", help="Stacks with a channel axis: which channel to segment.")
EmbeddingsOpt = typer.Option(None, "--embeddings", help="--3d: a zarr store of the planes' embeddings, written on "
                             "the first run and reused after (no encoder run); refused if made by another export.")
PropagationOpt = typer.Option("auto", "--propagation", help="--propagate: how the object is carried through z. "
                              "prompts: micro-sam's (each plane's mask becomes the next plane's prompts; SAM "
                              "exports); sam2: SAM 2's memory (the annotated planes are its conditioning frames; a "
                              "SAM 2 export made with --video); auto (default): the one the export offers.")
ProjectionOpt = typer.Option("single_point", "--projection", help="--propagate: prompts carried from plane to "
                             "plane: box, mask, points, points_and_mask or single_point.")
IouThresholdOpt = typer.Option(0.5, "--iou-threshold", help="--propagate: stop where a plane's mask overlaps the "
                               "previous one less than this (IoU).")
BoxExtensionOpt = typer.Option(0.05, "--box-extension", help="--propagate: grow carried boxes by this fraction.")
StopLowerOpt = typer.Option(False, "--stop-lower", help="--propagate: nothing below the lowest annotated plane "
                            "(annotate the object's first plane; micro-sam's stop_lower).")
StopUpperOpt = typer.Option(False, "--stop-upper", help="--propagate: nothing above the highest annotated plane "
                            "(annotate the object's last plane: no walking on into a nucleus below or above it).")
GapClosingOpt = typer.Option(None, "--gap-closing", help="--3d: close gaps of up to N planes along z before merging.")
MinZExtentOpt = typer.Option(None, "--min-z-extent", help="--3d: drop objects spanning fewer planes.")
MaxDistanceOpt = typer.Option(None, "--max-distance", help="--track: largest move (px) between frames (default: "
                              "the median object diameter).")
DivisionsOpt = typer.Option(True, "--divisions/--no-divisions", help="--track: link dividing objects.")


def refuse_2d_only_options(overlay: bool, all_masks: bool, multimask: bool) -> None:
    """Options of 2D images that a stack run does not honour: refused, never silently ignored."""
    from peft_export.errors import PeftExportError

    if overlay:
        raise PeftExportError("--overlay: not written for stacks (--3d/--propagate/--track); open the labels over "
                              "the stack in napari")
    if all_masks:
        raise PeftExportError("--all-masks: not written for stacks; a stack run writes one labels stack")
    if not multimask:
        raise PeftExportError("--single-mask: stacks choose each plane's mask as micro-sam does (best of 3 for one "
                              "point, one mask for richer prompts); drop the option")


def predict_stack(export_dir: Path, images: List[Path], out: Path, three_d: bool, propagate: bool, track: bool,
                  points: Optional[str], box: Optional[str], everything: bool, instances: bool,
                  instance_options: Dict[str, Any], everything_options: Dict[str, Any], axes: Optional[str],
                  channel: Optional[int], embeddings: Optional[Path], projection: str, iou_threshold: float,
                  box_extension: float, gap_closing: Optional[int], min_z_extent: Optional[int],
                  max_distance: Optional[float], divisions: bool, precision: str, adapter: Optional[str],
                  tile: Optional[int], halo: Optional[int], scale: Optional[float], workers: Optional[int],
                  scheduler: Optional[str], overwrite: bool, quiet: bool, propagation: str = "auto",
                  resume: bool = False, device: str = "cpu", backend: str = "onnxruntime", stop_lower: bool = False,
                  stop_upper: bool = False) -> None:
    from peft_export.errors import PeftExportError
    from peft_export.fsutil import zarr_named
    from peft_export.volume import run

    image = run.stack_paths(images)
    if resume and not overwrite and out.exists() and not (out / "run.json").is_file():  # else: unfinished
        echo(f"{image}: skipped, {out} is complete (--resume)")
        return
    if three_d and track:
        raise PeftExportError("--3d and --track: a stack is a volume or a movie; give one")
    if (points or box) and (track or everything or instances):
        raise PeftExportError("--points/--box: with --3d they segment one object; not with --track, --everything "
                              "or --instances")
    mode = "ais" if instances else "everything" if everything else "auto"
    common = dict(axes=axes, channel=channel, precision=precision, adapter=adapter, tile=tile, halo=halo, scale=scale,
                  overwrite=overwrite, device=device, backend=backend)
    cluster = workers is not None or scheduler is not None
    slabs = three_d and not (points or box) and zarr_named(out) and embeddings is None
    if cluster and not slabs:
        raise PeftExportError("--workers/--scheduler: run automatic --3d into OUT.zarr on a cluster (slab by slab); "
                              "prompts, --embeddings and --track run in this process")
    if track:
        r = run.predict_movie(export_dir, image, out, mode, instance_options=instance_options,
                              everything_options=everything_options, progress=not quiet,
                              tracking={"max_distance": max_distance, "divisions": divisions}, **common)
        echo(f"{image}: {r['n_tracks']} tracks, {r['n_divisions']} divisions over {r['frames']} frames -> "
             f"{r['outputs']['labels']}, {r['outputs']['ctc']}, {r['outputs']['tracks']}")
        return
    merge = {"gap_closing": gap_closing, "min_z_extent": min_z_extent}
    if propagation != "auto" and not (points or box):
        raise PeftExportError("--propagation: chooses how --propagate carries an object given with --points/--box")
    if points or box:
        r = run.predict_object(export_dir, image, out, points, box, propagate, embeddings=embeddings,
                               propagation={"projection": projection, "iou_threshold": iou_threshold,
                                            "box_extension": box_extension}, progress=not quiet,
                               method=propagation, stop_lower=stop_lower, stop_upper=stop_upper, **common)
        how = f", propagation {r['propagation']}" if propagate else ""
        echo(f"{image}: object on planes {r['planes'][0]}..{r['planes'][1]} ({r['voxels']} voxels, annotated "
             f"{', '.join(map(str, r['annotated_planes']))}{how}) -> {r['outputs']['labels']}")
        return
    if propagate:
        raise PeftExportError("--propagate: give the object with --points 'z,y,x' and/or --box 'z,x0,y0,x1,y1'")
    if not slabs:
        r = run.predict_volume(export_dir, image, out, mode, instance_options=instance_options,
                               everything_options=everything_options, merge=merge, embeddings=embeddings,
                               progress=not quiet, **common)
    else:
        r = _volume_slabs(export_dir, image, out, mode, instance_options, everything_options, merge, common,
                          workers, scheduler, quiet)
    echo(f"{image}: {r['n_objects']} objects in 3D -> {r['outputs']['labels']}")


def _volume_slabs(export_dir, image, out, mode, instance_options, everything_options, merge, common, workers,
                  scheduler, quiet) -> Dict[str, Any]:
    """Slab by slab into OUT.zarr, here or on a Dask cluster, resumable as a large image's run is."""
    from peft_export.volume.slabs import finish_volume, plan_volume, read_volume_corner, run_volume, stages, total_steps

    client = None
    if workers is not None or scheduler is not None:
        from peft_export.distributed import connect

        client = connect(workers, scheduler)  # before any output: an address that does not answer stops here
    try:
        job = plan_volume(export_dir, image, out, mode, instance_options, everything_options, merge, **common)
        say_resuming([job], total_steps)
        try:
            if client is None:
                return run_volume(job, progress=not quiet)
            from peft_export.distributed import run_jobs

            return run_jobs(client, [job], progress=not quiet, stages=stages, finish=finish_volume,
                            read_input=read_volume_corner)[0]
        except KeyboardInterrupt:
            if Path(job["partial"]).is_dir():
                raise interrupted(f"the finished steps are kept in {job['partial']}",
                                  "run the same command again to resume") from None
            raise interrupted(f"the labels are complete in {job['out']}",
                              "run the same command again to finish its clean-up") from None
    finally:
        if client is not None:
            from peft_export.distributed import close

            close(client)
