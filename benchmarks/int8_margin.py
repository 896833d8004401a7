"""The int8 recipe search per model: does the default recipe plus the layers the search returns to
fp32 clear the margin (prompt mask IoU mean >= 0.993, min >= 0.975 over the 32 probe prompts), and
which layers stay fp32 (the speed cost, counted in weight MatMuls)? Agreement only, no timing.

    python benchmarks/int8_margin.py --out /tmp/margin random:vit_b:0 random:vit_b:1 random:vit_b:2 lora:vit_b:0
    python benchmarks/int8_margin.py --out /tmp/margin random:tiny:0 --image-size 256   # seconds

Each model (``random:TYPE:SEED``: random weights; ``lora:TYPE:SEED``: random base + a LoRA with random
non-zero weights on q, k, v and the MLPs of the late blocks, merged) is exported with
``merge_and_export(precisions=fp32,int8)`` into OUT/<model>/ one after the other (vit_b: ~2-5 min each
on 2 cores). Writes OUT/int8_margin.json and prints one row per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from peft_export.export import merge_and_export  # noqa: E402
from peft_export.models import load_sam  # noqa: E402
from peft_export.peft import PeftConfig  # noqa: E402
from peft_export.peft.adapters import AdaptedModel, build_adapted_model  # noqa: E402


def build(spec: str, image_size: int | None) -> AdaptedModel:
    kind, model_type, seed = spec.split(":")
    if kind == "random":
        sam, base = load_sam(model_type, None, image_size, seed=int(seed), warn_random=False)
        return AdaptedModel(sam.eval(), None, base)
    if kind == "lora":
        config = PeftConfig(method="lora", rank=8, targets=("q", "k", "v", "mlp"), blocks="late", alpha=1.0)
        adapted = build_adapted_model(config, model_type, None, image_size, seed=int(seed))
        g = torch.Generator().manual_seed(int(seed) + 10)
        with torch.no_grad():  # random non-zero adapter weights (zero-initialised B would prove nothing)
            for name, p in adapted.model.named_parameters():
                if p.requires_grad and "linear" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        adapted.model.eval()
        return adapted
    raise SystemExit(f"{spec}: use random:TYPE:SEED or lora:TYPE:SEED")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="random:TYPE:SEED or lora:TYPE:SEED")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("int8_margin_out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    path = args.out / "int8_margin.json"
    if path.exists():
        results = json.loads(path.read_text())
    for spec in args.models:
        t = time.perf_counter()
        manifest = merge_and_export(build(spec, args.image_size), args.out / spec.replace(":", "_"),
                                    precisions=["fp32", "int8"], overwrite=True, progress=False)
        entry = manifest["graphs"].get("encoder", {}).get("int8")
        refused = [r["line"] for r in manifest.get("refused", [])]
        search = (entry or {}).get("int8_search") or next(
            (r.get("int8_search") for r in manifest.get("refused", []) if r["precision"] == "int8"), None)
        gate = entry["parity"]["prompt_agreement"] if entry else None
        results[spec] = {"written": entry is not None, "refused": refused,
                         "mask_iou_mean": gate and gate["mask_iou_mean"], "mask_iou_min": gate and gate["mask_iou_min"],
                         "search": search, "seconds": round(time.perf_counter() - t, 1)}
        path.write_text(json.dumps(results, indent=1))
        r = results[spec]
        fp32 = f"{search['fp32_matmuls']}/{search['weight_matmuls']}" if search else "?"
        print(f"{spec:<18} int8 {'written' if r['written'] else 'REFUSED'}  IoU mean "
              f"{r['mask_iou_mean'] if r['mask_iou_mean'] is None else round(r['mask_iou_mean'], 4)}  min "
              f"{r['mask_iou_min'] if r['mask_iou_min'] is None else round(r['mask_iou_min'], 4)}  "
              f"fp32 MatMuls {fp32}  {search and search['fp32_layers']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
