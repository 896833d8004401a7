"""``peftexport bench`` and ``peftexport bench-compare``."""

from __future__ import annotations

import sys
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
    OverwriteOpt,
    PeftOpt,
    QuietOpt,
    RankOpt,
    TargetsOpt,
    micro_sam_config,
    output_files,
)


@command("bench", short="Latency of base, unmerged, merged and exported models.", help="Time encoder, decoder and end to end for base / unmerged / merged / exported cases.")
def bench(
    export_dir: Optional[Path] = typer.Argument(None, help="Export directory (manifest.json + ONNX graphs)."),
    adapter: Optional[Path] = AdapterOpt,
    merged: Optional[Path] = MergedOpt,
    micro_sam: Optional[Path] = MicroSamOpt,
    peft: Optional[str] = PeftOpt,
    rank: Optional[int] = RankOpt,
    blocks: str = BlocksOpt,
    targets: str = TargetsOpt,
    adaptformer_residual: bool = AdaptformerLegacyOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    force: bool = ForceOpt,
    export_dir_opt: Optional[Path] = typer.Option(
        None, "--export-dir", help="With --adapter: the export to time in ONNX Runtime (else a temporary one is made)."),
    backend: str = typer.Option("torch,torch-compile,onnxruntime,openvino,tensorrt", "--backend",
                                help="Comma list of torch, torch-compile, onnxruntime, openvino, tensorrt. torch is also "
                                     "timed at its best: on the CPU once more with glibc keeping freed memory, and "
                                     "torch-compile where it runs (on the CPU it needs a C++ compiler; compiling, in the "
                                     "untimed warm-up, takes minutes for vit_b). Every ratio is against the fastest torch "
                                     "case of the run, per component."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="Comma list of fp32, bf16, fp16, int8 (default: torch fp32 (+bf16 on CUDA), every exported precision)."),
    batch_size: str = typer.Option("16", "--batch-size", help="Boxes per decoder call for the batch case; a comma list times several."),
    components: str = typer.Option("encoder,decoder_point,decoder_box,decoder_boxes,end_to_end", "--components",
                                   help="What to time (comma list); also ais (instance decoder + post-processing)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed calls per case and component."),
    iterations: int = typer.Option(10, "--iterations", help="Timed calls per case and component."),
    no_base: bool = typer.Option(False, "--no-base", help="Do not time the adapter's base SAM."),
    interleave: bool = typer.Option(False, "--interleave", help="Load every case in one process, then time them in turn (A B A B); less drift, more memory, cases disturb each other."),
    in_process: bool = typer.Option(False, "--in-process", help="Time the cases one after the other in this process instead of one fresh process per case."),
    label: Optional[str] = typer.Option(None, "--label", help="A name for this run (bench-compare shows it)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Directory for bench.json (full result), bench.md (table) and bench.png (chart)."),
    json_out: Optional[Path] = typer.Option(None, "--json", hidden=True, help="Deprecated: use -o DIR."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", hidden=True, help="Deprecated: use -o DIR."),
    plot_out: Optional[Path] = typer.Option(None, "--plot", hidden=True, help="Deprecated: use -o DIR."),
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
    separate: list[str] = typer.Option(
        [], "--separate", help="Export of several adapters: NAME=EXPORT, each adapter's own export, timed against it."),
) -> None:
    """Missing backends are listed as skipped with the reason; a case that fails while running
    is listed as failed and the command exits 1 after writing its outputs. Without -o only the
    table is printed."""
    from peft_export.bench import format_table, run_and_write
    from peft_export.bench.options import check_bench_options
    from peft_export.errors import PeftExportError
    from peft_export.fsutil import output_dir

    # Every option before any work: no model loads, no worker starts, nothing is written.
    opts = check_bench_options(backend, device, precision, batch_size, components, warmup, iterations, threads)
    files = output_files(out, {"json": "bench.json", "markdown": "bench.md", "plot": "bench.png"},
                         {"json": json_out, "markdown": markdown_out, "plot": plot_out})
    if export_dir is not None and export_dir_opt is not None:
        raise PeftExportError("give the export either as EXPORT_DIR or as --export-dir, not both")
    export = export_dir if export_dir is not None else export_dir_opt
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    from peft_export.bench.shared_trunk import format_shared_table, holds_several_adapters, run_and_write_shared

    if separate or holds_several_adapters(export):  # trunk + heads against N separate exports
        with output_dir(out):
            shared = run_and_write_shared(
                files["json"], files["markdown"], overwrite, shared_export=export, separate=separate,
                precision=(opts.precisions or ["fp32"])[0], warmup=warmup, iterations=iterations,
                threads=threads, log=log)
        echo(format_shared_table(shared))
        return
    if export is None and adapter is None and merged is None and micro_sam is None:
        raise PeftExportError("give an EXPORT_DIR or --adapter RUN (or --merged CKPT, --micro-sam CKPT)")
    adapted = None
    if adapter is not None or merged is not None or micro_sam is not None:
        from peft_export.peft.adapters import load_model_source

        cfg = micro_sam_config(micro_sam, peft, rank, blocks, targets, adaptformer_residual)
        adapted = load_model_source(adapter=adapter, merged=merged, micro_sam=micro_sam, micro_sam_config=cfg,
                                    checkpoint=checkpoint, force=force)
    with output_dir(out):
        result = run_and_write(
            json_out=files["json"], markdown_out=files["markdown"], plot_out=files["plot"], overwrite=overwrite,
            export_dir=export, adapted=adapted, backends=opts.backends, device=device,
            precisions=opts.precisions, batch_sizes=opts.batch_sizes, warmup=warmup,
            iterations=iterations, components=opts.components, include_base=not no_base,
            interleave=interleave, fresh_process=not (interleave or in_process), intra_op_threads=threads,
            label=label, log=log,
        )
    echo(format_table(result))
    for path in files.values():
        if path is not None and Path(path).exists():
            echo(f"wrote {path}")
    if any(c["status"] == "failed" for c in result["cases"]):
        raise typer.Exit(1)


@command("bench-compare", short="One table from several bench JSON files.", help="One table across several bench JSON files (runs, machines).")
def bench_compare(
    files: list[Path] = typer.Argument(..., help="bench.json files written by peftexport bench -o DIR."),
    labels: Optional[list[str]] = typer.Option(
        None, "--label", help="Run label, once per file in order (default: the run's own --label, else the file name)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the table as markdown to this file."),
    markdown_out: Optional[Path] = typer.Option(None, "--markdown", hidden=True, help="Deprecated: use -o FILE."),
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
) -> None:
    from peft_export.bench import compare_results, write_text
    from peft_export.errors import PeftExportError
    from peft_export.fsutil import check_can_write

    from .app import deprecated

    if markdown_out is not None:
        deprecated("--markdown FILE", "-o/--out FILE")
        if out is not None:
            raise PeftExportError("--markdown: give either -o/--out FILE or the deprecated --markdown FILE, not both")
        out = markdown_out
    markdown_out = out

    if markdown_out is not None:
        check_can_write(markdown_out, overwrite)
    echo(compare_results(files, labels=labels))
    if markdown_out is not None:
        write_text(markdown_out, compare_results(files, markdown=True, labels=labels), overwrite)
        echo(f"wrote {markdown_out}")
