"""Options shared by several commands: one spelling per idea (model source, PEFT settings for
micro-sam import, -q/--quiet, --overwrite, --seed, -o/--out for several files)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

AdapterOpt = typer.Option(None, "--adapter", help="Adapter run directory or adapter.safetensors.")
MicroSamOpt = typer.Option(None, "--micro-sam", help="micro-sam training checkpoint (needs --peft and its options).")
MergedOpt = typer.Option(None, "--merged", help="A merged or plain SAM checkpoint.")
CheckpointOpt = typer.Option(None, "--checkpoint", "-c", help="Base SAM checkpoint the adapter was trained on.")
ModelOpt = typer.Option(None, "--model", "-m", help="Model type: vit_b, vit_l, vit_h, vit_t (MobileSAM), tiny, or SAM 2.1 sam2.1_hiera_t/s/b+/l (inferred from checkpoints).")
ForceOpt = typer.Option(False, "--force", help="Accept a base checkpoint whose sha256 differs from the adapter's.")
PeftOpt = typer.Option(None, "--peft", help="PEFT method of a --micro-sam checkpoint (lora, fact, ssf, adaptformer, ...).")
RankOpt = typer.Option(None, "--rank", help="LoRA/FacT rank (LoRA 32, FacT 16).")
BlocksOpt = typer.Option("all", "--blocks", help="Encoder blocks: all, late, a range 6-11 or a list 0,3,5.")
TargetsOpt = typer.Option("q,v", "--targets", help="LoRA targets, any of q,k,v,mlp; mask-decoder layers dec.* "
                          "(dec.all, dec.attn, dec.mlp, dec.hyper, ...; docs/peft_methods.md).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or progress lines (results still print).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace existing outputs.")
SeedOpt = typer.Option(0, "--seed", help="Random seed (everything random in this command derives from it).")
AdaptformerLegacyOpt = typer.Option(
    False, "--adaptformer-residual", help="micro-sam <= 1.8 AdaptFormer (adds the input again: mlp(x) + x + branch)."
)


def micro_sam_config(
    micro_sam: Optional[Path],
    peft: Optional[str],
    rank: Optional[int],
    blocks: str,
    targets: str,
    adaptformer_residual: bool,
):
    """The PEFT config a micro-sam checkpoint was trained with (their files do not record it)."""
    if micro_sam is None:
        return None
    from peft_export.peft.adapters import micro_sam_peft_config

    return micro_sam_peft_config(micro_sam, peft, rank, blocks, targets, adaptformer_residual)


def output_files(out: Optional[Path], names: dict[str, str], old: dict[str, Optional[Path]]) -> dict[str, Optional[Path]]:
    """Where a command that writes several files writes them: ``-o DIR`` gives ``DIR/<name>`` for
    each; the old per-file options (``--json`` etc., deprecated) still name single files."""
    from .app import deprecated

    paths: dict[str, Optional[Path]] = {key: (out / name if out is not None else None) for key, name in names.items()}
    for key, path in old.items():
        if path is not None:
            deprecated(f"--{key} FILE", f"-o/--out DIR (writes DIR/{names[key]})")
            if out is not None:
                from peft_export.errors import PeftExportError

                raise PeftExportError(f"--{key}: give either -o/--out DIR or the deprecated --{key} FILE, not both")
            paths[key] = path
    return paths
