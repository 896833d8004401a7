"""The napari plugin on z-stacks and movies, in a real viewer (Xvfb, Qt's xcb platform, as
test_napari.py): every plane embedded in a worker (progress, Cancel, a zarr store reopened without
an encoder run, the GUI thread ticking through a real encoder run), "Segment object in volume",
"Segment all (3D)" and "Track" against the torch-free volume room (``peft_export.volume``) on the
same export, and bad input as one status line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari", reason="napari is not installed (pip install '.[napari]')")

from peft_export import volume as V  # noqa: E402
from peft_export.data.synthetic_volume import synthetic_movie, synthetic_volume  # noqa: E402
from peft_export.runtime import SamSession  # noqa: E402
from test_napari import _qt_headless, ais_export, current_mask, nuclei, open_widget, press, settle  # noqa: E402,F401
from test_napari_large import build_export_512, gaps, ticking  # noqa: E402


def progress_seen(widget) -> list:
    """(value, maximum) of the widget's bar each time it changes."""
    seen: list = []
    widget.progress.valueChanged.connect(lambda v: seen.append((v, widget.progress.maximum())))
    return seen


def best_click(session, embedding, zyx=None, box=None) -> np.ndarray:
    """The best of three masks of one click (z, y, x) or a box (x0, y0, x1, y1) on ``embedding``."""
    kw = {"box": np.asarray(box, float)} if box is not None else {
        "point_coords": np.array([[zyx[2], zyx[1]]], float), "point_labels": np.array([1])}
    masks, iou, _ = session.predict(**kw, embedding=embedding)
    return masks[int(np.argmax(iou))].astype(np.uint8)


@pytest.mark.slow  # embeds 8 planes twice (widget and reference) and propagates four times
def test_segment_object_in_volume_equals_the_volume_room(make_napari_viewer, qtbot, ais_export):
    viewer = make_napari_viewer()
    stack, truth = synthetic_volume((8, 112, 112), seed=1, n_objects=3)
    viewer.add_image(stack, name="stack")
    widget = open_widget(viewer, qtbot, ais_export)
    assert widget.volume_group.isVisibleTo(widget)
    session = widget.session
    reference = V.VolumeEmbeddings(SamSession(ais_export), V.stack_from_array(stack))

    # Every plane embedded in one worker; the bar counts the planes.
    seen = progress_seen(widget)
    widget.embed_volume()
    settle(qtbot, widget)
    assert widget.status.text().startswith("8 planes embedded"), widget.status.text()
    assert (8, 8) in seen and max(m for _, m in seen) == 8
    (volume,) = widget.volumes.values()
    assert volume.encoder_runs == 8
    assert widget.embed_volume() is None and widget.status.text() == "all 8 planes embedded"

    # A click on slice 4 decodes on the volume's embedding at once (no worker, no encoder run).
    zs, ys, xs = np.nonzero(truth == truth[4][truth[4] > 0][0])
    click = (4.0, float(np.median(ys[zs == 4])), float(np.median(xs[zs == 4])))
    viewer.dims.set_current_step(0, 4)
    viewer.layers["point prompts"].add(list(click))
    assert not len(widget.tasks) and volume.encoder_runs == 8
    shown = best_click(session, reference.embedding(4), click)
    assert shown.any()
    np.testing.assert_array_equal(current_mask(viewer, "stack"), shown)

    # Propagation from the shown mask, with the widget's options, equals the volume room's (the
    # random model's masks carry through every plane, or stop at once with a strict IoU stop).
    results = []
    for projection, iou in (("single_point", 0.5), ("box", 0.8)):
        widget.projection_box.setCurrentText(projection)
        widget.propagation_form.set_values(iou_threshold=iou)
        widget.segment_object_in_volume()
        settle(qtbot, widget)
        want, (z0, z1) = V.segment_object_in_volume(reference, {4: shown}, projection=projection, iou_threshold=iou,
                                                    box_extension=0.05)
        np.testing.assert_array_equal(viewer.layers["volume object"].data, want)
        assert widget.status.text().startswith(f"object on planes {z0}-{z1}")
        results.append((z0, z1))
    assert results == [(0, 7), (4, 4)]

    # A box on slice 1 too: the object between the slices is filled from both; slice 1's mask is
    # decoded on the volume's embedding as a click is (a box alone: the best of three).
    viewer.dims.set_current_step(0, 1)
    viewer.layers["box prompts"].add_rectangles(np.array([[[1, 20, 20], [1, 20, 90], [1, 90, 90], [1, 90, 20]]], float))
    assert not viewer.layers["volume object"].data.any(), "prompts changed: the old result is not kept"
    widget.segment_object_in_volume()
    settle(qtbot, widget)
    masks = {4: shown, 1: best_click(session, reference.embedding(1), box=(20, 20, 90, 90))}
    want, (z0, z1) = V.segment_object_in_volume(reference, masks, projection="box", iou_threshold=0.8,
                                                box_extension=0.05)
    np.testing.assert_array_equal(viewer.layers["volume object"].data, want)

    # "stop at lowest" + "stop at highest": nothing outside slices 1-4, even where no IoU stop would fire.
    widget.propagation_form.set_values(iou_threshold=0.0)
    widget.stop_lower_box.setChecked(True)
    widget.stop_upper_box.setChecked(True)
    widget.segment_object_in_volume()
    settle(qtbot, widget)
    want, (z0, z1) = V.segment_object_in_volume(reference, masks, projection="box", iou_threshold=0.0,
                                                box_extension=0.05, stop_lower=True, stop_upper=True)
    np.testing.assert_array_equal(viewer.layers["volume object"].data, want)
    planes = np.flatnonzero(want.any(axis=(1, 2)))
    assert planes.min() >= 1 and planes.max() <= 4 and (z0, z1) == (1, 4), (planes, z0, z1)

    # Commit: one id through the object's planes; prompts and the volume object cleared.
    press(qtbot, viewer, "C")
    objects = viewer.layers["stack objects"].data
    np.testing.assert_array_equal(objects, want.astype(np.int32))
    assert not len(viewer.layers["point prompts"].data) and not viewer.layers["volume object"].data.any()
    assert widget.status.text() == f"committed object 1 (planes {z0}-{z1})"
    assert widget.commit() is None  # nothing left to commit


