"""``peftexport predict BIG --points/--box --tile`` and ``--everything --tile``: tiled prompts and
tiled segment-everything from the command line, into OME-Zarr (tiny export, real onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from peft_export.cli.main import app
from peft_export.runtime import SamSession
from tiled_helpers import ais_export_dir, nuclei_mosaic

pytestmark = pytest.mark.slow  # one tiny export, then seconds


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return ais_export_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    image, _ = nuclei_mosaic(300, 340, seed=11, uint8=True)  # uint8 kept as is: a crop normalises alike
    path = tmp_path_factory.mktemp("big") / "big.tif"
    tifffile.imwrite(path, image)
    return path, image


def _run(*args):
    res = CliRunner().invoke(app, ["predict", *map(str, args)])
    return res.exit_code, res.output


def test_cli_point_prompt_goes_to_its_tile_at_full_resolution(export, big, tmp_path):
    path, image = big
    out = tmp_path / "m.zarr"
    code, output = _run(export, path, "--points", "250,210;262,222,0", "--tile", "100", "--halo", "20", "-o", out,
                        "-q")
    assert code == 0, output
    assert "tile(s) of 100 px" in output and not (tmp_path / "m.zarr.partial").exists()
    group = zarr.open_group(str(out), mode="r")
    got, rec = group["0"][:], group.attrs["peftexport"]
    assert "multiscales" in group.attrs and got.shape == image.shape
    y0, y1, x0, x1 = rec["window"]
    assert (y1 - y0, x1 - x0) == (100, 100) and x0 > 0 and y0 > 0  # a tile inside the image, full size
    # independently: the tile's crop through the untiled runtime, the point shifted into it
    session = SamSession(export)
    masks, iou, _ = session.predict(point_coords=np.array([[250 - x0, 210 - y0], [262 - x0, 222 - y0]]),
                                    point_labels=np.array([1, 0]), embedding=session.encode(image[y0:y1, x0:x1]))
    best = int(np.argmax(iou))
    assert rec["best"] == best and masks[best].sum() > 0
    np.testing.assert_array_equal(got[y0:y1, x0:x1], masks[best].astype(np.uint32))
    assert got.sum() == masks[best].sum()  # nothing outside the tile's window


def test_cli_everything_on_tiles_equals_the_tiled_runtime(export, big, tmp_path):
    path, image = big
    code, output = _run(export, path, "--everything", "--tile", "100", "--halo", "20", "--points-per-side", "4",
                        "--pred-iou-thresh", "0", "--stability-thresh", "0", "-o", tmp_path / "out", "-q")
    assert code == 0, output
    group = zarr.open_group(str(tmp_path / "out" / "big_labels.zarr"), mode="r")
    ref, recs = SamSession(export).tiled(image, tile=100, halo=20).segment_everything(
        points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    # every tile ran and went through the crop-layer merge (the random tiny model's masks fill their
    # tiles, so the edge filter drops them all; test_tiled's merge test checks kept objects)
    assert recs.summary["tiles"] == 5 * 6 == group.attrs["peftexport"]["tiles"]
    assert group.attrs["peftexport"]["filters"] == recs.summary and recs.summary["edge"] > 0
    np.testing.assert_array_equal(group["0"][:], ref.astype(np.uint32))
    assert group.attrs["peftexport"]["n_objects"] == len(recs) and f"{len(recs)} objects" in output


def test_cli_tiled_prompt_bad_input_is_one_line_and_leaves_nothing(export, big, tmp_path):
    path, _ = big
    cases = [
        (("--box", "10,10,160,50", "--tile", "100"), "box: 150x40 px is larger than one tile (100 px)"),
        (("--points", "20,20;250,250", "--tile", "100"), "prompts of one object must fit in one tile"),
        (("--points", "20,20", "--tile", "100", "--workers", "2"), "--workers/--scheduler: run --instances"),
        (("--points", "20,20", "--everything", "--tile", "100"), "not both"),
        (("--points", "900,20", "--tile", "100"), "outside the image"),
    ]
    for args, says in cases:
        code, output = _run(export, path, *args, "-o", tmp_path / "o.zarr", "-q")
        assert code == 2 and says in output and len(output.strip().splitlines()) == 1, (args, output)
        assert not list(tmp_path.iterdir())
