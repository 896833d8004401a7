"""A screenshot of napari's "Improve the model" widget after a run: images with their committed
objects, the new export loaded, the held-out Dice before and after (docs/napari_improve.png comes
from this script).

    xvfb-run -a -s "-screen 0 1280x1024x24" python examples/napari_improve_screenshot.py --export demo/export \\
        --data demo/data/test [--images 4] [--steps 30] [-o docs/napari_improve.png]

``--data`` holds ``images/`` and ``labels/`` (the labels play the objects a user committed). The
export needs its torch source (``peftexport demo`` records it) and the ``[torch]`` extra, which
the improve process uses; the viewer itself never imports torch. The new export goes beside the
given one (``EXPORT_improved``, or ``_2``, ...).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from napari_screenshot import shoot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True)
    parser.add_argument("--data", required=True, help="a folder with images/ and labels/")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("-o", "--out", default="napari_improve.png")
    args = parser.parse_args()

    import napari
    import numpy as np
    import tifffile
    from qtpy.QtWidgets import QApplication

    data = Path(args.data)
    viewer = napari.Viewer(show=True)
    for path in sorted((data / "images").glob("*.tif"))[: args.images]:
        viewer.add_image(tifffile.imread(path), name=path.stem)
        viewer.add_labels(tifffile.imread(data / "labels" / path.name).astype(np.int32), name=f"{path.stem} objects",
                          opacity=0.5)
    _, segment = viewer.window.add_plugin_dock_widget("peftexport", "Segment with an export")
    _, widget = viewer.window.add_plugin_dock_widget("peftexport", "Improve the model", tabify=True)
    app = QApplication.instance()

    def wait(busy) -> None:
        end = time.time() + 3600
        while busy() and time.time() < end:
            app.processEvents()
            time.sleep(0.01)
        app.processEvents()

    segment.load_export(args.export)
    wait(lambda: len(segment.tasks))
    widget.options.set_values(steps=args.steps)
    widget.improve()
    wait(lambda: len(widget.tasks) or len(segment.tasks))
    for layer in viewer.layers:  # the first image and its objects on the canvas
        layer.visible = layer.name.startswith(viewer.layers[0].name)
    viewer.window._qt_viewer.canvas.native.setFixedSize(700, 700)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.reset_view()
    app.processEvents()
    shoot(viewer, widget, args.out)
    print(f"wrote {args.out}: {widget.status.text()}\n{widget.dice_label.text()}")
    viewer.close()


if __name__ == "__main__":
    main()
