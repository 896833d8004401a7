"""The int8 recipe per model, on data it was not tuned on: does the default recipe plus the layers the
search returns to fp32 clear the margin (prompt mask IoU mean >= 0.993, min >= 0.975 over 32 prompts)
on held-out images, and which layers stay fp32 (the speed cost, counted in weight MatMuls)? Agreement
only, no timing.

    python benchmarks/int8_margin.py --out /tmp/margin random:vit_b:0 random:vit_b:1 random:vit_b:2 lora:vit_b:0
    python benchmarks/int8_margin.py --out /tmp/margin random:vit_t:0 lora:vit_t:0
    peftexport demo --out /tmp/demo && python benchmarks/int8_margin.py --out /tmp/margin adapter:/tmp/demo/run \
        --calibration-data /tmp/demo/data/test/images     # the demo, dynamic and static with a held-out image
    python benchmarks/int8_margin.py --out /tmp/margin random:tiny:0 --image-size 256   # seconds
    python benchmarks/int8_margin.py --out /tmp/margin lora:sam2.1_hiera_t:0 --image-size 256   # SAM 2, minutes

Each model (``random:TYPE:SEED``: random weights; ``lora:TYPE:SEED``: random base + a LoRA with random
non-zero weights on q, k, v and the MLPs of the late blocks, merged; ``adapter:RUN``: a finetune run,
e.g. the demo's) is exported with ``merge_and_export(precisions=fp32,int8)`` into OUT/<model>/ one
after the other (vit_b: ~2-5 min each on 2 cores); with ``--calibration-data`` once more as static
QDQ (OUT/<model>_static/). Per model it reports the agreement

- ``tuning``: on the images and prompts the recipe was tuned on (the search's last step);
- ``gate``: on the gate's probe image and prompts (seed 0), which the recipe never saw;
- ``held-out user``: with ``--calibration-data``, on the user's images the export held out for its gate;
- ``held-out extra``: measured here, on probe images of ``--extra-seeds`` (neither tuned nor gated on)
  with the gate's prompts: the margin a new image of the same kind gets.

Writes OUT/int8_margin.json and prints one row per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from peft_export.export import merge_and_export  # noqa: E402
from peft_export.models import load_sam  # noqa: E402
from peft_export.peft import PeftConfig  # noqa: E402
from peft_export.peft.adapters import AdaptedModel, build_adapted_model  # noqa: E402


def build(spec: str, image_size: int | None) -> AdaptedModel:
    kind = spec.split(":", 1)[0]
    if kind == "adapter":  # a finetune run (its own base and image size)
        from peft_export.peft.adapters import load_adapter

        return load_adapter(spec.split(":", 1)[1])
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
    raise SystemExit(f"{spec}: use random:TYPE:SEED, lora:TYPE:SEED or adapter:RUN")


def extra_agreement(model, int8_path: Path, size: int, seeds: list[int]) -> dict:
    """The written int8 encoder against the torch model on probe images of ``seeds`` (gate prompts, seed 0);
    SAM or SAM 2 (its probe images through SAM 2's normalisation, its three encoder outputs decoded)."""
    from peft_export.export.int8_data import GATE_PROMPT_SEED, Agreement, sam_probe_image
    from peft_export.models import is_sam2

    probe = sam_probe_image
    if is_sam2(model):
        from peft_export.export.sam2_image_graphs import sam2_probe_image as probe
    a = Agreement(model, [probe(size, seed) for seed in seeds], GATE_PROMPT_SEED)(int8_path)
    return {"images": len(seeds), "seeds": seeds, "mask_iou_mean": a["mask_iou_mean"], "mask_iou_min": a["mask_iou_min"]}


def summarise(manifest: dict, adapted, out: Path, extra_seeds: list[int]) -> dict:
    entry = manifest["graphs"].get("encoder", {}).get("int8")
    refusal = next((r for r in manifest.get("refused", []) if (r["graph"], r["precision"]) == ("encoder", "int8")), {})
    search = (entry or refusal).get("int8_search")
    parity = (entry or {}).get("parity") or {}
    row = {"written": entry is not None, "refused": refusal.get("line"),
           "recipe": (entry or refusal).get("int8_recipe"), "data": (entry or refusal).get("int8_data"),
           "tuning": search and {k: search["steps"][-1][k] for k in ("mask_iou_mean", "mask_iou_min")},
           "gate": parity.get("prompt_agreement") and {k: parity["prompt_agreement"][k] for k in ("mask_iou_mean", "mask_iou_min")},
           "held_out_user": parity.get("held_out_agreement"), "search": search}
    if entry is not None and extra_seeds:
        row["held_out_extra"] = extra_agreement(adapted.model, out / entry["path"], manifest["image_size"], extra_seeds)
    return row


def _pair(a: dict | None) -> str:
    return "-" if not a else f"{a['mask_iou_mean']:.4f} / {a['mask_iou_min']:.4f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="random:TYPE:SEED, lora:TYPE:SEED or adapter:RUN")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--calibration-data", type=Path, default=None,
                    help="also export static int8 calibrated on these images (the export holds some out for its gate)")
    ap.add_argument("--extra-seeds", default="3,4", help="probe images measured here, neither tuned nor gated on")
    ap.add_argument("--out", type=Path, default=Path("int8_margin_out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    extra = [int(x) for x in args.extra_seeds.split(",") if x.strip()]
    results = {}
    path = args.out / "int8_margin.json"
    if path.exists():
        results = json.loads(path.read_text())
    print(f"{'model':<24} int8      mean / min: tuning           gate (seed 0)     held-out user     "
          f"held-out extra    fp32 MatMuls", flush=True)
    for spec in args.models:
        adapted = build(spec, args.image_size)
        for static in (False, True) if args.calibration_data else (False,):
            key = spec + (" static" if static else "")
            out = args.out / (spec.replace(":", "_").replace("/", "_") + ("_static" if static else ""))
            t = time.perf_counter()
            manifest = merge_and_export(adapted, out, precisions=["fp32", "int8"], overwrite=True, progress=False,
                                        calibration_data=args.calibration_data if static else None)
            r = results[key] = {**summarise(manifest, adapted, out, extra), "seconds": round(time.perf_counter() - t, 1)}
            path.write_text(json.dumps(results, indent=1))
            s = r["search"]
            fp32 = f"{s['fp32_matmuls']}/{s['weight_matmuls']}" if s else "?"
            print(f"{key[-24:]:<24} {'written' if r['written'] else 'REFUSED':<9} {_pair(r['tuning']):<17} "
                  f"{_pair(r['gate']):<17} {_pair(r['held_out_user']):<17} {_pair(r.get('held_out_extra')):<17} "
                  f"{fp32}" + (f"  refused: {r['refused']}" if r["refused"] else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
