"""A screenshot of napari with the plugin on a z-stack: a synthetic nuclei volume, every plane
embedded, one nucleus clicked on one slice and carried through z ("Segment object in volume",
committed), and "Segment all (3D)" drawn as outlines (docs/napari_volume.png comes from this script).

    xvfb-run -a -s "-screen 0 1280x1024x24" python examples/napari_volume_screenshot.py [--export EXPORT_DIR]
        [--point Z,Y,X] [--set points_per_side=16] [-o docs/napari_volume.png]

Without ``--export`` it builds a tiny random-weight export first (needs the ``[torch]`` extra; the
plugin itself never does). The display needs GLX, as for ``napari_screenshot.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from napari_screenshot import shoot, tiny_export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", help="export dir (default: build a tiny one)")
    parser.add_argument("--shape", default="24,256,256", help="the synthetic volume's planes, rows, columns")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--point", default="", help="the clicked point 'z,y,x' (default: the centre of the "
                        "largest nucleus in the middle plane)")
    parser.add_argument("--projection", default="single_point")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a Segment all parameter, e.g. points_per_side=16 (repeatable)")
    parser.add_argument("--draw-canvas", action="store_true", help="as napari_screenshot.py --draw-canvas")
    parser.add_argument("-o", "--out", default="napari_volume.png")
    args = parser.parse_args()

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from peft_export.data.synthetic_volume import synthetic_volume

    export = Path(args.export) if args.export else tiny_export(Path(tempfile.mkdtemp()) / "tiny_export")
    stack, truth = synthetic_volume(tuple(int(v) for v in args.shape.split(",")), seed=args.seed)
    if args.point:
        z, y, x = (float(v) for v in args.point.split(","))
    else:  # the centre of the largest nucleus in the middle plane
        z = len(stack) // 2
        ids, counts = np.unique(truth[z][truth[z] > 0], return_counts=True)
        ys, xs = np.nonzero(truth[z] == ids[np.argmax(counts)])
        y, x = float(np.median(ys)), float(np.median(xs))
    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("peftexport", "Segment with an export")
    viewer.add_image(stack, name="volume")
    app = QApplication.instance()

    def settle() -> None:
        end = time.time() + 1200
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
    widget.embed_volume()
    settle()
    widget.segment_all_3d()
    settle()
    said_3d = widget.status.text()
    viewer.layers["volume automatic 3D"].contour = 1
    viewer.dims.set_current_step(0, int(z))
    viewer.layers["point prompts"].add([z, y, x])
    settle()
    widget.projection_box.setCurrentText(args.projection)
    widget.segment_object_in_volume()
    settle()
    said_object = widget.status.text()
    widget.commit()
    viewer.layers.selection.active = viewer.layers["volume objects"]
    viewer.window._qt_viewer.canvas.native.setFixedSize(700, 700)  # the view fitted to the shot's size
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.reset_view()
    app.processEvents()
    shoot(viewer, widget, args.out, draw=args.draw_canvas)
    print(f"wrote {args.out} (3D: {said_3d}; object: {said_object}; {widget.status.text()})")
    viewer.close()


if __name__ == "__main__":
    main()
