"""Tiled runtime: large images at full resolution, tile by tile (torch-free runtime, real export
with an instance decoder, real onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest

from peft_export.errors import PeftExportError
from peft_export.runtime import SamSession
from peft_export.runtime.blockwise import instances_blockwise
from peft_export.runtime.instances import check_ais_params, instances_from_maps
from peft_export.runtime.tiling import TileGrid, tile_spec
from tiled_helpers import ais_export_dir, nuclei_mosaic

pytestmark = pytest.mark.slow  # one tiny export (under a minute), then seconds each


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> SamSession:
    return SamSession(ais_export_dir(tmp_path_factory))


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b)) and ((pairs[0] == 0) == (pairs[1] == 0)).all()


def test_tile_spec_defaults_and_bad_values():
    m = {"image_size": 1024}
    assert tile_spec(m) == tile_spec(m, 1024, 256)  # no training record: tile = model input, scale 1
    rec = {**m, "training_scale": {"crop_size": 512, "model_input": 1024}}
    spec = tile_spec(rec)
    assert (spec.tile, spec.halo, spec.scale) == (512, 128, 2.0)  # 512-px native tiles resized to 1024
    assert tile_spec(rec, scale=4).tile == 256 and tile_spec(m, tile=800, halo=0).halo == 0
    for kwargs, says in [({"tile": 512, "halo": 256}, "--halo: 256 px must be >= 0 and less than half"),
                         ({"tile": 2048}, r"--tile: 2048 px is larger than the model input \(1024 px\)"),
                         ({"tile": 512, "scale": 1.0}, "--tile 512 and --scale 1 disagree"),
                         ({"scale": 0.5}, "larger than the model input"),
                         ({"tile": 8}, "too small"), ({"scale": -1.0}, "--scale: expected a number > 0")]:
        with pytest.raises(PeftExportError, match=says):
            tile_spec(m, **kwargs)


def test_grid_inner_areas_cover_the_image_once_and_tiles_stay_full_size():
    spec = tile_spec({"image_size": 128}, 100, 20)
    for shape in [(333, 251), (100, 700), (61, 60)]:
        grid = TileGrid(shape, spec)
        cover = np.zeros(shape, int)
        for t in grid:
            y0, y1, x0, x1 = t.inner
            cover[y0:y1, x0:x1] += 1
            oy0, oy1, ox0, ox1 = t.outer
            assert oy0 <= y0 < y1 <= oy1 and ox0 <= x0 < x1 <= ox1
            assert t.shape == (min(100, shape[0]), min(100, shape[1]))
        assert (cover == 1).all()
        assert grid.single == (shape == (61, 60)) and (len(grid) == 1) == grid.single


def test_below_the_tile_size_nothing_changes(session):
    image, _ = nuclei_mosaic(120, 100, seed=3)
    ref_labels, ref_recs = session.segment_instances(image=image)
    ref_masks, ref_iou, _ = session.predict(box=np.array([20, 30, 70, 90]), embedding=session.encode(image))
    session.set_image(image, tile=128, halo=16)
    labels, recs = session.segment_instances()
    np.testing.assert_array_equal(labels, ref_labels)
    assert recs == ref_recs and ref_labels.max() > 0
    masks, iou, _ = session.predict(box=np.array([20, 30, 70, 90]))
    np.testing.assert_array_equal(masks, ref_masks)
    np.testing.assert_allclose(iou, ref_iou)
    session.reset_image()


def test_tiled_instances_assemble_inner_areas_and_objects_cross_borders_whole(session):
    image, _ = nuclei_mosaic(300, 270, seed=5)
    tiled = session.tiled(image, tile=96, halo=24)
    assert len(tiled.grid) == 7 * 6 and tiled.spec.scale == 128 / 96  # inner areas 48 px
    maps = tiled.instance_maps()
    for tile in (tiled.grid.tiles[0], tiled.grid.tiles[7], tiled.grid.tiles[-1]):
        y0, y1, x0, x1 = tile.inner
        np.testing.assert_array_equal(maps[:, y0:y1, x0:x1], tiled.tile_maps(tile))
    labels, recs = tiled.segment_instances(block=64, halo=32)
    assert labels.shape == image.shape and len(recs) == labels.max() > 5
    # block-wise == whole-image watershed of the same maps, up to numbering: none cut at a border
    # (the random model's objects are wider than the 32-px first context: it grows to fit them)
    whole = instances_from_maps(*maps, **check_ais_params({}))
    assert same_up_to_renumbering(labels, whole)
    # and some objects do cross the 48-px inner tile borders
    crossing = [r for r in recs if r["bbox"][0] // 48 != (r["bbox"][0] + r["bbox"][2]) // 48]
    assert crossing


def test_blockwise_watershed_equals_whole_image_on_noisy_maps():
    from test_ais_runtime import noisy_maps

    image, labels = nuclei_mosaic(260, 300, seed=1)
    maps = noisy_maps(labels, 0)
    p = check_ais_params({"min_size": 10})
    whole = instances_from_maps(*maps, **p)
    np.testing.assert_array_equal(instances_blockwise(maps, p, block=1024), whole)  # one block: exactly
    for block, halo in ((64, 32), (50, 16)):
        assert same_up_to_renumbering(instances_blockwise(maps, p, block=block, halo=halo), whole)


def test_cells_wider_than_the_context_across_block_corners_come_out_whole():
    """Cells of 300 px diameter across block corners and a face (blocks of 512, the watershed's
    first context 64 px), each placed so that the corner's far block sees only a rim of the cell
    and none of its seed (the maps' seed, a disc of half the radius, lies 73 px beyond the corner):
    each cell comes out as one label, equal to the whole image's watershed."""
    from peft_export.training.instance_targets import distance_targets

    h = w = 1536
    yy, xx = np.mgrid[:h, :w]
    gt = np.zeros((h, w), np.int32)
    centres = [(407, 407), (617, 1129), (1129, 407), (919, 919), (367, 768)]  # the last: 5 px across a face
    for k, (cy, cx) in enumerate(centres, start=1):
        gt[(yy - cy) ** 2 + (xx - cx) ** 2 <= 150 ** 2] = k
    maps = distance_targets(gt)  # what a perfect instance decoder predicts
    p = check_ais_params({})

    def one_label_per_cell(lab):
        ids = [set(np.unique(lab[gt == k]).tolist()) - {0} for k in range(1, len(centres) + 1)]
        return [len(i) for i in ids] == [1] * len(centres) and len(set.union(*ids)) == len(centres)

    whole = instances_from_maps(*maps, **p)
    assert one_label_per_cell(whole)  # untiled (the smoothing leaves a few rim pixels 0)
    labels = instances_blockwise(maps, p, block=512, halo=64)
    assert one_label_per_cell(labels) and same_up_to_renumbering(labels, whole)


def test_prompts_go_to_the_tile_of_their_centre(session):
    image, _ = nuclei_mosaic(256, 256, seed=7, uint8=True)  # uint8 is kept as is: a crop normalises alike
    tiled = session.tiled(image, tile=100, halo=20)
    box = np.array([130, 140, 170, 190], np.float64)
    masks, iou, _, (y0, y1, x0, x1) = tiled.predict_window(box=box)
    assert (x0 <= 130 and 170 <= x1 and y0 <= 140 and 190 <= y1) and (y1 - y0, x1 - x0) == (100, 100)
    crop = image[y0:y1, x0:x1]
    ref, ref_iou, _ = session.predict(box=box - [x0, y0, x0, y0], embedding=session.encode(crop))
    np.testing.assert_array_equal(masks, ref)
    np.testing.assert_allclose(iou, ref_iou, rtol=1e-5)
    full, _, _ = tiled.predict(box=box)
    assert full.shape == (3, 256, 256) and np.array_equal(full[:, y0:y1, x0:x1], masks) and full.sum() == masks.sum()
    with pytest.raises(PeftExportError, match=r"box: 150x40 px is larger than one tile \(100 px\)"):
        tiled.predict(box=np.array([10, 10, 160, 50]))
    with pytest.raises(PeftExportError, match="prompts of one object must fit in one tile"):
        tiled.predict(point_coords=np.array([[20, 20], [250, 250]]), point_labels=np.array([1, 1]))


def test_tiled_everything_runs_on_tiles(session):
    image, _ = nuclei_mosaic(180, 160, seed=9, uint8=True)
    tiled = session.tiled(image, tile=100, halo=20)  # inner areas 60 px: 3 x 3 tiles
    labels, recs = tiled.segment_everything(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert labels.shape == image.shape and len(recs) == recs.summary["objects"] == labels.max()
    assert recs.summary["tiles"] == 9 and recs.summary["edge"] + recs.summary["nms"] + len(recs) >= 9


def _disc_record(cx, cy, r, window, iou):
    """A segment-everything record of a disc at image (cx, cy), seen by a tile with this window."""
    y0, y1, x0, x1 = window
    yy, xx = np.mgrid[y0:y1, x0:x1]
    m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    ys, xs = np.nonzero(m)
    return {"segmentation": m, "area": int(m.sum()), "predicted_iou": iou, "stability_score": 1.0,
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())],
            "point_coords": [[float(cx - x0), float(cy - y0)]]}


