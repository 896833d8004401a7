"""``peftexport merge-and-export``."""

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
    MergedOpt,
    ModelOpt,
    OverwriteOpt,
    PeftOpt,
    QuietOpt,
    RankOpt,
    TargetsOpt,
)


@command("merge-and-export", short="Merge exactly, export verified ONNX / TensorRT.", help="Merge an adapter exactly and export verified ONNX (and TensorRT) graphs.\n\n"
         "Exit status: 0 every graph written; 3 written, but some optional graphs (int8 / fp16 encoder, split, click "
         "or AIS decoder, TensorRT engine) failed their gate and were left out (a 'refused:' line each, listed in manifest.json "
         "'refused'); 2 bad input, or the fp32 reference failed: nothing written. --strict: any refusal is exit 2.")
def merge_and_export_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Export directory to create (manifest.json + graphs)."),
    adapter: List[str] = typer.Option(
        [], "--adapter", help="Adapter run directory; repeat as NAME=RUN for one export of several adapters."),
    micro_sam: List[str] = typer.Option(
        [], "--micro-sam", help="micro-sam checkpoint (needs --peft ...); repeat as 'NAME=CKPT[;peft=..;rank=..;blocks=..;targets=..]'."),
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
    precisions: str = typer.Option("fp32", "--precision", help="Comma list: fp32, fp16, int8, bf16 (bf16: the fp32 graphs in OpenVINO's bf16 mode, verified here; needs openvino and a CPU with native bfloat16, AVX512_BF16 or AMX)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (>= 17; >= 18 with --exporter dynamo)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Model image size (default: the model's)."),
    preprocess_in_graph: bool = typer.Option(
        False, "--preprocess-in-graph", help="Also export encoder_preprocess: resized HWC image in, normalise+pad in graph."
    ),
    exporter: str = typer.Option("torchscript", "--exporter", help="Encoder exporter: torchscript or dynamo."),
    shared_trunk: Optional[bool] = typer.Option(
        None, "--shared-trunk/--no-shared-trunk",
        help="Several adapters: require one shared trunk (refused if an adapter changes the patch embedding), or "
             "give each its own encoder (default: share among those that can)."),
    attention: str = typer.Option(
        "plain", "--attention", help="Encoder attention: plain, folded (rel-pos folded, SDPA) or fused (ONNX Runtime's MultiHeadAttention)."),
    calibration_data: Optional[Path] = typer.Option(
        None, "--calibration-data", help="Directory of your images: int8 becomes static QDQ calibrated on them (recorded in the manifest)."),
    meta_decoder: bool = typer.Option(
        False, "--meta-decoder/--no-meta-decoder",
        help="Also write Meta's decoder.onnx (segment_anything's interface) and decoder_lowres.onnx (its batched "
             "low-res form), for other tools; peftexport itself runs the decoder family (split_image, split_prompts, "
             "split_masks) for every prompt (--format tensorrt writes decoder_lowres for its engine)."),
    video: bool = typer.Option(
        False, "--video", help="SAM 2: also the memory graphs, so the export propagates prompts through movies and "
        "volumes (peftexport propagate)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export directory."),
    strict: bool = typer.Option(
        False, "--strict", help="All or nothing: any refused graph (e.g. int8) fails the export and writes nothing."),
    quiet: bool = QuietOpt,
) -> None:
    """Every graph is compared with the unmerged adapter model in ONNX Runtime (and OpenVINO).
    Exit status: 0 all written; 3 written, but some optional graphs (int8 / fp16 encoder, split,
    click or AIS decoder, TensorRT engine) failed their gate and were left out (one 'refused:'
    line each, listed in manifest.json's 'refused'); 2 bad input or a failed fp32 graph (the
    reference): nothing written.
    --strict: any refusal exits 2 and writes nothing. Several --adapter / --micro-sam entries make
    one export whose adapters share the frozen early encoder blocks (trunk.onnx + head per adapter)."""
    from peft_export.errors import PeftExportError
    from peft_export.export import merge_and_export, merge_and_export_adapters
    from peft_export.export.sources import load_named_sources
    from peft_export.peft.adapters import load_model_source

    split = lambda s: tuple(x.strip() for x in s.split(",") if x.strip())  # noqa: E731
    if merged is not None or not (adapter or micro_sam):
        if adapter or micro_sam:
            raise PeftExportError("--merged: give a merged checkpoint alone (it records no changed blocks to share)")
        adapted = load_model_source(merged=merged, model_type=model, image_size=image_size)
    else:
        options = dict(peft=peft, rank=rank, blocks=blocks, targets=targets)
        options["adaptformer-residual"] = adaptformer_residual
        adapters = load_named_sources(adapter, micro_sam, checkpoint, options, model_type=model,
                                      image_size=image_size, force=force)
        if len(adapters) > 1 or shared_trunk is not None:
            if video:
                raise PeftExportError("--video: exports of several adapters have no memory graphs; export one model")
            if calibration_data is not None:
                raise PeftExportError("--calibration-data applies to single-adapter exports; "
                                      "several adapters export with dynamic int8")
            manifest = merge_and_export_adapters(adapters, out, formats=split(formats), precisions=split(precisions),
                                                 opset=opset, overwrite=overwrite, progress=True, exporter=exporter,
                                                 shared_trunk=shared_trunk, preprocess_in_graph=preprocess_in_graph,
                                                 attention=attention, meta_decoder=meta_decoder, strict=strict)
            echo(f"manifest: {out / 'manifest.json'} ({len(manifest['adapters'])} adapters, "
                 f"{len(manifest['graphs'])} graphs)")
            if manifest.get("refused"):  # each one's 'refused:' line was printed as it happened
                from peft_export.export.refusals import EXIT_REFUSED

                raise typer.Exit(code=EXIT_REFUSED)
            return
        adapted = next(iter(adapters.values()))  # one adapter keeps the one-model layout
    manifest = merge_and_export(adapted, out, formats=split(formats), precisions=split(precisions), opset=opset,
                                preprocess_in_graph=preprocess_in_graph, overwrite=overwrite, progress=not quiet,
                                exporter=exporter, calibration_data=calibration_data, attention=attention,
                                strict=strict, meta_decoder=meta_decoder, video=video)
    if quiet:  # the parity table is a result, not progress
        from peft_export.export.verify import format_parity_table

        echo(format_parity_table([(graph, precision, entry["parity"]) for graph, by_precision in
                                  manifest["graphs"].items() for precision, entry in by_precision.items()]))
    echo(f"manifest: {out / 'manifest.json'} ({len(manifest['graphs'])} graphs)")
    refused = manifest.get("refused") or []
    if refused:
        from peft_export.export.refusals import EXIT_REFUSED

        if quiet:  # otherwise the export's log printed each one as it happened
            for entry in refused:
                echo(f"refused: {entry['line']}")
        raise typer.Exit(code=EXIT_REFUSED)
