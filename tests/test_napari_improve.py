"""The "Improve the model" widget end to end in a real viewer (Xvfb, as test_napari.py): committed
labels of 2D images and of one plane of a stack -> ``peftexport improve`` in a separate process
(progress, live loss) -> a new export loaded into the segment widget, before/after Dice shown; an
export whose torch source moved asks for it; bad input and a cancel leave the old export as it was
and no folder (the torch-free side is in test_napari_torchfree.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed (pip install '.[napari]')")

from peft_export.fsutil import sha256_file  # noqa: E402
from test_napari import _qt_headless, open_widget, settle  # noqa: E402,F401
from test_napari_large import ticking  # noqa: E402

pytestmark = pytest.mark.slow  # exports a tiny model and trains it in subprocesses

IMPROVE = "Improve the model"


@pytest.fixture(scope="module")
def improvable(tmp_path_factory) -> Path:
    """An export of a late-LoRA adapter (tiny, 128 px, random non-zero weights) with its torch source, and demo data."""
    import torch

    from helpers import make_adapted
    from peft_export.data import make_demo_data
    from peft_export.export import merge_and_export
    from peft_export.peft.adapters import load_adapter, save_adapter

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("napari_improve")
    make_demo_data(root / "data", n_images=3, size=128, seed=5)
    adapted = make_adapted(dict(method="lora", rank=4, targets=("q", "v"), blocks="late"), image_size=128)
    save_adapter(adapted, root / "run")
    merge_and_export(load_adapter(root / "run"), root / "v1", precisions=("fp32",), progress=False)
    return root


def digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(parent: Path) -> list:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def add_annotations(viewer, data: Path) -> int:
    """The demo images with their labels as committed objects, and a 2-plane stack labelled on plane 1 only;
    returns the number of labelled planes (improve's samples)."""
    import tifffile

    images = sorted((data / "images").glob("*.tif"))
    for path in images[:2]:
        viewer.add_image(tifffile.imread(path), name=path.stem)
        viewer.add_labels(tifffile.imread(data / "labels" / path.name).astype(np.int32), name=f"{path.stem} objects")
    stack = np.stack([tifffile.imread(images[1]), tifffile.imread(images[2])])
    labels = np.zeros(stack.shape, np.int32)
    labels[1] = tifffile.imread(data / "labels" / images[2].name)
    viewer.add_image(stack, name="stack")
    viewer.add_labels(labels, name="stack objects")
    return 3


def open_improve(viewer, qtbot, export: Path):
    segment = open_widget(viewer, qtbot, export)
    _, widget = viewer.window.add_plugin_dock_widget("peftexport", IMPROVE)
    return segment, widget


def test_improve_loop_end_to_end(make_napari_viewer, qtbot, improvable, tmp_path):
    # The export moved to another folder, its torch source (the adapter run) moved too.
    export, run = tmp_path / "exports" / "v1", tmp_path / "elsewhere" / "run"
    shutil.copytree(improvable / "v1", export)
    shutil.copytree(improvable / "run", run)
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["source"]["adapter"] = str(tmp_path / "gone" / "run")
    (export / "manifest.json").write_text(json.dumps(manifest))
    old = digests(export)
    viewer = make_napari_viewer()
    samples = add_annotations(viewer, improvable / "data")
    segment, widget = open_improve(viewer, qtbot, export)
    assert widget.missing_torch is None and widget.improve_button.isEnabled()
    assert {name: box.currentText() for name, box in widget.pair_boxes.items()} == {
        name: f"{name} objects" for name in ("demo_000", "demo_001", "stack")}
    widget.options.set_values(steps=3)

    # First: the recorded torch source is gone, so the widget asks for it; nothing written.
    assert widget.improve() is not None
    settle(qtbot, widget, timeout=300_000)
    out = export.with_name("v1_improved")
    assert widget.status.text().startswith(f"error: {export}: its torch source, the adapter "), widget.status.text()
    assert "choose it under 'torch source'" in widget.status.text() and widget.source_edit.isVisibleTo(widget)
    assert not out.exists() and hidden(export.parent) == [] and digests(export) == old

    # Given the file: trained in a subprocess (the bar counts steps, the loss is live), exported
    # fp32 + int8 through the gate, loaded into the segment widget; the GUI thread kept ticking.
    widget.source_edit.setText(str(run / "adapter.safetensors"))
    seen: list = []
    widget.progress.valueChanged.connect(lambda v: seen.append((v, widget.progress.maximum())))
    with ticking() as ticks:
        widget.improve()
        settle(qtbot, widget, timeout=600_000)
    assert widget.status.text().startswith(f"new export {out} ("), widget.status.text()
    assert widget.status.text().endswith("loaded into the segment widget")
    settle(qtbot, segment)
    assert segment.session is not None and segment.session.export_dir == out
    kinds = [e["event"] for _, e in widget.events]
    assert kinds[0] == "start" and kinds[-1] == "result" and kinds.count("step") == 3
    assert widget.events[0][1]["images"] == samples  # the stack's unlabelled plane is no sample
    assert (3, 3) in seen and widget.loss_label.text().startswith("loss ")
    result = json.loads((out / "manifest.json").read_text())["improve"]
    assert result == widget.result and set(result["before"]) == {"fp32"}
    assert "fp32" in result["after"] and ("int8" in result["after"] or result["refused"])
    b, a = result["before"]["fp32"], result["after"]["fp32"]
    assert f"fp32: box {b['box_dice']:.3f} -> {a['box_dice']:.3f}" in widget.dice_label.text()
    assert digests(export) == old and hidden(export.parent) == []
    steps = [t for t, e in widget.events if e["event"] == "step"]
    train = [t for t in ticks if steps[0] <= t <= steps[-1]]
    pauses = np.diff([steps[0], *train, steps[-1]])
    print(f"training {steps[-1] - steps[0]:.2f} s: {len(train)} ticks, longest pause {pauses.max() * 1000:.0f} ms")
    assert pauses.max() < 2.0, "the GUI thread stalled during training"
    # The next round starts from the new export.
    assert widget.export_edit.text() == str(out) and widget.out_edit.text() == str(out) + "_improved"


def test_bad_input_and_cancel_leave_the_export_as_it_was(make_napari_viewer, qtbot, improvable, tmp_path):
    export = tmp_path / "v1"
    shutil.copytree(improvable / "v1", export)
    old = digests(export)
    viewer = make_napari_viewer()
    segment, widget = open_improve(viewer, qtbot, export)
    import tifffile

    image = tifffile.imread(next((improvable / "data" / "images").glob("*.tif")))
    viewer.add_image(image, name="cells")
    # No committed labels.
    assert widget.improve() is None
    assert widget.status.text() == ("error: no committed labels: commit objects with the segment widget (Shift-C), "
                                    "or choose a Labels layer for an image")
    viewer.add_labels(np.zeros((64, 80), np.int32), name="other")
    widget.pair_boxes["cells"].setCurrentText("other")
    assert widget.improve() is None
    assert widget.status.text() == f"error: labels of another shape than their image: 'cells': labels (64, 80), image {image.shape}"
    viewer.add_labels(np.zeros(image.shape, np.int32), name="cells objects")
    widget.pair_boxes["cells"].setCurrentText("cells objects")
    assert widget.improve() is None and widget.status.text() == "error: no committed labels: the chosen Labels layers hold no object"
    viewer.layers["cells objects"].data = tifffile.imread(next((improvable / "data" / "labels").glob("*.tif"))).astype(np.int32)
    taken = tmp_path / "taken"
    taken.mkdir()
    widget.out_edit.setText(str(taken))
    assert widget.improve() is None and widget.status.text() == f"error: new export {taken}: already exists; give a new folder"

    # Cancel in the middle of training: the process writes nothing.
    out = tmp_path / "new"
    widget.out_edit.setText(str(out))
    widget.options.set_values(steps=500)
    widget.improve()
    qtbot.waitUntil(lambda: any(e["event"] == "step" for _, e in widget.events), timeout=300_000)
    widget.cancel()
    settle(qtbot, widget, timeout=300_000)
    assert widget.status.text() == f"cancelled: nothing written; {export} is unchanged"
    assert widget.events[-1][1]["event"] == "cancelled"
    assert sum(e["event"] == "step" for _, e in widget.events) < 500
    assert not out.exists() and hidden(tmp_path) == [] and digests(export) == old
    assert segment.session.export_dir == export  # the segment widget keeps the old export