def test_tile_merge_drops_duplicates_and_edge_cut_masks():
    from peft_export.runtime.tiled import merge_tile_masks

    a, b = (0, 100, 0, 100), (0, 100, 60, 160)  # two tiles overlapping in x 60..100 of a 100 x 160 image
    both = [_disc_record(80, 50, 8, a, 0.9), _disc_record(80, 50, 8, b, 0.8)]  # one object, seen twice
    cut = _disc_record(97, 20, 6, a, 0.95)  # cut by tile a's right edge (inside the image)
    whole = _disc_record(97, 20, 6, b, 0.7)  # ...which tile b sees whole
    lonely = _disc_record(20, 80, 5, a, 0.5)
    labels, recs = merge_tile_masks([(a, [both[0], cut, lonely]), (b, [both[1], whole])], (100, 160), 0.7, 4)
    assert recs.summary == {"tiles": 2, "edge": 1, "nms": 1, "objects": 3}
    centres = sorted((round(r["point_coords"][0][0]), round(r["point_coords"][0][1])) for r in recs)
    assert centres == [(20, 80), (80, 50), (97, 20)]
    assert [r["predicted_iou"] for r in recs if r["point_coords"][0][0] == 80] == [0.9]  # the better duplicate
    assert labels.max() == 3 and (labels[50, 80] > 0) and (labels[20, 97] > 0) and (labels[80, 20] > 0)
    for k, r in enumerate(recs, start=1):
        x, y, bw, bh = r["bbox"]
        ys, xs = np.nonzero(labels == k)
        assert (xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()) == (x, y, bw, bh)


