"""One trunk, many adapters: N late-LoRA adapters in one export against N separate exports.

    python benchmarks/bench_shared_trunk.py --out /tmp/bench_shared     # vit_b, 1024
    python benchmarks/bench_shared_trunk.py --model tiny --out /tmp/bench_shared_tiny          # quick look

Builds a seeded random base (no download) and N adapters on it (LoRA r32 on q,k,v,mlp in the
late blocks, the paper's recipe, with random non-zero weights), saves them as adapter runs,
exports them once together (``merge_and_export_adapters``: trunk + one head per adapter) and
once each (``merge_and_export``), every graph parity-checked. Then ``peftexport bench``'s
shared-trunk cases, each in a fresh process: the shared export (trunk once, each head, one
box per adapter) and the N separate exports (each whole encoder, one box each), and the
masks of every adapter from both exports compared on seeded boxes.

Targets (vit_b, 1024, CPU): encoder total <= 0.65x of the separate exports, peak RSS <= 0.7x,
every adapter's masks IoU >= 0.999 to its own export. Exports are kept in OUT/exports and
reused on a second run (OUT/exports_fused for ``--attention fused``, which both exports then use).
Writes OUT/bench_shared_trunk[_ATTENTION].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from peft_export.bench.shared_trunk import bench_shared_trunk, format_shared_table  # noqa: E402
from peft_export.export import merge_and_export, merge_and_export_adapters  # noqa: E402
from peft_export.peft import PeftConfig  # noqa: E402
from peft_export.peft.adapters import build_adapted_model, load_adapter, save_adapter  # noqa: E402

warnings.filterwarnings("ignore", message="no checkpoint given")
TARGETS = {"encoder_total": 0.65, "peak_rss": 0.70, "mask_iou": 0.999}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_adapters(root: Path, n: int, model_type: str, size: int | None, rank: int) -> dict[str, Path]:
    """N late-LoRA adapter runs on one seeded random base, each with its own random non-zero weights."""
    runs = {}
    for i in range(n):
        run = root / f"adapter{i + 1}"
        runs[f"adapter{i + 1}"] = run
        if (run / "adapter.json").is_file():
            continue
        cfg = PeftConfig(method="lora", rank=rank, targets=("q", "k", "v", "mlp"), blocks="late")
        adapted = build_adapted_model(cfg, model_type, None, size, seed=0)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, p in adapted.model.named_parameters():
                if p.requires_grad:  # LoRA A and B, and the decoder: a zero B would make merged == base
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        save_adapter(adapted, run)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--precision", default="fp32", help="fp32 or int8 (the encoder graphs timed)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--attention", default="plain",
                    help="plain, folded or fused: the encoder graphs of both exports (fused: ONNX Runtime's "
                         "MultiHeadAttention, which never holds the 4096x4096 scores of a global block)")
    args = ap.parse_args()

    exports = args.out / ("exports" if args.attention == "plain" else f"exports_{args.attention}")
    exports.mkdir(parents=True, exist_ok=True)
    runs = make_adapters(args.out / "adapters", args.adapters, args.model, args.image_size, args.rank)
    precisions = ("fp32",) if args.precision == "fp32" else ("fp32", args.precision)
    shared = exports / "shared"
    if not (shared / "manifest.json").is_file():
        log(f"exporting {len(runs)} adapters into one export (trunk + heads)")
        adapters = {n: load_adapter(r) for n, r in runs.items()}
        merge_and_export_adapters(adapters, shared, precisions=precisions, progress=True, attention=args.attention)
        del adapters
    separate = {}
    for name, run in runs.items():
        separate[name] = exports / name
        if not (separate[name] / "manifest.json").is_file():
            log(f"exporting {name} alone")
            merge_and_export(load_adapter(run), separate[name], precisions=precisions, progress=False,
                             attention=args.attention)
    log(f"load average before timing: {os.getloadavg()}")
    result = bench_shared_trunk(shared, separate, precision=args.precision, warmup=args.warmup,
                                iterations=args.iterations, threads=args.threads, log=log)
    table = format_shared_table(result)
    ratios, ious = result["ratios"], result["mask_iou_min"]
    verdict = [
        f"encoder total {ratios['encoder_total']:.3f} (target <= {TARGETS['encoder_total']})",
        f"peak RSS {ratios['peak_rss']:.3f} (target <= {TARGETS['peak_rss']})",
        f"min mask IoU {min(ious.values()):.4f} (target >= {TARGETS['mask_iou']})",
    ]
    result["targets"] = TARGETS
    result["settings"]["attention"] = args.attention
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    stem = "bench_shared_trunk" + ("" if args.attention == "plain" else f"_{args.attention}")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    m = result["machine"]
    header = (f"{result['date']}, {m['cpu']} ({m['cpu_count_usable']} cores), {args.model} "
              f"{result['settings']['image_size']}, {args.precision}, {args.attention} attention, {len(runs)} adapters, split block "
              f"{result['settings']['split_block']}, load average {result['load_average']}")
    (args.out / f"{stem}.md").write_text(
        header + "\n\n" + format_shared_table(result, markdown=True) + "\n")
    print(header)
    print(table)
    print("shared / separate: " + "; ".join(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
