"""``peftexport finetune`` and ``peftexport make-demo-data``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import command, deprecated, echo
from .options import CheckpointOpt, OverwriteOpt, QuietOpt, RankOpt, SeedOpt


@command("finetune", short="Train a PEFT adapter on images + instance labels.", help="Train a PEFT adapter on images + instance labels (micro-sam's recipe); torchrun for DDP.")
def finetune(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: best adapter, last/ checkpoint, logs, plot."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Directory with images/ and labels/ (paired by name)."),
    images: Optional[str] = typer.Option(None, "--images", help="Glob of image files (with --labels)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Glob of label files (with --images)."),
    labels_are: str = typer.Option("instance", "--labels-are", help="instance, or semantic (connected components)."),
    val_data: Optional[Path] = typer.Option(None, "--val-data", help="Validation directory with images/ and labels/."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Files held out for validation (seeded)."),
    patch_size: int = typer.Option(512, "--patch-size", help="Training patch size in pixels."),
    min_object_size: int = typer.Option(25, "--min-object-size", help="Objects with fewer pixels are ignored."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random flips and 90-degree rotations."),
    intensity_low: float = typer.Option(1.0, "--intensity-low", help="Percentile mapped to 0."),
    intensity_high: float = typer.Option(99.8, "--intensity-high", help="Percentile mapped to 255."),
    model: str = typer.Option("vit_b", "--model", "-m", help="vit_b, vit_l, vit_h, vit_t (MobileSAM), tiny, or SAM 2.1: sam2.1_hiera_t/s/b+/l."),
    checkpoint: Optional[Path] = CheckpointOpt,
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Model input size (default: the model's)."),
    peft: str = typer.Option("lora", "--peft", help="PEFT method (see `peftexport params`)."),
    blocks: str = typer.Option("late", "--blocks", help="Encoder blocks: all, late, a range 6-11 or a list 0,3,5."),
    rank: Optional[int] = RankOpt,
    alpha: float = typer.Option(1.0, "--alpha", help="LoRA scale."),
    targets: str = typer.Option("q,k,v,mlp", "--targets", help="LoRA's encoder targets (any of q,k,v,mlp) and mask-decoder "
                                "layers for every method that fits (dec.all, dec.attn, dec.mlp, dec.hyper, ...; "
                                "docs/peft_methods.md). Decoder-only: --blocks none --targets dec.all."),
    decoder_peft: Optional[str] = typer.Option(None, "--decoder-peft", help="Method on the dec.* targets "
                                               "(lora, ssf, fact, adaptformer; default: --peft's)."),
    decoder_rank: Optional[int] = typer.Option(None, "--decoder-rank", help="LoRA/FacT rank on the dec.* targets "
                                               "(default: --rank)."),
    dropout: float = typer.Option(0.1, "--dropout", help="FacT dropout."),
    bottleneck: int = typer.Option(64, "--bottleneck", help="AdaptFormer bottleneck."),
    freeze_decoder: bool = typer.Option(False, "--freeze-decoder", help="Keep the mask decoder frozen."),
    freeze_prompt_encoder: bool = typer.Option(False, "--freeze-prompt-encoder", help="Keep the prompt encoder frozen."),
    instance_decoder: bool = typer.Option(
        False, "--instance-decoder",
        help="Also train micro-sam's instance decoder for automatic instance segmentation (AIS; needs peftexport[ais])."),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="Training steps (or --epochs)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (one patch per training image; default 20)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Images per step and process."),
    lr: float = typer.Option(1e-5, "--lr", help="AdamW learning rate."),
    weight_decay: float = typer.Option(0.01, "--weight-decay"),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Gradient norm clip (0: off)."),
    objects_per_image: int = typer.Option(25, "--objects-per-image", help="Objects prompted per image and step."),
    sub_iterations: int = typer.Option(8, "--sub-iterations", help="Corrective prompting iterations per step."),
    objects_per_pass: Optional[int] = typer.Option(
        None, "--objects-per-pass",
        help="Objects through the mask decoder at a time (gradients add up; the result is the same, "
             "memory grows with it). Default: all on a GPU; on the CPU 2 at 1024 px, 8 at 512 px, 32 at 256 px."),
    patience: int = typer.Option(10, "--patience", help="Early stop after this many validations without gain."),
    lr_patience: int = typer.Option(3, "--lr-patience", help="ReduceLROnPlateau patience (validations)."),
    val_every: Optional[int] = typer.Option(None, "--val-every", help="Validate every N steps (default: every epoch)."),
    val_objects: int = typer.Option(25, "--val-objects", help="Objects per validation image (seeded choice)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (fp16: CUDA, with GradScaler)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="torch threads on the CPU (default: the cores other processes leave free, measured "
                                "at the start; OMP_NUM_THREADS is respected)."),
    seed: int = SeedOpt,
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute adapted blocks in backward."),
    cache_frozen_trunk: bool = typer.Option(False, "--cache-frozen-trunk",
                                            help="Cache the frozen blocks' output per image (needs fixed patches)."),
    cache_embeddings: bool = typer.Option(
        False, "--cache-embeddings",
        help="Image encoder frozen (decoder targets only, or --peft freeze-encoder): encode each training view once "
             "and train the decoder on the kept embeddings (flips/rotations: each view encoded the first time it "
             "is drawn; images larger than --patch-size: fixed tiles instead of random crops)."),
    embedding_store: Optional[Path] = typer.Option(
        None, "--embedding-store", help="Also keep the cached embeddings in this folder (one .npy per view; "
                                        "a resumed or repeated run reuses them). Implies --cache-embeddings."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Also write last/ every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from last/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    quiet: bool = QuietOpt,
    no_progress: bool = typer.Option(False, "--no-progress", hidden=True, help="Deprecated: use -q/--quiet."),
) -> None:
    """Writes OUT/adapter.safetensors + adapter.json (best validation Dice), OUT/last/checkpoint.pt,
    train_log.jsonl and training.png. Data problems are reported all at once before training."""
    from peft_export.runtime.intensity import DEFAULT_INTENSITY_RULE
    from peft_export.training import TrainConfig
    from peft_export.training import finetune as run_finetune

    if no_progress:
        deprecated("--no-progress", "-q/--quiet")
    intensity = {**DEFAULT_INTENSITY_RULE, "low": intensity_low, "high": intensity_high}
    cfg = TrainConfig(
        out=str(out), data=str(data) if data else None, images=images, labels=labels, labels_are=labels_are,
        val_data=str(val_data) if val_data else None, val_fraction=val_fraction, patch_size=patch_size,
        min_object_size=min_object_size, augment=augment, intensity=intensity, model_type=model,
        checkpoint=str(checkpoint) if checkpoint else None, image_size=image_size, peft=peft, blocks=blocks,
        rank=rank, alpha=alpha, targets=tuple(t for t in targets.split(",") if t), dropout=dropout,
        bottleneck=bottleneck, decoder_peft=decoder_peft, decoder_rank=decoder_rank, freeze_decoder=freeze_decoder, freeze_prompt_encoder=freeze_prompt_encoder,
        instance_decoder=instance_decoder,
        iterations=iterations, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        grad_clip=grad_clip, objects_per_image=objects_per_image, sub_iterations=sub_iterations,
        objects_per_pass=objects_per_pass, patience=patience,
        lr_patience=lr_patience, val_every=val_every, val_objects=val_objects, precision=precision, device=device,
        threads=threads, seed=seed, grad_checkpointing=grad_checkpointing, cache_frozen_trunk=cache_frozen_trunk,
        cache_embeddings=cache_embeddings or embedding_store is not None,
        embedding_store=str(embedding_store) if embedding_store else None,
        save_every=save_every, resume=resume, overwrite=overwrite, progress=not (quiet or no_progress),
        explicit=_given_fields(ctx),
    )
    summary = run_finetune(cfg)
    if summary["world_size"] > 1 and summary.get("rank", 0) != 0:
        return
    best = summary["best_validation"] or {}
    echo(f"status: {summary['status']} after {summary['steps']}/{summary['total_steps']} steps "
         f"({summary['seconds']:.1f} s, peak memory {summary['peak_memory_mb']:.0f} MB)")
    if best:
        ais = f", AIS mSA {best['ais_msa']:.4f}" if best.get("ais_msa") is not None else ""
        echo(f"best validation (step {summary['best_step']}): point Dice {best['point_dice']:.4f}, "
             f"box Dice {best['box_dice']:.4f}{ais}")
    if summary.get("embeddings"):
        e = summary["embeddings"]
        echo(f"embeddings: {e['encoded']} encoder passes, {e['reused']} reused")
    echo(f"adapter: {Path(summary['out']) / 'adapter.safetensors'}")
    if summary["status"] == "interrupted":
        echo(f"resume with: peftexport finetune --out {summary['out']} --resume")
        raise typer.Exit(130)


# CLI parameters whose TrainConfig field has another name.
_FIELD_OF = {"model": "model_type", "intensity_low": "intensity", "intensity_high": "intensity", "quiet": "progress",
             "no_progress": "progress"}


def _given_fields(ctx: typer.Context) -> tuple[str, ...]:
    """The TrainConfig fields the user typed (so --resume can refuse options that differ from the run)."""
    given = [p.name for p in ctx.command.params
             if ctx.get_parameter_source(p.name) is not None and ctx.get_parameter_source(p.name).name != "DEFAULT"]
    return tuple(sorted({_FIELD_OF.get(n, n) for n in given}))


DEMO_MIN_SIZE = 44  # data/synthetic.py places nuclei of radius up to 20 px with a 2 px margin: 2 * 20 + 4


@command("make-demo-data", short="Write synthetic nuclei images + instance labels.", help="Write synthetic fluorescence-nuclei images + instance labels (images/, labels/).")
def make_demo_data(
    out_arg: Optional[Path] = typer.Argument(None, metavar="OUT", hidden=True, help="Deprecated: use -o OUT."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (gets images/ and labels/)."),
    n_images: int = typer.Option(8, "--n-images", help="Number of images."),
    size: int = typer.Option(256, "--size", help="Image side in pixels."),
    seed: int = SeedOpt,
    overwrite: bool = OverwriteOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the written pairs as JSON."),
    quiet: bool = QuietOpt,
    volume: bool = typer.Option(False, "--volume", help="3D nuclei z-stacks (ellipsoids, z sampled 2x coarser) "
                                "with 3D instance labels, for predict/evaluate --3d and finetune."),
    movie: bool = typer.Option(False, "--movie", help="2D+t movies of moving, some dividing nuclei with tracked "
                               "labels and the CTC lineage (labels/NAME_track.txt), for predict/evaluate --track."),
    depth: int = typer.Option(32, "--depth", help="--volume: planes per stack."),
    frames: int = typer.Option(20, "--frames", help="--movie: frames per movie."),
) -> None:
    from peft_export.data import make_demo_data as make
    from peft_export.errors import PeftExportError

    if out_arg is not None:
        deprecated("the positional OUT of make-demo-data", "-o/--out OUT")
        if out is not None:
            raise PeftExportError(f"{out_arg}: give the output directory either as -o/--out or positionally, not both")
        out = out_arg
    if out is None:
        raise PeftExportError("--out: required option missing (see 'peftexport make-demo-data --help')")
    # Checked here, before anything is written, in the options' own names (the library says n_images/radius).
    if n_images < 1:
        raise PeftExportError(f"--n-images: must be >= 1, got {n_images}")
    if size < DEMO_MIN_SIZE:
        raise PeftExportError(f"--size: must be >= {DEMO_MIN_SIZE} (the largest nuclei are 40 px across), got {size}")

    if volume or movie:
        from peft_export.data import make_movie_data, make_volume_data

        if volume and movie:
            raise PeftExportError("--volume and --movie: give one")
        if (depth if volume else frames) < 2:
            raise PeftExportError(f"--{'depth' if volume else 'frames'}: must be >= 2")
        written = (make_volume_data(out, n_images, (depth, size, size), seed, overwrite=overwrite) if volume else
                   make_movie_data(out, n_images, frames, size, seed, overwrite=overwrite))
        if as_json:
            echo(json.dumps([{"image": str(i), "label": str(lab)} for i, lab in written], indent=2))
            return
        what = f"{depth}x{size}x{size} volume(s)" if volume else f"{frames}-frame {size}x{size} movie(s)"
        echo(f"wrote {len(written)} {what} with labels to {out}/images and {out}/labels")
        return
    pairs = make(out, n_images=n_images, size=size, seed=seed, overwrite=overwrite)
    if as_json:
        echo(json.dumps([{"name": p.name, "image": str(p.image), "label": str(p.label)} for p in pairs], indent=2))
        return
    echo(f"wrote {len(pairs)} image/label pairs ({size}x{size}) to {out}/images and {out}/labels")
