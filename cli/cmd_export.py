"""``peftexport merge-and-export``."""

from __future__ import annotations

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
    MergedOpt,
    MicroSamOpt,
    ModelOpt,
    OverwriteOpt,
    PeftOpt,
    QuietOpt,
    RankOpt,
    TargetsOpt,
    micro_sam_config,
)


@command("merge-and-export", short="Merge exactly, export verified ONNX / TensorRT.", help="Merge an adapter exactly and export verified ONNX (and TensorRT) graphs.")
def merge_and_export_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Export directory to create (manifest.json + graphs)."),
    adapter: Optional[Path] = AdapterOpt,
    micro_sam: Optional[Path] = MicroSamOpt,
    merged: Optional[Path] = MergedOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    model: Optional[str] = ModelOpt,
    peft: Optional[str] = PeftOpt,
    rank: Optional[int] = RankOpt,
    blocks: str = BlocksOpt,
    targets: str = TargetsOpt,
    adaptformer_residual: bool = AdaptformerLegacyOpt,
    force: bool = ForceOpt,
    formats: str = typer.Option("onnx", "--format", help="Comma list: onnx, tensorrt (tensorrt needs a GPU)."),
    precisions: str = typer.Option("fp32", "--precision", help="Comma list: fp32, fp16, int8."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (>= 17; >= 18 with --exporter dynamo)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Model image size (default: the model's)."),
    preprocess_in_graph: bool = typer.Option(
        False, "--preprocess-in-graph", help="Also export encoder_preprocess: resized HWC image in, normalise+pad in graph."
    ),
    exporter: str = typer.Option("torchscript", "--exporter", help="Encoder exporter: torchscript or dynamo."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export directory."),
    quiet: bool = QuietOpt,
) -> None:
    """Every graph is compared with the unmerged adapter model in ONNX Runtime; any failed
    check exits non-zero and leaves nothing in OUT."""
    from peft_export.peft.adapters import load_model_source
    from peft_export.export import merge_and_export

    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    cfg = micro_sam_config(micro_sam, peft, rank, blocks, targets, adaptformer_residual)
    adapted = load_model_source(adapter=adapter, micro_sam=micro_sam, merged=merged, checkpoint=checkpoint,
                                micro_sam_config=cfg, model_type=model, image_size=image_size, force=force)
    manifest = merge_and_export(adapted, out, formats=split(formats), precisions=split(precisions), opset=opset,
                                preprocess_in_graph=preprocess_in_graph, overwrite=overwrite, progress=not quiet,
                                exporter=exporter)
    if quiet:  # the parity table is a result, not progress
        from peft_export.export.verify import format_parity_table

        echo(format_parity_table([(graph, precision, entry["parity"]) for graph, by_precision in
                                  manifest["graphs"].items() for precision, entry in by_precision.items()]))
    echo(f"manifest: {out / 'manifest.json'} ({len(manifest['graphs'])} graphs)")
