"""The napari plugin in a real viewer (napari's ``make_napari_viewer``, real Qt on Xvfb): the
manifest, sample data, clicks and boxes against ``SamSession.predict``, commit, z-stacks,
"Segment all" (AIS and segment-everything), save and reload, results of workers that finish
after the export, slice or layer data changed, and errors as one status line (a whole slide:
test_napari_large.py).

Qt runs on an X display with its xcb platform: without ``DISPLAY`` the tests start their own
``Xvfb`` (GLX with Mesa's software OpenGL), kept for the whole test process. That is the headless
recipe of docs/napari.md: Qt's offscreen platform would draw image layers black."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed (pip install '.[napari]')")

from peft_export.data import synthetic_sample  # noqa: E402
from peft_export.runtime import SamSession  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIDGET = "Segment with an export"
_DISPLAY: dict = {}


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def headless_display() -> dict:
    """Environment for Qt without a screen: an X display (own Xvfb if needed) and Qt's xcb platform on it."""
    if not _DISPLAY or (_DISPLAY.get("proc") is not None and _DISPLAY["proc"].poll() is not None):
        _DISPLAY.clear()
        display, proc = os.environ.get("DISPLAY"), None
        if not display:
            xvfb = shutil.which("Xvfb")
            if xvfb is None:
                msg = "Xvfb is missing: napari's canvas needs an X display for OpenGL (apt-get install xvfb)"
                if os.environ.get("CI"):
                    pytest.fail(msg)
                pytest.skip(msg)
            read, write = os.pipe()
            # The server gets SIGTERM when this process has exited (not earlier: Qt keeps its connection
            # until the interpreter's very end, and a server gone before that is a fatal X error).
            proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten",
                                     "tcp"], pass_fds=(write,), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
            os.close(write)
            with os.fdopen(read, "rb") as f:
                number = f.readline().strip().decode()
            if not number:
                pytest.fail("Xvfb did not start")
            display = f":{number}"
        _DISPLAY.update({"QT_QPA_PLATFORM": "xcb", "DISPLAY": display, "proc": proc})
    return {k: v for k, v in _DISPLAY.items() if k != "proc"}


@pytest.fixture(scope="session", autouse=True)
def _qt_headless():
    # Session scope: runs before pytest-qt creates the QApplication (a session fixture too).
    saved = {k: os.environ.get(k) for k in ("QT_QPA_PLATFORM", "DISPLAY")}
    os.environ.update(headless_display())
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def ais_export(tmp_path_factory) -> Path:
    return build_ais_export(tmp_path_factory)


def build_ais_export(tmp_path_factory) -> Path:
    """A tiny export with micro-sam's instance decoder (random non-zero adapter weights), fp32 only;
    one per test session: the same export as the tiled, distributed and volume tests' (tiled_helpers;
    shared with test_napari_torchfree.py). The plugin only reads it; a test that changes it copies it."""
    from tiled_helpers import ais_export_dir

    return ais_export_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def plain_export(tmp_path_factory) -> Path:
    """An export without an instance decoder (shared with test_predict / test_runtime_torchfree)."""
    from test_predict import real_export

    return real_export(tmp_path_factory)


def nuclei(size: int = 200, seed: int = 3) -> np.ndarray:
    return synthetic_sample(size, seed=seed)[0]


def open_widget(viewer, qtbot, export: Path):
    """The plugin's dock widget, found through its npe2 manifest, with ``export`` loaded."""
    _, widget = viewer.window.add_plugin_dock_widget("peftexport", WIDGET)
    widget.load_export(export)
    settle(qtbot, widget)
    assert widget.session is not None, widget.status.text()
    return widget


def settle(qtbot, widget, timeout: int = 60_000) -> None:
    """Wait for the widget's worker threads (embedding, Segment all, save) to finish."""
    qtbot.waitUntil(lambda: not len(widget.tasks), timeout=timeout)
    qtbot.wait(10)