@pytest.mark.slow  # segments 11 planes twice (widget and reference) and tracks
def test_segment_all_3d_and_track_equal_the_volume_room(make_napari_viewer, qtbot, ais_export):
    viewer = make_napari_viewer()
    stack, _ = synthetic_volume((6, 96, 96), seed=2, n_objects=3)
    viewer.add_image(stack, name="stack")
    widget = open_widget(viewer, qtbot, ais_export)
    reference = SamSession(ais_export)
    widget.ais_form.set_values(min_size=8)
    widget.merge_form.set_values(gap_closing=1, min_z_extent=2)
    widget.segment_all_3d()  # embeds the planes first, then segments
    settle(qtbot, widget)
    settle(qtbot, widget)
    layer = viewer.layers["stack automatic 3D"]
    options = dict(reference_defaults(reference), min_size=8)
    want = V.segment_volume(reference, stack, "ais", instance_options=options, gap_closing=1, min_z_extent=2)
    assert want.max() >= 2
    np.testing.assert_array_equal(layer.data, want)
    meta = layer.metadata["peftexport"]
    assert meta["merge"] == {"gap_closing": 1, "min_z_extent": 2} and meta["params"]["min_size"] == 8
    assert widget.status.text() == f"{want.max()} objects in 3D"

    movie, _, _ = synthetic_movie(5, 96, seed=2)
    viewer.add_image(movie, name="movie")
    widget.image_box.setCurrentText("movie")
    widget.track_form.set_values(max_distance=30)
    widget.track_objects()
    settle(qtbot, widget)
    settle(qtbot, widget)
    result = V.track(reference, movie, "ais", instance_options=options, max_distance=30.0)
    assert result.n_tracks >= 3
    np.testing.assert_array_equal(viewer.layers["movie tracked"].data, result.labels)
    tracks = viewer.layers["movie tracks"]
    np.testing.assert_allclose(tracks.data, result.tracks)
    assert tracks.graph == result.graph
    assert widget.status.text() == f"{result.n_tracks} tracks, {result.n_divisions} divisions"
    assert viewer.layers["movie tracked"].metadata["peftexport"]["tracking"]["max_distance"] == 30.0


def reference_defaults(session) -> dict:
    from peft_export.napari.automatic import mode_params

    return mode_params(session, None)[1]


