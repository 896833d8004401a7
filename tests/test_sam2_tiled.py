"""SAM 2 exports on large images, tile by tile (``Sam2Session.set_image(tile=)`` / ``tiled``): the same tiled
runtime as SAM's (``runtime.tiled``), a tile's embedding being the image embedding and its two high-res feature
maps. What test_tiled.py holds for SAM, on a random hiera_t exported at 128 px: a prompt inside one tile gives the
mask of the session run on that tile alone; an image that fits one tile is segmented as without tiles;
segment-everything runs on every tile plus the whole image and returns masks over the whole image; and
``peftexport predict --tile`` writes them (real onnxruntime, real files).
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr

pytest.importorskip(
    "sam2", reason="sam2 is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)")
pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from peft_export.cli.main import app  # noqa: E402
from peft_export.errors import PeftExportError  # noqa: E402
from peft_export.runtime import SamSession  # noqa: E402
from peft_export.runtime.sam2_session import Sam2Session  # noqa: E402
from tiled_helpers import nuclei_mosaic  # noqa: E402
from volume_helpers import sam2_image_export  # noqa: E402

pytestmark = pytest.mark.slow  # one SAM 2 export (~15 s, shared), then seconds each


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return sam2_image_export(tmp_path_factory)


@pytest.fixture(scope="module")
def image():
    """300 x 200 uint8 (uint8 is kept as is, so a crop normalises as the whole image does)."""
    return nuclei_mosaic(300, 200, seed=7, uint8=True)[0]


def test_a_prompt_in_one_tile_equals_the_session_on_that_tile(export, image):
    session = SamSession(export)
    assert isinstance(session, Sam2Session) and session.image_size == 128
    tiled = session.tiled(image, tile=100, halo=20)
    assert len(tiled.grid) == 5 * 4 and tiled.spec.scale == 1.28  # inner areas 60 px
    box = np.array([130, 140, 170, 190], np.float64)
    masks, iou, low, (y0, y1, x0, x1) = tiled.predict_window(box=box)
    assert (x0 <= 130 and 170 <= x1 and y0 <= 140 and 190 <= y1) and (y1 - y0, x1 - x0) == (100, 100)
    crop = image[y0:y1, x0:x1]
    ref, ref_iou, ref_low = session.predict(box=box - [x0, y0, x0, y0], embedding=session.encode(crop))
    np.testing.assert_array_equal(masks, ref)
    np.testing.assert_allclose(iou, ref_iou, rtol=1e-5)
    np.testing.assert_allclose(low, ref_low, rtol=1e-5, atol=1e-5)
    assert 0 < ref[int(np.argmax(ref_iou))].sum() < ref[0].size  # a mask, not an empty or full window

    # set_image(tile=) routes predict the same way; a point prompt goes to the tile of its inner area
    session.set_image(image, tile=100, halo=20)
    full, full_iou, _ = session.predict(box=box)
    assert full.shape == (3, 300, 200) and np.array_equal(full[:, y0:y1, x0:x1], masks) and full.sum() == masks.sum()
    np.testing.assert_allclose(full_iou, iou)
    point = np.array([[40.0, 250.0]])
    pmasks, _, _, (py0, py1, px0, px1) = tiled.predict_window(point_coords=point, point_labels=np.array([1]))
    pref, _, _ = session.predict(point_coords=point - [px0, py0], point_labels=np.array([1]),
                                 embedding=session.encode(image[py0:py1, px0:px1]))
    assert py0 > 0 and np.array_equal(pmasks, pref)
    with pytest.raises(PeftExportError, match=r"box: 150x40 px is larger than one tile \(100 px\)"):
        session.predict(box=np.array([10, 10, 160, 50]))
    with pytest.raises(PeftExportError, match="this export has no instance decoder"):  # before any tile runs
        tiled.segment_instances()
    session.reset_image()
    with pytest.raises(PeftExportError, match="no image set"):
        session.predict(box=box)


def test_an_image_that_fits_one_tile_is_segmented_as_without_tiles(export, image):
    session = SamSession(export)
    small = image[:120, :100]
    box = np.array([20, 30, 70, 90])
    ref, ref_iou, _ = session.predict(box=box, embedding=session.encode(small))
    session.set_image(small, tile=128, halo=16)
    masks, iou, _ = session.predict(box=box)
    np.testing.assert_array_equal(masks, ref)
    np.testing.assert_allclose(iou, ref_iou)


def test_segment_everything_over_tiles_returns_masks_over_the_whole_image(export, image):
    session = SamSession(export)
    options = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.95)
    session.set_image(image, tile=100, halo=25)
    labels, recs = session.segment_everything(**options)
    assert labels.shape == image.shape and len(recs) == recs.summary["objects"] == labels.max() >= 1
    s = recs.summary
    assert s["tiles"] == 24 and s["edge"] + s["nms"] + len(recs) >= 24  # every tile gave candidates
    # the coarse layer (the whole image at 128 px) comes back at full resolution, beyond any one tile
    rows, cols = np.nonzero(labels)
    assert rows.max() - rows.min() > 100 or cols.max() - cols.min() > 100
    assert all(0 <= r["bbox"][0] and r["bbox"][0] + r["bbox"][2] <= 200 and r["bbox"][1] + r["bbox"][3] <= 300
               for r in recs)
    same, _ = session.tiled(image, tile=100, halo=25).segment_everything(**options)
    np.testing.assert_array_equal(labels, same)


def test_predict_tile_on_a_sam2_export_writes_the_tiles_results(export, image, tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "big.tif", image)
    run = CliRunner()
    res = run.invoke(app, ["predict", str(export), str(tmp_path / "big.tif"), "--tile", "100", "--box",
                           "130,140,170,190", "-o", str(tmp_path / "mask.zarr"), "-q"])
    assert res.exit_code == 0, res.output
    got = np.asarray(zarr.open_group(str(tmp_path / "mask.zarr"), mode="r")["0"])
    masks, iou, _, (y0, y1, x0, x1) = SamSession(export).tiled(image, tile=100).predict_window(
        box=np.array([130, 140, 170, 190], np.float64))
    want = np.zeros(image.shape, np.uint32)
    want[y0:y1, x0:x1] = masks[int(np.argmax(iou))]
    np.testing.assert_array_equal(got, want)

    res = run.invoke(app, ["predict", str(export), str(tmp_path / "big.tif"), "--tile", "100", "--everything",
                           "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0",
                           "-o", str(tmp_path / "labels.zarr"), "-q"])
    assert res.exit_code == 0, res.output
    assert "(24 tile(s) of 100 px" in res.output
    labels = np.asarray(zarr.open_group(str(tmp_path / "labels.zarr"), mode="r")["0"])
    assert labels.shape == image.shape and labels.max() >= 1
    res = run.invoke(app, ["predict", str(export), str(tmp_path / "big.tif"), "--tile", "100", "--everything",
                           "--halo", "2", "-o", str(tmp_path / "x.zarr")])
    assert res.exit_code == 2 and res.output.startswith("error: --halo: 2 px is too small")
    assert not (tmp_path / "x.zarr").exists()