def test_tile_merge_keeps_what_no_tile_holds_whole_from_the_whole_image_layer():
    from peft_export.runtime.tiled import merge_tile_masks

    a, b, image = (0, 100, 0, 100), (0, 100, 60, 160), (0, 100, 0, 160)
    big = [_disc_record(80, 50, 30, a, 0.9), _disc_record(80, 50, 30, b, 0.9)]  # wider than the overlap: cut in both
    small_tile = _disc_record(20, 80, 5, a, 0.5)
    coarse = [_disc_record(80, 50, 30, image, 0.6), _disc_record(20, 80, 5, image, 0.99)]  # the whole image's masks
    labels, recs = merge_tile_masks([(a, [big[0], small_tile]), (b, [big[1]])], (100, 160), 0.7, 4, coarse=coarse)
    assert recs.summary == {"tiles": 2, "edge": 2, "nms": 1, "coarse": 1, "objects": 2}
    kept = sorted((r["predicted_iou"], r["area"]) for r in recs)
    assert kept == [(0.5, small_tile["area"]), (0.6, coarse[0]["area"])]  # the tile's small one, the coarse big one
    whole = _disc_record(80, 50, 30, image, 0.6)["segmentation"]
    assert (labels[whole] > 0).all() and len(np.unique(labels[whole])) == 1  # whole: one label across the border
    assert labels[80, 20] > 0 and labels[80, 20] != labels[50, 80]
