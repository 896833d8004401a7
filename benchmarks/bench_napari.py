"""Click to mask on screen in the napari plugin, for a given export. Not run by the tests.

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_napari.py EXPORT_DIR [--image FILE]
        [--clicks 30] [--second] [--json out.json]
    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_napari.py EXPORT_DIR --slide [--clicks 10]

(Without a display: xvfb-run, or an X server in DISPLAY, so that napari draws as on a screen.)

Default: the time from a point added to the "point prompts" layer (what napari's add mode does on
a click) until the "current object" layer holds the new mask and Qt has processed the redraw, on
an image of at most the model input (one embedding). Also the decoder alone (``SamSession.predict``
on the same prompts) for comparison. Each click is a new object (one point: best of three
masks); ``--second`` adds a second point to each object (single mask, low-res logits fed back).

``--slide``: the plugin's synthetic whole slide (20000 x 20000 px uint16 zarr pyramid; ``--size``).
Each click lands in a tile not encoded yet, so its tile is encoded in a worker: per click the
time until the mask is shown, the longest pause of a 5 ms QTimer on the GUI thread during the
tile's encoder run and over the whole click, and the GUI thread's own CPU time. Then the same
clicks again on their cached tiles (decode and draw only).

Every result names the CPU and the machine's load before and after.
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


def _longest_pause(ticks: list, start: float, end: float) -> float:
    inside = [start] + [t for t in ticks if start < t < end] + [end]
    return float(np.max(np.diff(inside)))


def time_clicks(viewer, widget, settle, app, image_shape, clicks: int, second: bool) -> dict:
    """Click-to-layer times on one embedding, and the decoder alone on the same prompts."""
    widget.compute_embedding()
    settle()
    points = viewer.layers["point prompts"]
    h, w = image_shape[:2]
    rng = np.random.default_rng(0)
    click_ms, second_ms, decoder_ms = [], [], []
    session, emb = widget.session, widget.decoder.embedding
    for i in range(clicks + 2):  # the first two warm up ONNX Runtime
        y, x = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        t0 = time.perf_counter()
        points.add([y, x])
        app.processEvents()  # the redraw of the updated layer
        t1 = time.perf_counter()
        assert widget.last_decoded is not None, widget.status.text()
        if second:
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
            if second:
                second_ms.append(1000 * (t3 - t2))
    out = {"embedding_s": widget.last_timing.get("computing the embedding"),
           "click_to_layer": _stats(click_ms), "decoder_only": _stats(decoder_ms)}
    if second_ms:
        out["second_point_to_layer"] = _stats(second_ms)
    return out


def time_slide(viewer, widget, settle, app, size: int, clicks: int) -> dict:
    """Clicks on a whole slide, each in a tile of its own: pauses of the GUI thread while tiles encode."""
    from qtpy.QtCore import QTimer

    points = viewer.layers["point prompts"]
    ticks: list = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(5)
    widget.compute_embedding()  # the tiles' intensity statistics, once
    settle()
    tiled = widget.decoder.embedding
    step = tiled.spec.step
    rng = np.random.default_rng(0)
    cells = rng.choice(len(tiled.grid), size=min(clicks + 1, len(tiled.grid)), replace=False)
    spots = []
    for cell in cells:  # the centre of each chosen tile's inner area: one tile per click
        y0, y1, x0, x1 = tiled.grid.tiles[int(cell)].inner
        spots.append(((y0 + y1) / 2, (x0 + x1) / 2))
    shown_ms, encoder_ms, pause_encoder_ms, pause_click_ms, gui_cpu_ms, cached_ms = [], [], [], [], [], []
    for i, (y, x) in enumerate(spots):
        widget.clear()
        app.processEvents()
        c0, t0 = time.thread_time(), time.perf_counter()
        points.add([y, x])
        settle()
        c1, t1 = time.thread_time(), time.perf_counter()
        start, end = widget.last_span["computing the tile's embedding"]
        if i == 0:
            continue  # warms up ONNX Runtime
        shown_ms.append(1000 * (t1 - t0))
        encoder_ms.append(1000 * (end - start))
        pause_encoder_ms.append(1000 * _longest_pause(ticks, start, end))
        pause_click_ms.append(1000 * _longest_pause(ticks, t0, t1))
        gui_cpu_ms.append(1000 * (c1 - c0))
    for y, x in spots[1:]:  # their tiles are cached now
        widget.clear()
        app.processEvents()
        t0 = time.perf_counter()
        points.add([y, x])
        app.processEvents()
        cached_ms.append(1000 * (time.perf_counter() - t0))
    timer.stop()
    return {"slide_px": size, "tile": tiled.spec.tile, "tile_step": step, "tiles": len(tiled.grid),
            "tiles_prepared_s": widget.last_timing.get("preparing the tiles"),
            "click_to_mask_new_tile": _stats(shown_ms), "tile_encoder_run": _stats(encoder_ms),
            "longest_gui_pause_during_encoder": _stats(pause_encoder_ms),
            "longest_gui_pause_during_click": _stats(pause_click_ms),
            "gui_thread_cpu_per_click": _stats(gui_cpu_ms), "click_to_mask_cached_tile": _stats(cached_ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir")
    parser.add_argument("--image", help="image file (TIFF/PNG/...) of at most the model input; default: "
                        "synthetic nuclei of the model input's size (1024 px for vit_b)")
    parser.add_argument("--clicks", type=int, default=30)
    parser.add_argument("--second", action="store_true", help="also time a second point per object")
    parser.add_argument("--slide", action="store_true", help="clicks on the synthetic whole slide, each in a "
                        "tile not encoded yet")
    parser.add_argument("--size", type=int, default=20000, help="--slide: the slide's side in px")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from peft_export.bench.load import describe_load, load_between, snapshot
    from peft_export.bench.stats import device_info
    from peft_export.data import synthetic_sample
    from peft_export.napari.sample import synthetic_slide_levels
    from peft_export.predict import read_image
    from peft_export.runtime import read_manifest

    before = snapshot()
    viewer = napari.Viewer(show=True)
    if args.slide:
        image = None
        viewer.add_image(synthetic_slide_levels(args.size), name="image", multiscale=True)
    else:
        size = int(read_manifest(args.export_dir)["image_size"])
        image = read_image(args.image) if args.image else synthetic_sample(size, seed=0)[0]
        if max(image.shape[:2]) > size:  # the plugin then encodes tiles on demand (--slide times that)
            raise SystemExit(f"--image: {image.shape[1]}x{image.shape[0]} is larger than the model input ({size} px)")
        viewer.add_image(image, name="image", rgb=image.ndim == 3)
    _, widget = viewer.window.add_plugin_dock_widget("peftexport", "Segment with an export")
    app = QApplication.instance()

    def settle(limit: float = 600) -> None:
        end = time.time() + limit
        while len(widget.tasks) and time.time() < end:
            app.processEvents()
            time.sleep(0.002)
        app.processEvents()

    widget.backend_box.setCurrentText(args.backend)
    widget.precision_box.setCurrentText(args.precision)
    widget.threads_box.setValue(args.threads)
    widget.load_export(args.export_dir)
    settle()
    if widget.session is None:
        raise SystemExit(widget.status.text())
    if args.slide:
        timings = time_slide(viewer, widget, settle, app, args.size, args.clicks)
    else:
        timings = time_clicks(viewer, widget, settle, app, image.shape, args.clicks, args.second)
    load = load_between(before, snapshot())
    result = {"export_dir": args.export_dir, "cpu": device_info()["cpu"], "load": load, "backend": args.backend,
              "precision": args.precision, "threads": args.threads,
              "image_shape": None if image is None else list(image.shape), **timings,
              "describe": widget.session.describe()}
    viewer.close()
    print(json.dumps({k: v for k, v in result.items() if k != "describe"}, indent=1))
    print(f"{result['cpu']}; {describe_load(load)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
