"""A screenshot of napari with the plugin: synthetic nuclei, "Segment all" with an export, and one
object segmented by a click, written as a PNG (docs/napari.png comes from this script).

    xvfb-run -a -s "-screen 0 1280x1024x24" python examples/napari_screenshot.py [--export EXPORT_DIR]
        [--image IMAGE.tif] [--point Y,X] [-o docs/napari.png]

Without ``--export`` it builds a tiny random-weight export with an instance decoder first (needs
the ``[torch]`` extra; the plugin itself never does). napari draws its canvas with OpenGL on an X
display with GLX (xvfb-run gives one; Qt's default xcb platform, not ``offscreen``, which leaves
image layers black).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def tiny_export(out: Path) -> Path:
    """A tiny SAM (random weights, random LoRA) with a random micro-sam-layout instance decoder whose
    output layer is scaled up (as in the tests) so its maps leave 0.5 and objects appear."""
    import torch

    from peft_export.export import merge_and_export
    from peft_export.peft import PeftConfig
    from peft_export.peft.adapters import build_adapted_model

    adapted = build_adapted_model(PeftConfig(method="lora", rank=4, blocks="late"), "tiny", None, 256, seed=0,
                                  instance_decoder=True)
    with torch.no_grad():
        for name, p in adapted.instance_decoder.named_parameters():
            if name.startswith("out_conv"):
                p.mul_(25)
    adapted.model.eval()
    adapted.instance_decoder.eval()
    merge_and_export(adapted, out, precisions=("fp32",), progress=False)
    return out


def draw_canvas(viewer, size: int):
    """The visible 2D layers composed from their data as napari shows them: the image through its
    contrast limits and colormap, Labels in their colours at their opacity, points as discs."""
    import numpy as np
    from napari.layers import Image as ImageLayer, Labels, Points
    from PIL import Image, ImageDraw

    rgb = None
    for layer in viewer.layers:
        if not layer.visible:
            continue
        if isinstance(layer, ImageLayer):
            lo, hi = layer.contrast_limits
            norm = np.clip((np.asarray(layer.data, np.float64) - lo) / max(hi - lo, 1e-12), 0, 1)
            rgb = layer.colormap.map(norm.ravel())[:, :3].reshape(*norm.shape, 3)
        elif isinstance(layer, Labels) and rgb is not None and np.asarray(layer.data).any():
            data = np.asarray(layer.data)
            colors = layer.colormap.map(data.ravel()).reshape(*data.shape, 4)
            alpha = colors[..., 3:] * layer.opacity * (data[..., None] > 0)
            rgb = rgb * (1 - alpha) + colors[..., :3] * alpha
    h, w = rgb.shape[:2]
    scale = size / max(h, w)
    picture = Image.fromarray((rgb * 255).astype(np.uint8)).resize((round(w * scale), round(h * scale)),
                                                                    Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    for layer in viewer.layers:
        if isinstance(layer, Points) and layer.visible:
            for (y, x), color in zip(layer.data, layer.face_color):
                r = max(4, layer.size[0] * scale / 2) if len(layer.size) else 6
                cx, cy = (x + 0.5) * scale, (y + 0.5) * scale
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(255 * c) for c in color[:3]),
                             outline="white")
    return picture


def shoot(viewer, widget, out: str, draw: bool = False, size: int = 700) -> None:
    """The canvas (vispy's render, or ``draw_canvas``) beside the dock widget (Qt's grab of it), as a PNG."""
    from PIL import Image

    if draw:
        canvas = draw_canvas(viewer, size)
    else:
        canvas = Image.fromarray(viewer.screenshot(canvas_only=True, flash=False)).convert("RGB")
    panel_png = Path(tempfile.mkdtemp()) / "panel.png"
    widget.grab().save(str(panel_png))
    panel = Image.open(panel_png).convert("RGB")
    height = max(canvas.height, panel.height)
    picture = Image.new("RGB", (canvas.width + panel.width, height), (38, 41, 48))
    picture.paste(canvas, (0, 0))
    picture.paste(panel, (canvas.width, 0))
    picture.save(out, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", help="export dir (default: build a tiny one)")
    parser.add_argument("--image", help="a 2D image file (default: the plugin's synthetic nuclei sample)")
    parser.add_argument("--point", default="128,128", help="the clicked point 'y,x' in image pixels")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a Segment all parameter, e.g. pred_iou_thresh=0.2 (repeatable)")
    parser.add_argument("--draw-canvas", action="store_true",
                        help="draw the canvas from the layers' data (image by its contrast limits, labels in "
                        "their colours, points) instead of vispy's render, where no X display with GLX is "
                        "available (Qt's offscreen platform draws image layers black)")
    parser.add_argument("-o", "--out", default="napari.png")
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    export = Path(args.export) if args.export else tiny_export(Path(tempfile.mkdtemp()) / "tiny_export")
    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("peftexport", "Segment with an export")
    if args.image:
        import tifffile

        viewer.add_image(tifffile.imread(args.image), name=Path(args.image).stem)
    else:
        viewer.open_sample("peftexport", "synthetic_nuclei")
    app = QApplication.instance()

    def settle() -> None:
        end = time.time() + 600
        while len(widget.tasks) and time.time() < end:
            app.processEvents()
            time.sleep(0.01)
        app.processEvents()

    widget.load_export(export)
    settle()
    for item in args.set:
        name, value = item.split("=", 1)
        form = widget.ais_form if name in widget.ais_form.boxes and widget.ais_form.isVisible() else widget.everything_form
        form.set_values(**{name: int(value) if value.isdigit() else float(value)})
    widget.segment_all()
    settle()
    viewer.layers["point prompts"].add([float(v) for v in args.point.split(",")])
    settle()
    viewer.layers.selection.active = viewer.layers["point prompts"]
    viewer.window._qt_viewer.canvas.native.setFixedSize(700, 700)  # the view fitted to the shot's size
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.reset_view()
    app.processEvents()
    shoot(viewer, widget, args.out, draw=args.draw_canvas)
    print(f"wrote {args.out} ({widget.status.text()})")
    viewer.close()


if __name__ == "__main__":
    main()
