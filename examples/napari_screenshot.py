"""A screenshot of napari with the plugin: synthetic nuclei, "Segment all" with an export, and one
object segmented by a click, written as a PNG (docs/napari.png comes from this script).

    xvfb-run -a python examples/napari_screenshot.py [--export EXPORT_DIR] [-o docs/napari.png]

Without ``--export`` it builds a tiny random-weight export with an instance decoder first (needs
the ``[torch]`` extra; the plugin itself never does). Qt runs offscreen; napari's canvas needs an X
display for OpenGL (xvfb-run gives one).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", help="export dir (default: build a tiny one)")
    parser.add_argument("-o", "--out", default="napari.png")
    args = parser.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    export = Path(args.export) if args.export else tiny_export(Path(tempfile.mkdtemp()) / "tiny_export")
    viewer = napari.Viewer(show=True)
    viewer.open_sample("peftexport", "synthetic_nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("peftexport", "Segment with an export")
    app = QApplication.instance()

    def settle() -> None:
        end = time.time() + 600
        while widget.workers and time.time() < end:
            app.processEvents()
            time.sleep(0.01)
        app.processEvents()

    widget.load_export(export)
    settle()
    widget.segment_all()
    settle()
    viewer.layers["point prompts"].add([128.0, 128.0])
    settle()
    viewer.layers.selection.active = viewer.layers["point prompts"]
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.reset_view()
    # The canvas (vispy renders it offscreen) beside the dock widget (Qt grabs it): a window grab would
    # show an empty canvas on an offscreen platform.
    from PIL import Image

    canvas = Image.fromarray(viewer.screenshot(canvas_only=True, size=(700, 700), flash=False)).convert("RGB")
    panel_png = Path(tempfile.mkdtemp()) / "panel.png"
    widget.grab().save(str(panel_png))
    panel = Image.open(panel_png).convert("RGB")
    height = max(canvas.height, panel.height)
    picture = Image.new("RGB", (canvas.width + panel.width, height), (38, 41, 48))
    picture.paste(canvas, (0, 0))
    picture.paste(panel, (canvas.width, 0))
    picture.save(args.out, optimize=True)
    print(f"wrote {args.out} ({widget.status.text()})")
    viewer.close()


if __name__ == "__main__":
    main()
