"""Automatic instance segmentation (AIS) on a CPU: what micro-sam's instance decoder and its
post-processing add to the image encoder, in the torch-free runtime (ONNX Runtime), and the
point grid (segment-everything) of the same model for comparison.

    python benchmarks/bench_ais.py --out /tmp/bench_ais                  # vit_b, model size 1024, 512x512 image
    python benchmarks/bench_ais.py --image-size 512 --out /tmp/bench_ais512
    python benchmarks/bench_ais.py --backend openvino --grid 0 --out /tmp/bench_ais_ov
    python benchmarks/bench_ais.py --model tiny --grid 0 --out /tmp/bench_ais_tiny   # seconds, for a smoke test

Weights are random (seeded); latency does not depend on their values. The post-processing's
time does depend on the maps, so it is timed on realistic maps: the training targets of a
synthetic-nuclei label image of the same size, blurred and with noise (what a trained decoder
predicts), through ``runtime.instances.instances_from_maps`` with micro-sam's defaults. Each
graph is exported once (fp32, the exporters peftexport uses) into a temporary directory and run
with the runtime's session options. Reported: median of ``--iterations`` after one warm-up.
Run it alone on a quiet machine (nothing else using the CPUs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def median_seconds(fn, iterations: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def realistic_maps(size: int, seed: int = 0) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    from peft_export.data import synthetic_sample
    from peft_export.training.instance_targets import distance_targets

    _, labels = synthetic_sample(size, seed=seed)
    t = distance_targets(labels, 25)
    rng = np.random.default_rng(seed)
    maps = np.clip(ndimage.gaussian_filter(t, (0, 1.5, 1.5)) + rng.normal(0, 0.08, t.shape), 0, 1)
    return maps.astype(np.float32), int(labels.max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--image-size", type=int, default=None, help="model input size (default: the model's, 1024)")
    ap.add_argument("--input", type=int, default=512, help="side of the square input image in pixels")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--grid", type=int, default=32, help="points per side of the segment-everything comparison (0: skip)")
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "openvino"],
                    help="runs the encoder and the AIS decoder (the point grid always runs on ONNX Runtime)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch

    from peft_export.export.ais import export_ais_decoder_onnx
    from peft_export.export.onnx_graphs import export_decoder_onnx, export_encoder_onnx
    from peft_export.export.verify import ort_session
    from peft_export.bench.stats import device_info
    from peft_export.models import random_instance_decoder, random_sam
    from peft_export.runtime.everything import segment_everything
    from peft_export.runtime.instances import instances_from_maps, maps_to_image
    from peft_export.runtime.preprocess import prepare_image

    sam = random_sam(args.model, args.image_size).eval()
    size = sam.image_encoder.img_size
    decoder = random_instance_decoder(0)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "image_size": size, "input": [args.input, args.input],
              "iterations": args.iterations, "machine": {"cpu": device_info()["cpu"], "python": platform.python_version()},
              "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        export_encoder_onnx(sam, tmp / "encoder.onnx")
        export_ais_decoder_onnx(decoder, tmp / "ais_decoder.onnx", size)
        if args.grid:
            export_decoder_onnx(sam, tmp / "decoder_lowres.onnx", "decoder_lowres")
        result["export_seconds"] = round(time.perf_counter() - t, 1)
        del sam
        if args.backend == "openvino":
            from peft_export.runtime.backends.ov import OpenVinoBackend

            ov = OpenVinoBackend({"encoder": tmp / "encoder.onnx", "ais": tmp / "ais_decoder.onnx"}, "cpu")
            run_encoder = lambda: ov.run("encoder", {"image": x})["image_embeddings"]  # noqa: E731
            run_ais = lambda: ov.run("ais", {"image_embeddings": emb})["instance_maps"]  # noqa: E731
        else:
            enc, ais = ort_session(tmp / "encoder.onnx"), ort_session(tmp / "ais_decoder.onnx")
            run_encoder = lambda: enc.run(None, {"image": x})[0]  # noqa: E731
            run_ais = lambda: ais.run(None, {"image_embeddings": emb})[0]  # noqa: E731
        result["backend"] = args.backend
        image = (np.random.default_rng(0).random((args.input, args.input, 3)) * 255).astype(np.uint8)
        x, original, input_size = prepare_image(image, {"name": "none"}, size)
        emb = run_encoder()
        maps_small = run_ais()
        maps, n_true = realistic_maps(args.input)
        s = result["seconds"]
        s["encoder"] = median_seconds(run_encoder, args.iterations)
        s["ais_decoder"] = median_seconds(run_ais, args.iterations)
        s["maps_to_image"] = median_seconds(lambda: maps_to_image(maps_small, input_size, original, size),
                                            args.iterations)
        s["post_processing"] = median_seconds(lambda: instances_from_maps(*maps), args.iterations)
        s["ais_beyond_encoder"] = s["ais_decoder"] + s["maps_to_image"] + s["post_processing"]
        labels = instances_from_maps(*maps)
        result["post_processing_objects"] = {"found": int(labels.max()), "in_labels": n_true}
        if args.grid:
            dec = ort_session(tmp / "decoder_lowres.onnx")
            g4 = 4 * (size // 16)

            def decode(points, labels_):
                b = len(points)
                coords = np.concatenate([points, np.zeros((b, 1, 2), np.float32)], axis=1)
                lab = np.concatenate([labels_, -np.ones((b, 1), np.float32)], axis=1)
                out = dec.run(None, {"image_embeddings": emb, "point_coords": coords, "point_labels": lab,
                                     "mask_input": np.zeros((b, 1, g4, g4), np.float32),
                                     "has_mask_input": np.zeros((b,), np.float32)})
                return out[0], out[1]

            t = time.perf_counter()  # one run: it takes long, and it is what users wait for
            segment_everything(decode, original, input_size, size, points_per_side=args.grid)
            s[f"point_grid_{args.grid}x{args.grid}_beyond_encoder"] = time.perf_counter() - t
    result["seconds"] = {k: round(v, 3) for k, v in result["seconds"].items()}
    result["torch"] = torch.__version__
    (args.out / "bench_ais.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