def press(qtbot, viewer, key: str) -> None:
    """Shift + ``key`` typed on napari's canvas, as a user would."""
    from qtpy.QtCore import Qt

    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, getattr(Qt, f"Key_{key}"), Qt.ShiftModifier)


def current_mask(viewer, image: str = "cells") -> np.ndarray:
    """The "current object" layer as a mask of the whole image (the layer covers only the window
    the mask was decoded in, placed by its translation)."""
    from peft_export.napari.layers import image_shape, shown_window

    layer, image_layer = viewer.layers["current object"], viewer.layers[image]
    full = np.zeros(image_shape(image_layer)[-2:], bool)
    y0, y1, x0, x1 = shown_window(layer, image_layer)
    full[y0:y1, x0:x1] = layer.data.astype(bool)
    return full


# ---- manifest and sample data ---------------------------------------------------------------------


def test_manifest_validates_and_imports():
    npe2 = shutil.which("npe2") or pytest.fail("npe2 command missing (pip install npe2)")
    res = subprocess.run([npe2, "validate", "peftexport", "--imports"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "valid" in res.stdout, res.stdout + res.stderr
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(ROOT / "peft_export" / "napari" / "napari.yaml")
    assert [w.display_name for w in manifest.contributions.widgets] == [WIDGET, "Improve the model"]
    assert [s.key for s in manifest.contributions.sample_data] == ["synthetic_nuclei", "synthetic_slide"]
    assert manifest.contributions.writers[0].layer_types == ["labels"]


def test_headless_canvas_draws_image_layers(make_napari_viewer):
    """docs/napari.md's headless recipe: Qt's xcb platform on Xvfb (GLX) draws an image layer
    (Qt's offscreen platform leaves it black)."""
    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1)), name="ramp")
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    dark, bright = shot[:, : shot.shape[1] // 3].mean(), shot[:, -shot.shape[1] // 3 :].mean()
    assert bright > 60 and bright > dark + 40, (dark, bright)


def test_sample_data_is_the_demos_synthetic_nuclei(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("peftexport", "synthetic_nuclei")
    layer = viewer.layers["synthetic nuclei"]
    np.testing.assert_array_equal(layer.data, synthetic_sample(256, seed=0)[0])
    assert layer.data.dtype == np.uint16


# ---- interactive ------------------------------------------------------------------------------------


def test_clicks_and_boxes_match_session_predict(make_napari_viewer, qtbot, ais_export):
    viewer = make_napari_viewer()
    image = nuclei(180, seed=4)[:128, :112]  # portrait, 16-bit gray, fits the model input: one embedding
    viewer.add_image(image, name="cells")
    widget = open_widget(viewer, qtbot, ais_export)
    session = SamSession(ais_export)
    emb = session.encode(image)
    points = viewer.layers["point prompts"]

    # One click (what napari's add mode does): computes the embedding, then the best of 3 masks.
    points.add([70.0, 60.0])
    settle(qtbot, widget)
    masks, iou, low = session.predict(point_coords=np.array([[60.0, 70.0]]), point_labels=np.array([1]),
                                      embedding=emb)
    best = int(np.argmax(iou))
    assert current_mask(viewer).any()
    np.testing.assert_array_equal(current_mask(viewer), masks[best])  # IoU 1.0: the same graph
    assert widget.last_decoded.index == best + 1

    # A negative point (widget toggle): single mask, the previous low-res logits fed back.
    widget.negative_box.setChecked(True)
    points.add([20.0, 100.0])
    assert points.features["positive"].tolist() == [True, False]
    np.testing.assert_allclose(points.face_color[1], [1, 0, 0, 1])  # red
    m2, _, low2 = session.predict(point_coords=np.array([[60.0, 70.0], [100.0, 20.0]]),
                                  point_labels=np.array([1, 0]), mask_input=low[best : best + 1],
                                  multimask_output=False, embedding=emb)
    np.testing.assert_array_equal(current_mask(viewer), m2[0])
    fresh, _, _ = session.predict(point_coords=np.array([[60.0, 70.0], [100.0, 20.0]]),
                                  point_labels=np.array([1, 0]), multimask_output=False, embedding=emb)
    assert not np.array_equal(fresh[0], m2[0]), "the mask feedback must make a difference in this test"

    # A box added: points + box, single mask, feedback again.
    viewer.layers["box prompts"].add_rectangles(np.array([[[30.0, 20.0], [30.0, 110.0], [120.0, 110.0],
                                                           [120.0, 20.0]]]))
    m3, _, _ = session.predict(point_coords=np.array([[60.0, 70.0], [100.0, 20.0]]), point_labels=np.array([1, 0]),
                               box=np.array([20.0, 30.0, 110.0, 120.0]), mask_input=low2, multimask_output=False,
                               embedding=emb)
    np.testing.assert_array_equal(current_mask(viewer), m3[0])

    # Removing a prompt starts afresh (no feedback from the prompt that is gone).
    points.selected_data = {1}
    points.remove_selected()
    m4, _, _ = session.predict(point_coords=np.array([[60.0, 70.0]]), point_labels=np.array([1]),
                               box=np.array([20.0, 30.0, 110.0, 120.0]), multimask_output=False, embedding=emb)
    np.testing.assert_array_equal(current_mask(viewer), m4[0])

    # A box alone: the best of three, like one click.
    widget.clear()
    assert not current_mask(viewer).any() and len(points.data) == 0
    viewer.layers["box prompts"].add_rectangles(np.array([[[10.0, 10.0], [10.0, 90.0], [80.0, 90.0], [80.0, 10.0]]]))
    m5, iou5, _ = session.predict(box=np.array([10.0, 10.0, 90.0, 80.0]), embedding=emb)
    np.testing.assert_array_equal(current_mask(viewer), m5[int(np.argmax(iou5))])
    assert len(widget.cache) == 1  # one embedding for all of it


def test_commit_two_objects_with_button_and_key(make_napari_viewer, qtbot, ais_export):
    from qtpy.QtCore import Qt

    viewer = make_napari_viewer()
    image = nuclei(160, seed=5)
    viewer.add_image(image, name="cells")
    widget = open_widget(viewer, qtbot, ais_export)
    tiled = SamSession(ais_export).tiled(image)  # larger than the 128 px input: prompts go to tiles
    points = viewer.layers["point prompts"]
    points.add([40.0, 40.0])
    settle(qtbot, widget)
    first = current_mask(viewer).copy()
    qtbot.mouseClick(widget.commit_button, Qt.LeftButton)
    assert len(points.data) == 0 and not current_mask(viewer).any()  # prompts cleared

    viewer.layers["box prompts"].add_rectangles(np.array([[[90.0, 95.0], [90.0, 150.0], [150.0, 150.0],
                                                           [150.0, 95.0]]]))
    settle(qtbot, widget)  # the box's tile is encoded
    second = current_mask(viewer).copy()
    masks, iou, _ = tiled.predict(box=np.array([95.0, 90.0, 150.0, 150.0]))
    np.testing.assert_array_equal(second, masks[int(np.argmax(iou))])
    press(qtbot, viewer, "C")  # the key binding
    objects = viewer.layers["cells objects"].data
    assert objects.dtype == np.int32 and objects.shape == image.shape
    names = [layer.name for layer in viewer.layers]  # results are drawn below the prompts and the current object
    assert names.index("cells objects") < min(names.index(n) for n in ("point prompts", "box prompts", "current object"))
    assert sorted(np.unique(objects)) == [0, 1, 2]
    np.testing.assert_array_equal(objects == 2, second)
    np.testing.assert_array_equal(objects == 1, first & ~second)  # the newer object is drawn over
    meta = viewer.layers["cells objects"].metadata["peftexport"]
    assert meta["export"] == ais_export.name and meta["export_peftexport_version"] == "0.2.0"
    assert widget.commit() is None and "nothing to commit" in widget.status.text()


def test_polarity_key_and_clear_key(make_napari_viewer, qtbot, ais_export):
    viewer = make_napari_viewer()
    viewer.add_image(nuclei(120), name="cells")
    widget = open_widget(viewer, qtbot, ais_export)
    points = viewer.layers["point prompts"]
    press(qtbot, viewer, "N")
    assert widget.negative_box.isChecked()
    points.add([50.0, 50.0])
    press(qtbot, viewer, "N")
    points.add([60.0, 60.0])
    settle(qtbot, widget)
    assert points.features["positive"].tolist() == [False, True]
    press(qtbot, viewer, "X")
    assert len(points.data) == 0 and not current_mask(viewer).any()


def test_stack_segments_the_current_slice_and_caches_embeddings(make_napari_viewer, qtbot, ais_export):
    viewer = make_napari_viewer()
    stack = np.stack([nuclei(128, seed=s) for s in (10, 11, 12)])
    viewer.add_image(stack, name="stack")
    widget = open_widget(viewer, qtbot, ais_export)
    session = SamSession(ais_export)
    viewer.dims.set_current_step(0, 2)
    points = viewer.layers["point prompts"]
    assert points.ndim == 3
    points.add([2.0, 64.0, 50.0])
    settle(qtbot, widget)
    masks, iou, _ = session.predict(point_coords=np.array([[50.0, 64.0]]), point_labels=np.array([1]),
                                    embedding=session.encode(stack[2]))
    np.testing.assert_array_equal(current_mask(viewer, "stack"), masks[int(np.argmax(iou))])
    assert widget.commit() == 1
    objects = viewer.layers["stack objects"].data
    assert objects.shape == stack.shape and objects[2].any() and not objects[:2].any()
    # A mask shown on slice 2, then slice 1 (a prompt there, its embedding still computing): the
    # mask of slice 2 is neither shown nor committed on slice 1.
    points.add([2.0, 64.0, 50.0])
    assert current_mask(viewer, "stack").any()
    points.add([1.0, 40.0, 40.0])
    viewer.dims.set_current_step(0, 1)
    assert widget.commit() is None and not current_mask(viewer, "stack").any()
    settle(qtbot, widget)
    assert widget.last_decoded is not None  # slice 1's own mask, once its embedding is there
    widget.clear()
    # Another slice: its own embedding; back to slice 2: cached, no worker.
    viewer.dims.set_current_step(0, 0)
    assert widget.compute_embedding() is not None
    settle(qtbot, widget)
    viewer.dims.set_current_step(0, 2)
    assert widget.compute_embedding() is None and "cached" in widget.status.text()
    assert len(widget.cache) == 3
    # A point on another slice is not a prompt here.
    points.add([0.0, 30.0, 30.0])
    assert not current_mask(viewer, "stack").any()


def best_mask(session: SamSession, plane: np.ndarray, yx) -> np.ndarray:
    """SamSession.predict's best mask of one positive click at (row, col) on ``plane``."""
    masks, iou, _ = session.predict(point_coords=np.array([[yx[1], yx[0]]], float), point_labels=np.array([1]),
                                    embedding=session.encode(plane))
    return masks[int(np.argmax(iou))]


@pytest.mark.slow  # several embeddings of two exports
def test_results_of_another_export_slice_or_data_are_never_shown(make_napari_viewer, qtbot, ais_export,
                                                                  plain_export):
    """Workers finish after the user moved on: the mask shown always comes from the export loaded
    now, on the slice and pixels shown now; stale results are dropped, not cached under a key
    that a later request could hit."""
    viewer = make_napari_viewer()
    stack = np.stack([nuclei(128, seed=s) for s in (20, 21)])
    layer = viewer.add_image(stack, name="stack")
    widget = open_widget(viewer, qtbot, ais_export)
    a, b = widget.session, SamSession(plain_export)
    points = viewer.layers["point prompts"]
    click = (64.0, 60.0)

    # A click on slice 0 starts export A's embedding; its result can only arrive through the event
    # loop, so it arrives after the switch to export B and to slice 1 below.
    points.add([0.0, *click])
    assert len(widget.tasks) == 1
    widget.use_session(b)
    viewer.dims.set_current_step(0, 1)
    points.add([1.0, *click])
    settle(qtbot, widget)
    want = best_mask(b, stack[1], click)
    assert not np.array_equal(want, best_mask(a, stack[1], click)), "the exports must differ in this test"
    np.testing.assert_array_equal(current_mask(viewer, "stack"), want)
    assert all(t.session is b for t in widget.cache.targets())  # A's late result was dropped
    # Back to slice 0: B's own embedding of slice 0 (A's embedding of it was never kept).
    viewer.dims.set_current_step(0, 0)
    settle(qtbot, widget)
    np.testing.assert_array_equal(current_mask(viewer, "stack"), best_mask(b, stack[0], click))

    # The same folder loaded again is another session: nothing of the old one is reused.
    widget.load_export(ais_export)
    settle(qtbot, widget)
    assert widget.session is not a and widget.session.export_dir == a.export_dir
    assert all(t.session is widget.session for t in widget.cache.targets())
    np.testing.assert_array_equal(current_mask(viewer, "stack"), best_mask(a, stack[0], click))

    # The layer's data replaced while its embedding is computed: the old pixels' result is dropped.
    widget.use_session(SamSession(ais_export))  # nothing cached: the click on slice 0 is encoded again
    assert len(widget.tasks) == 1
    other = np.stack([nuclei(128, seed=s) for s in (22, 23)])
    layer.data = other
    settle(qtbot, widget)
    assert [t.generation for t in widget.cache.targets()] == [1]
    np.testing.assert_array_equal(current_mask(viewer, "stack"), best_mask(widget.session, other[0], click))

    # Cancel: the running work's result is dropped.
    widget.clear()
    viewer.dims.set_current_step(0, 1)
    widget.compute_embedding()
    widget.cancel()
    settle(qtbot, widget)
    assert widget.status.text() == "computing the embedding: cancelled" and len(widget.cache) == 1

    # A removed layer's embeddings go with it; a new layer (napari may give it the same id()) starts afresh.
    viewer.layers.remove(layer)
    assert len(widget.cache) == 0
    fresh = nuclei(128, seed=24)
    viewer.add_image(fresh, name="stack")
    widget.image_box.setCurrentText("stack")
    points = viewer.layers["point prompts"]
    points.add([*click])
    settle(qtbot, widget)
    np.testing.assert_array_equal(current_mask(viewer, "stack"), best_mask(widget.session, fresh, click))

    # Segment all still running when another export is loaded: its labels are never written.
    assert widget.segment_all().what == "segmenting all objects"
    widget.use_session(SamSession(plain_export))
    settle(qtbot, widget)
    assert "stack automatic" not in viewer.layers


# ---- Segment all ------------------------------------------------------------------------------------


def test_segment_all_runs_ais_with_the_instance_decoder(make_napari_viewer, qtbot, ais_export):
    viewer = make_napari_viewer()
    image = nuclei(128, seed=6)[:, :110]  # fits the 128 px model input: one embedding
    viewer.add_image(image, name="cells")
    widget = open_widget(viewer, qtbot, ais_export)
    assert widget.ais_form.isVisibleTo(widget) and not widget.everything_form.isVisibleTo(widget)
    assert "--min-size" in widget.ais_form.boxes["min_size"].toolTip()
    widget.ais_form.set_values(min_size=8)
    widget.segment_all()
    settle(qtbot, widget)
    layer = viewer.layers["cells automatic"]
    want, records = SamSession(ais_export).segment_instances(image, min_size=8)
    assert len(records) >= 3
    np.testing.assert_array_equal(layer.data, want)
    meta = layer.metadata["peftexport"]
    assert meta["mode"] == "instances" and meta["params"]["min_size"] == 8 and meta["export"] == ais_export.name
    assert f"{len(records)} objects" in widget.status.text()


@pytest.mark.slow  # encodes every tile of the image
def test_segment_all_on_a_large_image_uses_the_tiled_runtime(make_napari_viewer, qtbot, ais_export):
    viewer = make_napari_viewer()
    image = nuclei(300, seed=9)[:, :280]  # larger than the export's 128 px input
    viewer.add_image(image, name="cells")
    widget = open_widget(viewer, qtbot, ais_export)
    widget.segment_all()
    settle(qtbot, widget)
    session = SamSession(ais_export)
    want, records = session.tiled(image).segment_instances()
    assert len(records) >= 3 and len(session.tiled(image).grid) > 1
    np.testing.assert_array_equal(viewer.layers["cells automatic"].data, want)
    assert viewer.layers["cells automatic"].metadata["peftexport"]["tiles"] == len(session.tiled(image).grid)
    assert "tiles" in widget.status.text()


@pytest.mark.slow  # encodes two tiles
def test_clicks_on_a_large_image_go_to_their_tile_at_full_resolution(make_napari_viewer, qtbot, ais_export):
    viewer = make_napari_viewer()
    image = nuclei(300, seed=9)[:, :280]  # larger than the export's 128 px input
    viewer.add_image(image, name="cells")
    widget = open_widget(viewer, qtbot, ais_export)
    tiled = SamSession(ais_export).tiled(image)
    points = viewer.layers["point prompts"]
    points.add([200.0, 220.0])  # row, col: tiles are prepared, then this click's tile is encoded
    settle(qtbot, widget)
    settle(qtbot, widget)
    masks, iou, low = tiled.predict(point_coords=np.array([[220.0, 200.0]]), point_labels=np.array([1]))
    best = int(np.argmax(iou))
    assert widget.decoder.tiled and masks[best].any()
    np.testing.assert_array_equal(current_mask(viewer), masks[best])  # the tile's window, full resolution
    y0, y1, x0, x1 = tiled.predict_window(point_coords=np.array([[220.0, 200.0]]), point_labels=np.array([1]))[3]
    assert viewer.layers["current object"].data.shape == (y1 - y0, x1 - x0)  # the tile's window only
    assert not current_mask(viewer)[:y0].any() and not current_mask(viewer)[:, :x0].any() and y0 > 0 and x0 > 0
    widget.negative_box.setChecked(True)
    points.add([205.0, 240.0])  # same tile: single mask, the low-res logits fed back
    m2, _, _ = tiled.predict(point_coords=np.array([[220.0, 200.0], [240.0, 205.0]]), point_labels=np.array([1, 0]),
                             mask_input=low[best : best + 1], multimask_output=False)
    np.testing.assert_array_equal(current_mask(viewer), m2[0])
    points.add([10.0, 10.0])  # far away: not in the object's tile
    assert "prompts of one object must fit in one tile" in widget.status.text()
    widget.clear()
    widget.negative_box.setChecked(False)
    points.add([20.0, 30.0])  # another tile, encoded on demand
    settle(qtbot, widget)
    m3, iou3, _ = tiled.predict(point_coords=np.array([[30.0, 20.0]]), point_labels=np.array([1]))
    np.testing.assert_array_equal(current_mask(viewer), m3[int(np.argmax(iou3))])


def test_segment_all_without_instance_decoder_is_segment_everything(make_napari_viewer, qtbot, plain_export):
    viewer = make_napari_viewer()
    image = nuclei(150, seed=7)
    viewer.add_image(image, name="cells")
    widget = open_widget(viewer, qtbot, plain_export)
    assert widget.everything_form.isVisibleTo(widget) and not widget.ais_form.isVisibleTo(widget)
    params = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.5)
    widget.everything_form.set_values(**params)
    widget.segment_all()
    settle(qtbot, widget)
    want, _ = SamSession(plain_export).segment_everything(embedding=SamSession(plain_export).encode(image), **params)
    assert want.max() >= 1
    np.testing.assert_array_equal(viewer.layers["cells automatic"].data, want)
    assert viewer.layers["cells automatic"].metadata["peftexport"]["mode"] == "everything"


# ---- saving -----------------------------------------------------------------------------------------


def test_save_and_reload(make_napari_viewer, qtbot, ais_export, tmp_path):
    from peft_export.napari.save import read_labels

    viewer = make_napari_viewer()
    image = nuclei(140, seed=8)
    viewer.add_image(image, name="cells")
    widget = open_widget(viewer, qtbot, ais_export)
    viewer.layers["point prompts"].add([70.0, 70.0])
    settle(qtbot, widget)
    widget.commit()
    objects = viewer.layers["cells objects"]
    for name in ("cells.tif", "cells.zarr"):
        widget.save(str(tmp_path / name))
        settle(qtbot, widget)
        assert widget.status.text() == f"saved cells objects to {tmp_path / name}"
        data, record = read_labels(str(tmp_path / name))
        np.testing.assert_array_equal(data, objects.data)
        assert record["name"] == "cells objects"
        assert record["peftexport"]["export"] == ais_export.name
        assert record["peftexport"]["export_peftexport_version"] == "0.2.0"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    # napari's own save (File > Save Selected Layers) through the plugin's writer, and napari's reader back.
    viewer.layers.selection.active = objects
    saved = viewer.layers.save(str(tmp_path / "via_napari.tif"), selected=True, plugin="peftexport")
    assert saved == [str(tmp_path / "via_napari.tif")]
    reloaded = viewer.open(saved[0], layer_type="labels", plugin="napari")[0]
    np.testing.assert_array_equal(reloaded.data, objects.data)
    assert json.loads(__import__("tifffile").TiffFile(saved[0]).pages[0].description)["peftexport"]["precision"] == "fp32"
    widget.save(str(tmp_path / "x.png"))
    settle(qtbot, widget)
    assert widget.status.text() == f"error: {tmp_path / 'x.png'}: save labels as .tif, .tiff or .zarr"
    assert not (tmp_path / "x.png").exists()
    # An OSError (here: a directory where the file should go) is one line in the status, nothing touched.
    (tmp_path / "taken.tif").mkdir()
    (tmp_path / "taken.tif" / "keep.txt").write_text("mine")
    widget.save(str(tmp_path / "taken.tif"))
    settle(qtbot, widget)
    assert widget.status.text().startswith("error: IsADirectoryError: ") and "\n" not in widget.status.text()
    assert (tmp_path / "taken.tif" / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- responsiveness and errors -------------------------------------------------------------------------


def test_errors_are_one_line_in_the_status(make_napari_viewer, qtbot, tmp_path, ais_export):
    viewer = make_napari_viewer()
    viewer.add_image(nuclei(100), name="cells")
    _, widget = viewer.window.add_plugin_dock_widget("peftexport", WIDGET)
    viewer.layers["point prompts"].add([10.0, 10.0])
    assert widget.status.text() == "error: load an export first"
    widget.load_export(tmp_path)
    settle(qtbot, widget)
    assert widget.session is None
    assert widget.status.text() == f"error: {tmp_path}: not an export directory (no manifest.json)"
    # ONNX Runtime failing on a click (the manifest's low-res size no longer matches the decoder graph).
    broken = tmp_path / "broken_export"
    shutil.copytree(ais_export, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["low_res_size"] //= 2
    (broken / "manifest.json").write_text(json.dumps(manifest))
    widget.load_export(broken)
    settle(qtbot, widget)
    viewer.layers["point prompts"].add([50.0, 50.0])
    settle(qtbot, widget)
    text = widget.status.text()
    assert text.startswith("error: ") and "onnxruntime failed" in text and "\n" not in text, text
    assert not viewer.layers["current object"].data.any()