def test_volume_tools_refuse_what_is_not_a_stack(make_napari_viewer, qtbot, ais_export):
    viewer = make_napari_viewer()
    viewer.add_image(nuclei(96), name="cells")
    _, widget = viewer.window.add_plugin_dock_widget("peftexport", "Segment with an export")
    widget.embed_volume()
    assert widget.status.text() == "error: load an export first"
    widget.load_export(ais_export)
    settle(qtbot, widget)
    assert not widget.volume_group.isVisibleTo(widget)
    for action in (widget.embed_volume, widget.segment_all_3d, widget.track_objects, widget.segment_object_in_volume):
        assert action() is None
        assert widget.status.text().startswith("error: image layer 'cells': the volume tools need a z-stack or a "
                                               "movie (one axis before rows and columns); it has 0"), widget.status.text()
    viewer.add_image(np.zeros((2, 3, 64, 64), np.uint16), name="tz")
    widget.image_box.setCurrentText("tz")
    assert not widget.volume_group.isVisibleTo(widget) and widget.segment_all_3d() is None
    assert "it has 2 (split it" in widget.status.text()
    import dask.array as da

    viewer.add_image(da.zeros((3, 8192, 8192), dtype=np.uint16, chunks=(1, 1024, 1024)), name="big",
                     contrast_limits=(0, 1))
    widget.image_box.setCurrentText("big")
    assert widget.segment_all_3d() is None and not len(widget.tasks)
    assert widget.status.text().startswith("error: Segment all (3D): a 3x8192x8192 stack needs about 3.0 GiB here; "
                                           "run 'peftexport predict EXPORT stack.zarr --3d -o labels.zarr'")
    viewer.add_image(np.stack([nuclei(96, seed=s) for s in (1, 2)]), name="stack")
    widget.image_box.setCurrentText("stack")
    assert widget.volume_group.isVisibleTo(widget)
    assert widget.segment_object_in_volume() is None
    assert widget.status.text() == "error: Segment object in volume: place prompts on one or a few slices first"
    assert not len(widget.tasks)


@pytest.mark.slow  # a 512 px export (~25 s, shared with test_napari_large) and 10 planes of 512^2
def test_embedding_a_stack_is_cancellable_resumable_stored_and_responsive(make_napari_viewer, qtbot, tmp_path,
                                                                         tmp_path_factory):
    export = build_export_512(tmp_path_factory)
    viewer = make_napari_viewer()
    stack = np.stack([nuclei(512, seed=s) for s in range(10)])
    layer = viewer.add_image(stack, name="stack")
    widget = open_widget(viewer, qtbot, export)
    store = tmp_path / "stack.emb.zarr"
    widget.store_edit.setText(str(store))

    # Cancel after two planes: the planes done stay (in the store), the rest is not encoded.
    seen = progress_seen(widget)
    widget.embed_volume()
    qtbot.waitUntil(lambda: any(v >= 2 for v, _ in seen), timeout=120_000)
    widget.cancel()
    settle(qtbot, widget)
    assert widget.status.text() == "embedding 10 planes: cancelled"
    (volume,) = widget.volumes.values()
    done = volume.n_embedded
    assert 2 <= done < 10 and volume.encoder_runs == done

    # Again: only the missing planes, while a 5 ms QTimer keeps ticking on the GUI thread.
    with ticking() as ticks:
        widget.embed_volume()
        settle(qtbot, widget, timeout=300_000)
    assert volume.n_embedded == 10 and volume.encoder_runs == 10, "a plane was encoded twice"
    start, end = widget.last_span["embedding 10 planes"]
    per_plane = (end - start) / (10 - done)
    during = gaps(ticks, start, end)
    print(f"{10 - done} planes in {end - start:.2f} s: {len(during) - 1} ticks, max gap {max(during) * 1000:.0f} ms")
    assert len(during) >= 4 * (10 - done), f"{len(during) - 1} timer ticks in {end - start:.2f} s"
    assert max(during) < 0.5 * per_plane, f"the GUI thread stalled {max(during):.3f} s (a plane: {per_plane:.3f} s)"

    # The same export loaded again (a new session): the store is reopened, no encoder run.
    widget.load_export(export)
    settle(qtbot, widget)
    widget.embed_volume()
    settle(qtbot, widget)
    assert widget.status.text() == f"all 10 planes embedded ({store})"
    (reopened,) = widget.volumes.values()
    assert reopened is not volume and reopened.encoder_runs == 0
    # Its embeddings are the ones a click uses.
    viewer.dims.set_current_step(0, 7)
    viewer.layers["point prompts"].add([7.0, 256.0, 256.0])
    assert not len(widget.tasks)
    want = best_click(widget.session, V.VolumeEmbeddings(widget.session, V.stack_from_array(stack)).embedding(7),
                      (7, 256, 256))
    np.testing.assert_array_equal(current_mask(viewer, "stack"), want)

    # Other pixels in the layer: the store was made from another stack, refused in one line.
    widget.clear()
    layer.data = stack[::-1].copy()
    widget.embed_volume()
    settle(qtbot, widget)
    text = widget.status.text()
    assert text.startswith(f"error: {store}: these embeddings were made differently (stack ") and "\n" not in text
    assert not [p for p in Path(tmp_path).iterdir() if p.name.startswith(".")]
