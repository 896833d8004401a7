"""``peftexport merge`` and ``peftexport params``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .app import command, echo
from .options import (
    AdapterOpt,
    AdaptformerLegacyOpt,
    BlocksOpt,
    CheckpointOpt,
    ForceOpt,
    MicroSamOpt,
    ModelOpt,
    OverwriteOpt,
    PeftOpt,
    QuietOpt,
    RankOpt,
    TargetsOpt,
    micro_sam_config,
)


@command("merge", short="Fold an adapter into a plain SAM checkpoint, verified.", help="Fold an adapter (or a micro-sam checkpoint) into a plain SAM checkpoint, verified.")
def merge(
    out: Path = typer.Option(..., "--out", "-o", help="Merged checkpoint to write (a plain SAM state dict)."),
    adapter: Optional[Path] = AdapterOpt,
    micro_sam: Optional[Path] = MicroSamOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    model: Optional[str] = ModelOpt,
    peft: Optional[str] = PeftOpt,
    rank: Optional[int] = RankOpt,
    blocks: str = BlocksOpt,
    targets: str = TargetsOpt,
    adaptformer_residual: bool = AdaptformerLegacyOpt,
    force: bool = ForceOpt,
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Writes OUT and its report beside it (merged.pth -> merged.report.json); fails and writes
    nothing if the merged model differs from the adapter model by more than 1e-4 (relative) on a
    probe input."""
    from peft_export.peft.adapters import load_model_source
    from peft_export.errors import PeftExportError
    from peft_export.fsutil import check_can_write
    from peft_export.merge import format_merge_report, merge_to_checkpoint

    if adapter is None and micro_sam is None:
        raise PeftExportError("give --adapter RUN or --micro-sam CKPT")
    check_can_write(out, overwrite)
    cfg = micro_sam_config(micro_sam, peft, rank, blocks, targets, adaptformer_residual)
    adapted = load_model_source(adapter=adapter, micro_sam=micro_sam, checkpoint=checkpoint,
                                micro_sam_config=cfg, model_type=model, force=force)
    report = merge_to_checkpoint(adapted, out, overwrite=overwrite)
    echo(format_merge_report(report))
    echo(f"report: {report['report_path']}")


@command("params", short="Trainable parameters of a model + PEFT method.", help="Count the trainable parameters of a model + PEFT method (encoder / decoder).")
def params(
    model: str = typer.Option("vit_b", "--model", "-m", help="vit_b, vit_l, vit_h, vit_t (MobileSAM), tiny, or SAM 2.1: sam2.1_hiera_t/s/b+/l."),
    peft: str = typer.Option("lora", "--peft", help="PEFT method."),
    rank: Optional[int] = RankOpt,
    blocks: str = BlocksOpt,
    targets: str = TargetsOpt,
    bottleneck: int = typer.Option(64, "--bottleneck", help="AdaptFormer bottleneck."),
    decoder_peft: Optional[str] = typer.Option(None, "--decoder-peft", help="Method on the dec.* targets (default: --peft's)."),
    decoder_rank: Optional[int] = typer.Option(None, "--decoder-rank", help="Rank on the dec.* targets (default: --rank)."),
    train_decoder: bool = typer.Option(True, "--train-decoder/--freeze-decoder", help="Mask decoder trains."),
    train_prompt_encoder: bool = typer.Option(True, "--train-prompt-encoder/--freeze-prompt-encoder"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    quiet: bool = QuietOpt,
) -> None:
    from peft_export.peft import PeftConfig, parse_targets
    from peft_export.peft.params import count_for_config

    cfg = PeftConfig(peft, blocks=blocks, rank=rank, targets=parse_targets(targets), bottleneck=bottleneck,
                     decoder_method=decoder_peft, decoder_rank=decoder_rank, train_mask_decoder=train_decoder, train_prompt_encoder=train_prompt_encoder)
    counts = count_for_config(model, cfg)
    if as_json:
        echo(json.dumps(counts, indent=2))
        return
    for part in ("image_encoder", "prompt_encoder", "mask_decoder", "total"):
        echo(f"{part:<15} {counts[part]:>13,}")
