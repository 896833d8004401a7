"""int8 variants of one encoder side by side: mask agreement with fp32 (the export's gate) and speed.

    python benchmarks/int8_variants.py --out /tmp/int8 --model vit_b             # ~10 min on 2 cores
    python benchmarks/int8_variants.py --out /tmp/int8 --sensitivity              # + leave-one-block-out sweep
    python benchmarks/int8_variants.py --out /tmp/int8 --calibration-data IMAGES  # + static QDQ on your images
    python benchmarks/int8_variants.py --out /tmp/int8 --model vit_t --calibration-data demo  # static, demo images

Variants (``peft_export.export.quantize.Int8Recipe``): per-tensor weights on every op type
(samexporter's choice, but signed 7-bit), per-channel on every op type, per-channel MatMul only
(the default), the default with 8-bit weights (saturates u8s8 kernels on CPUs without VNNI), and
static QDQ calibrated on images when given (``demo``: 4 synthetic demo images): MatMul only (what
``--calibration-data`` starts its search from), and with the convolutions too, with 7- and 8-bit weights. ``--sensitivity`` quantises all blocks but one, per
block, and ranks the blocks by how much agreement leaving them in fp32 buys: the measurement
behind ``quantize.SENSITIVE_PARTS``. Every encoder is timed in its own process on ONNX Runtime
(and OpenVINO if installed). Writes OUT/int8_variants.json and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from compare_peers import log, time_graph  # noqa: E402
from peft_export.export.agreement import mask_agreement  # noqa: E402
from peft_export.export.onnx_graphs import export_encoder_onnx  # noqa: E402
from peft_export.export.quantize import Int8Recipe, matmul_nodes, quantize_int8  # noqa: E402
from peft_export.export.gates import graph_runner  # noqa: E402
from peft_export.merge import probe_inputs  # noqa: E402
from peft_export.models import load_sam  # noqa: E402

VARIANTS = {
    "per-tensor, all ops": Int8Recipe(per_channel=False, op_types=()),
    "per-channel, all ops": Int8Recipe(op_types=()),
    "per-channel, MatMul only (default)": Int8Recipe(),
    "per-channel, MatMul only, 8-bit weights": Int8Recipe(reduce_range=False),
}


def agreement(sam, path: Path, image: torch.Tensor, reference: torch.Tensor) -> dict:
    emb = graph_runner(path)({"image": image.numpy()})["image_embeddings"]
    gate = mask_agreement(sam, reference, emb, 32)
    a, b = reference.double().flatten().numpy(), emb.astype(np.float64).ravel()
    gate["embedding_cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    gate.pop("per_prompt")
    return gate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--sensitivity", action="store_true", help="leave-one-block-out sweep (agreement only)")
    ap.add_argument("--calibration-data", type=Path, default=None,
                    help="a folder of images for the static variants, or 'demo' for synthetic demo images")
    ap.add_argument("--out", type=Path, default=Path("int8_variants_out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sam, _ = load_sam(args.model, None, args.image_size, seed=0, warn_random=False)
    sam.eval()
    src = args.out / "encoder.onnx"
    if not src.exists():
        log("exporting the fp32 encoder")
        export_encoder_onnx(sam, src)
    image, _ = probe_inputs(args.image_size)
    with torch.no_grad():
        reference = sam.image_encoder(image)
    variants = dict(VARIANTS)
    calibration = None
    if args.calibration_data is not None:
        from peft_export.export.calibration import calibration_inputs
        from peft_export.runtime.intensity import DEFAULT_INTENSITY_RULE

        images = args.calibration_data
        if str(images) == "demo":  # the demo images bench_vit_t.py --calibration uses
            from bench_vit_t import calibration_images

            images = calibration_images(args.out, args.image_size)
        calibration, _ = calibration_inputs(images, args.image_size, dict(DEFAULT_INTENSITY_RULE))
        variants["static QDQ, calibrated"] = Int8Recipe()
        variants["static QDQ, calibrated, Conv + MatMul"] = Int8Recipe(op_types=("Conv", "MatMul"))
        variants["static QDQ, calibrated, Conv + MatMul, 8-bit"] = Int8Recipe(op_types=("Conv", "MatMul"),
                                                                               reduce_range=False)
    backends = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    rows = []
    for i, (name, recipe) in enumerate(variants.items()):
        dst = args.out / f"encoder.int8.v{i}.onnx"
        log(f"quantising: {name}")
        quantize_int8(src, dst, recipe, calibration if "static" in name else None)
        row = {"variant": name, "recipe": recipe.to_dict(), **agreement(sam, dst, image, reference)}
        for backend in backends:
            case = time_graph(name, dst, backend, "image", args.image_size, 1, args.iterations, "export", "int8")
            row[backend] = ({"median_s": case["components"]["encoder"]["median_ms"] / 1000,
                             "peak_rss_mb": case["process"]["peak_rss_mb"], "busy": case["load"]["busy"]}
                            if case["status"] == "ok" else {"failed": case.get("reason")})
        rows.append(row)
    fp32 = {"variant": "fp32", "mask_iou_mean": 1.0, "mask_iou_min": 1.0, "embedding_cosine": 1.0}
    for backend in backends:
        case = time_graph("fp32", src, backend, "image", args.image_size, 1, args.iterations, "export", "fp32")
        fp32[backend] = ({"median_s": case["components"]["encoder"]["median_ms"] / 1000,
                          "peak_rss_mb": case["process"]["peak_rss_mb"], "busy": case["load"]["busy"]}
                         if case["status"] == "ok" else {"failed": case.get("reason")})
    rows.append(fp32)
    sweep = []
    if args.sensitivity:
        blocks = len(sam.image_encoder.blocks)
        for b in range(blocks):
            dst = args.out / "encoder.int8.sweep.onnx"
            quantize_int8(src, dst, Int8Recipe(exclude=tuple(matmul_nodes(src, block=b))))
            gate = agreement(sam, dst, image, reference)
            sweep.append({"block_in_fp32": b, **gate})
            log(f"block {b} in fp32: IoU mean {gate['mask_iou_mean']:.4f}, min {gate['mask_iou_min']:.4f}")
        sweep.sort(key=lambda r: -r["mask_iou_min"])
    print(f"{'variant':<48}{'IoU mean':>9}{'IoU min':>9}{'cosine':>9}" + "".join(f"{b + ' s':>16}{'MB':>7}" for b in backends))
    for r in rows:
        cells = "".join(f"{r.get(b, {}).get('median_s', float('nan')):>16.2f}{r.get(b, {}).get('peak_rss_mb', float('nan')):>7.0f}"
                        for b in backends)
        print(f"{r['variant']:<48}{r.get('mask_iou_mean', 1):>9.4f}{r.get('mask_iou_min', 1):>9.4f}"
              f"{r.get('embedding_cosine', 1):>9.5f}{cells}")
    for s in sweep[:3]:
        print(f"most sensitive: block {s['block_in_fp32']} (left in fp32: IoU min {s['mask_iou_min']:.4f})")
    (args.out / "int8_variants.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                             "model": args.model, "image_size": args.image_size,
                                                             "rows": rows, "sensitivity": sweep}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
