"""Click to mask on screen in the napari plugin: the time from a point added to the "point prompts"
layer (what napari's add mode does on a click) until the "current object" layer holds the new
mask and Qt has processed the redraw, for a given export. Also the decoder alone
(``SamSession.predict`` on the same prompts) for comparison. Not run by the tests.

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_napari.py EXPORT_DIR [--image FILE]
        [--clicks 30] [--json out.json]

(Without a display: xvfb-run, or an X server in DISPLAY, so that napari draws as on a screen.)
Each click is a new object (one point: best of three masks); ``--second`` adds a second point to
each object (single mask, low-res logits fed back).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def _stats(ms: list) -> dict:
    ms = sorted(ms)
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 2),
            "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2), "max_ms": round(ms[-1], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("--image", help="image file (TIFF/PNG/...) of at most the model input; default: "
                        "synthetic nuclei of the model input's size (1024 px for vit_b)")
    parser.add_argument("--clicks", type=int, default=30)
    parser.add_argument("--second", action="store_true", help="also time a second point per object")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from peft_export.data import synthetic_sample
    from peft_export.predict import read_image

    from peft_export.runtime import read_manifest

    size = int(read_manifest(args.export_dir)["image_size"])
    image = read_image(args.image) if args.image else synthetic_sample(size, seed=0)[0]
    if max(image.shape[:2]) > size:  # the plugin then encodes tiles on demand: not one embedding to time
        raise SystemExit(f"--image: {image.shape[1]}x{image.shape[0]} is larger than the model input ({size} px)")
    viewer = napari.Viewer(show=True)
    viewer.add_image(image, name="image", rgb=image.ndim == 3)
    _, widget = viewer.window.add_plugin_dock_widget("peftexport", "Segment with an export")
    app = QApplication.instance()

    def settle(limit: float = 600) -> None:
        end = time.time() + limit
        while len(widget.tasks) and time.time() < end:
            app.processEvents()
            time.sleep(0.005)
        app.processEvents()

    widget.backend_box.setCurrentText(args.backend)
    widget.precision_box.setCurrentText(args.precision)
    widget.threads_box.setValue(args.threads)
    widget.load_export(args.export_dir)
    settle()
    if widget.session is None:
        raise SystemExit(widget.status.text())
    widget.compute_embedding()
    settle()
    embed_s = widget.last_timing.get("computing the embedding")
    points, current = viewer.layers["point prompts"], viewer.layers["current object"]
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    click_ms, second_ms, decoder_ms = [], [], []
    session, emb = widget.session, widget.decoder.embedding
    for i in range(args.clicks + 2):  # the first two warm up ONNX Runtime
        y, x = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        t0 = time.perf_counter()
        points.add([y, x])
        app.processEvents()  # the redraw of the updated layer
        t1 = time.perf_counter()
        assert current.data.any() or widget.last_decoded is not None
        if args.second:
            y2, x2 = np.clip([y + 0.05 * h, x + 0.05 * w], 0, [h - 1, w - 1])
            t2 = time.perf_counter()
            points.add([y2, x2])
            app.processEvents()
            t3 = time.perf_counter()
        d0 = time.perf_counter()
        session.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]), embedding=emb)
        d1 = time.perf_counter()
        widget.clear()
        app.processEvents()
        if i >= 2:
            click_ms.append(1000 * (t1 - t0))
            decoder_ms.append(1000 * (d1 - d0))
            if args.second:
                second_ms.append(1000 * (t3 - t2))
    result = {"export_dir": args.export_dir, "image_shape": list(image.shape), "backend": args.backend,
              "precision": args.precision, "threads": args.threads, "embedding_s": embed_s,
              "click_to_layer": _stats(click_ms), "decoder_only": _stats(decoder_ms),
              "describe": session.describe()}
    if second_ms:
        result["second_point_to_layer"] = _stats(second_ms)
    viewer.close()
    print(json.dumps({k: v for k, v in result.items() if k != "describe"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
