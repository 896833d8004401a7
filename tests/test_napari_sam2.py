"""The napari plugin on a SAM 2 export, in a real viewer (Xvfb, as test_napari.py): clicks decode with the
``Sam2Session`` that ``SamSession`` returns (also on an image larger than the model input, tile by tile as
``Sam2Session.tiled``), "Segment object in volume" is SAM 2's propagation and equals ``volume.segment_object_in_volume(...,
method="sam2")`` on the same prompts with no plane embedded first, "Segment all (3D)" and "Track" equal the
volume room's ``segment_volume`` / ``track`` on the same session, and what a SAM 2 export does not do in the
Volume / movie box (Embed all planes; propagation without memory graphs) is disabled and refused in one status
line.

The models: a random hiera_t at image size 256 with its memory graphs, and one at 128 px with the image graphs
only (tests/volume_helpers.py).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed (pip install '.[napari]')")
pytest.importorskip(
    "sam2", reason="sam2 is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)")

from peft_export import volume as V  # noqa: E402
from peft_export.data.synthetic_volume import synthetic_volume  # noqa: E402
from peft_export.napari.automatic import mode_params  # noqa: E402
from peft_export.runtime import SamSession  # noqa: E402
from peft_export.runtime.sam2_session import Sam2Session  # noqa: E402
from test_napari import _qt_headless, current_mask, nuclei, open_widget, settle  # noqa: E402,F401
from test_napari_volume import best_click, progress_seen  # noqa: E402
from volume_helpers import sam2_image_export, sam2_video_export  # noqa: E402


@pytest.fixture(scope="module")
def sam2_exports(tmp_path_factory):
    return sam2_video_export(tmp_path_factory)


@pytest.mark.slow  # the SAM 2 export (~45 s, shared with test_volume_sam2.py) and two propagations
def test_sam2_export_clicks_and_propagates_like_the_volume_room(make_napari_viewer, qtbot, sam2_exports):
    export, _ = sam2_exports
    viewer = make_napari_viewer()
    stack, truth = synthetic_volume((6, 64, 80), seed=2, n_objects=(2, 3), radius=(7.0, 12.0))
    viewer.add_image(stack, name="stack")
    widget = open_widget(viewer, qtbot, export)
    session = widget.session
    assert isinstance(session, Sam2Session)
    reference = SamSession(export)

    # The box offers SAM 2's propagation (no prompts-method options), Segment all (3D) and Track; no embeddings
    # to compute first or store.
    assert widget.volume_group.isVisibleTo(widget) and widget.propagate_button.isEnabled()
    assert not widget.propagation_form.isVisibleTo(widget)
    for button in (widget.embed_volume_button, widget.store_edit):
        assert not button.isEnabled()
    assert widget.all_3d_button.isEnabled() and widget.track_button.isEnabled()
    assert widget.volume_note.isVisibleTo(widget) and widget.volume_note.text().startswith("SAM 2 export: ")

    # A click on slice 3 is decoded by the Sam2Session on that plane's embedding (the best of three).
    zs, ys, xs = np.nonzero(truth == truth[3][truth[3] > 0][0])
    click = (3.0, float(np.median(ys[zs == 3])), float(np.median(xs[zs == 3])))
    viewer.dims.set_current_step(0, 3)
    viewer.layers["point prompts"].add(list(click))
    settle(qtbot, widget)
    shown = best_click(reference, reference.encode(stack[3]), click)
    assert shown.any()
    np.testing.assert_array_equal(current_mask(viewer, "stack"), shown)

    # A box on slice 1, placed while slice 3 is shown (no mask seen there): SAM 2 gets the box as that
    # frame's prompt and the mask seen on slice 3 as it is; nothing is embedded beforehand.
    box = (10.0, 8.0, 60.0, 50.0)  # x0, y0, x1, y1
    viewer.layers["box prompts"].add_rectangles(np.array([[[1, box[1], box[0]], [1, box[1], box[2]],
                                                           [1, box[3], box[2]], [1, box[3], box[0]]]]))
    seen = progress_seen(widget)
    widget.segment_object_in_volume()
    settle(qtbot, widget)
    volume = V.VolumeEmbeddings(reference, V.stack_from_array(stack))
    want, (z0, z1) = V.segment_object_in_volume(volume, {3: shown, 1: {"box": np.array(box)}}, method="sam2")
    layer = viewer.layers["volume object"]
    np.testing.assert_array_equal(layer.data, want)
    assert widget.status.text().startswith(f"object on planes {z0}-{z1}"), widget.status.text()
    np.testing.assert_array_equal(want[3], shown)  # the seen mask is kept as it is
    assert 1 < int(want.any(axis=(1, 2)).sum()) and not np.array_equal(want[0], want[2])
    assert not [w for w in widget.last_timing if w.startswith("embedding")]
    assert all(v.encoder_runs == 0 for v in widget.volumes.values())
    # SAM 2 visits planes 1..5 forward, then 1..0 backward: the bar counts the 7 visits
    assert (7, 7) in seen and max(m for _, m in seen) == 7

    # Commit: one id through the object's planes.
    assert widget.commit() == 1
    np.testing.assert_array_equal(viewer.layers["stack objects"].data, want.astype(np.int32))

    # Cancel: the propagation stops and its result is dropped.
    viewer.layers["point prompts"].add(list(click))
    settle(qtbot, widget)
    widget.segment_object_in_volume()
    widget.cancel()
    settle(qtbot, widget)
    assert widget.status.text() == "segmenting the object in the volume (SAM 2): cancelled"
    assert not layer.data.any()

    # Embed all planes: one line, nothing started (each tool encodes the planes it reaches).
    assert widget.embed_volume() is None and not len(widget.tasks)
    assert widget.status.text() == ("error: Embed all planes: export is a SAM 2 export; its planes are encoded as "
                                    "Segment object in volume, Segment all (3D) and Track reach them, so there is "
                                    "nothing to embed first")

    # A 2D image larger than the model input: tile by tile at full resolution, as Sam2Session.tiled does it.
    image = nuclei(300, seed=4)[:, :280]
    viewer.add_image(image, name="cells")
    widget.image_box.setCurrentText("cells")
    viewer.layers["point prompts"].add([150.0, 140.0])
    settle(qtbot, widget)
    masks, iou, _, (y0, y1, x0, x1) = reference.tiled(image).predict_window(
        point_coords=np.array([[140.0, 150.0]]), point_labels=np.array([1]))
    want = np.zeros(image.shape[:2], bool)
    want[y0:y1, x0:x1] = masks[int(np.argmax(iou))]
    assert (y1 - y0, x1 - x0) == (256, 256) and want.any()
    np.testing.assert_array_equal(current_mask(viewer, "cells"), want)


@pytest.mark.slow  # the SAM 2 export (shared)
def test_sam2_export_without_memory_graphs_says_how_to_make_one(make_napari_viewer, qtbot, sam2_exports):
    _, plain = sam2_exports
    viewer = make_napari_viewer()
    stack, _ = synthetic_volume((3, 48, 48), seed=1, n_objects=2, radius=(6.0, 9.0))
    viewer.add_image(stack, name="stack")
    widget = open_widget(viewer, qtbot, plain)
    assert not widget.propagate_button.isEnabled() and widget.all_3d_button.isEnabled()
    assert "peftexport merge-and-export ... --video" in widget.volume_note.text()
    viewer.dims.set_current_step(0, 0)
    viewer.layers["point prompts"].add([0.0, 24.0, 24.0])  # clicks work on it
    settle(qtbot, widget)
    assert widget.status.text().startswith("mask "), widget.status.text()
    assert widget.segment_object_in_volume() is None and not len(widget.tasks)
    assert widget.status.text() == ("error: Segment object in volume: image_only is a SAM 2 export without memory "
                                    "graphs, so it cannot propagate; export the model again with 'peftexport "
                                    "merge-and-export ... --video'")


@pytest.mark.slow  # the 128-px SAM 2 export (shared with test_sam2_tiled.py), 5 planes and 4 frames twice each
def test_sam2_segment_all_3d_and_track_equal_the_volume_room(make_napari_viewer, qtbot, tmp_path_factory):
    from peft_export.data.synthetic_volume import synthetic_movie

    export = sam2_image_export(tmp_path_factory)
    viewer = make_napari_viewer()
    stack, _ = synthetic_volume((5, 64, 80), seed=2, n_objects=(3, 4), radius=(7.0, 12.0))
    viewer.add_image(stack, name="stack")
    widget = open_widget(viewer, qtbot, export)
    reference = SamSession(export)
    params = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.95)
    widget.everything_form.set_values(**params)
    widget.merge_form.set_values(min_z_extent=2)
    seen = progress_seen(widget)
    widget.segment_all_3d()  # nothing embedded first: each plane is encoded as it is segmented
    settle(qtbot, widget)
    settle(qtbot, widget)
    layer = viewer.layers["stack automatic 3D"]
    options = dict(mode_params(reference, None)[1], **params)
    want = V.segment_volume(reference, stack, "everything", everything_options=options, min_z_extent=2)
    assert want.max() >= 2
    np.testing.assert_array_equal(layer.data, want)
    assert layer.metadata["peftexport"]["mode"] == "everything"
    assert widget.status.text() == f"{want.max()} objects in 3D"
    assert (5, 5) in seen and not [w for w in widget.last_timing if w.startswith("embedding")]
    assert all(v.n_embedded == 0 for v in widget.volumes.values())  # SAM 2 plane embeddings are not kept

    movie, _, _ = synthetic_movie(4, 96, seed=3, n_objects=(4, 5))
    viewer.add_image(movie, name="movie")
    widget.image_box.setCurrentText("movie")
    widget.track_form.set_values(max_distance=20)
    widget.track_objects()
    settle(qtbot, widget)
    settle(qtbot, widget)
    result = V.track(reference, movie, "everything", everything_options=options, max_distance=20.0)
    assert result.n_tracks >= 2
    np.testing.assert_array_equal(viewer.layers["movie tracked"].data, result.labels)
    np.testing.assert_allclose(viewer.layers["movie tracks"].data, result.tracks)
    assert widget.status.text() == f"{result.n_tracks} tracks, {result.n_divisions} divisions"
