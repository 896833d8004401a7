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


def test_cli_everything_on_tiles_keeps_objects_on_tile_borders(export, big, tmp_path):
    """Objects crossing tile borders come out of tiled segment-everything. The random tiny model's
    masks fill whatever it is shown: every tile's mask touches an inner tile edge and is dropped,
    and the whole-image layer (SAM's crop layer 0) keeps them, so the output is the untiled
    segment-everything of the image, objects across every border."""
    path, image = big
    opts = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    code, output = _run(export, path, "--everything", "--tile", "100", "--halo", "20", "--points-per-side", "4",
                        "--pred-iou-thresh", "0", "--stability-thresh", "0", "-o", tmp_path / "out", "-q")
    assert code == 0, output
    group = zarr.open_group(str(tmp_path / "out" / "big_labels.zarr"), mode="r")
    got, rec = group["0"][:], group.attrs["peftexport"]
    session = SamSession(export)
    untiled, recs = session.segment_everything(embedding=session.encode(image), **opts)
    assert untiled.max() > 0 and rec["n_objects"] == len(recs) and f"{len(recs)} objects" in output
    assert rec["filters"]["tiles"] == 5 * 6 == rec["tiles"] and rec["filters"]["coarse"] == len(recs)
    assert same_up_to_renumbering(got, untiled)
    step = 100 - 2 * 20
    crossing = [x for x in range(step, image.shape[1], step) if ((got[:, x - 1] == got[:, x]) & (got[:, x] > 0)).any()]
    assert crossing  # one object on both sides of an inner tile border


def same_up_to_renumbering(a, b):
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return pairs.shape[1] == len(np.unique(a)) == len(np.unique(b)) and ((pairs[0] == 0) == (pairs[1] == 0)).all()


def test_cli_tiled_prompt_bad_input_is_one_line_and_leaves_nothing(export, big, tmp_path):
    path, _ = big
    cases = [
        (("--box", "10,10,160,50", "--tile", "100"), "box: 150x40 px is larger than one tile (100 px)"),
        (("--points", "20,20;250,250", "--tile", "100"), "prompts of one object must fit in one tile"),
        (("--points", "20,20", "--tile", "100", "--workers", "2"), "--workers/--scheduler: run --instances"),
        (("--points", "20,20", "--everything", "--tile", "100"), "not both"),
        (("--points", "900,20", "--tile", "100"), "outside the image"),
        (("--everything", "--tile", "100", "--halo", "0"),
         "--halo: 0 px is too small for --everything on 100-px tiles"),
    ]
    for args, says in cases:
        code, output = _run(export, path, *args, "-o", tmp_path / "o.zarr", "-q")
        assert code == 2 and says in output and len(output.strip().splitlines()) == 1, (args, output)
        assert not list(tmp_path.iterdir())


def test_large_path_options_it_cannot_honour_are_refused_and_device_is_honoured(export, big, tmp_path,
                                                                                monkeypatch):
    """--overlay and --all-masks are not written on the large-image path, and an output named like
    an image file (or a URL) does not silently become a local folder of zarr: one line each,
    nothing written. --device reaches the session (without CUDA here: its refusal, as for
    ordinary images)."""
    import onnxruntime

    path, _ = big
    monkeypatch.chdir(tmp_path)
    cases = [
        (("--points", "250,210", "--overlay"), "--overlay: not written for large images"),
        (("--everything", "--overlay"), "--overlay: not written for large images"),
        (("--instances", "--overlay"), "--overlay: not written for large images"),
        (("--points", "250,210", "--all-masks"), "--all-masks: not written for large images"),
    ]
    for mode in (("--points", "250,210"), ("--everything",), ("--instances",)):
        cases.append(((*mode, "-o", tmp_path / "labels.tif"),
                      "labels.tif: large images' results are written as OME-Zarr, not .tif; name the output "
                      "labels.zarr"))
    cases.append((("--instances", "-o", "s3://bucket/labels.zarr"), "URL outputs are not written"))
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        cases += [((mode, "--device", "cuda"), "device cuda: this onnxruntime has no CUDAExecutionProvider")
                  for mode in ("--everything", "--instances")]
    for args, says in cases:
        out = [] if "-o" in args else ["-o", tmp_path / "o.zarr"]
        code, output = _run(export, path, *args, "--tile", "100", "--halo", "20", *out, "-q")
        assert code == 2 and says in output and len(output.strip().splitlines()) == 1, (args, output)
        assert not list(tmp_path.iterdir()), args


def test_tiled_prompts_resume_a_folder(export, big, tmp_path):
    """--resume on the large-image path: images whose .zarr exists (only a complete result has the
    name) are skipped, the others run."""
    path, image = big
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "a.tif", image)
    tifffile.imwrite(folder / "b.tif", image[::-1].copy())
    args = (export, folder, "--points", "250,210", "--tile", "100", "--halo", "20", "-o", tmp_path / "out", "-q")
    code, output = _run(*args)
    assert code == 0, output
    done = zarr.open_group(str(tmp_path / "out" / "a_mask.zarr"), mode="r")["0"][:]
    import shutil

    shutil.rmtree(tmp_path / "out" / "b_mask.zarr")  # as if the run had stopped during b
    code, output = _run(*args)
    assert code == 2 and "or --resume to skip finished images" in output
    code, output = _run(*args, "--resume")
    assert code == 0 and "skipped 1 image(s)" in output and "b.tif" in output and "a.tif" not in output, output
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "out" / "a_mask.zarr"), mode="r")["0"][:], done)
    assert (tmp_path / "out" / "b_mask.zarr").is_dir()


def test_instances_without_an_instance_decoder_says_how_to_get_one(export, big, tmp_path):
    import json
    import shutil

    path, _ = big
    plain = tmp_path / "plain"
    shutil.copytree(export, plain, ignore=shutil.ignore_patterns("ais_decoder*"))
    manifest = json.loads((plain / "manifest.json").read_text())
    del manifest["graphs"]["ais_decoder"]
    (plain / "manifest.json").write_text(json.dumps(manifest))
    for args in (("-o", tmp_path / "o"), ("--tile", "100", "-o", tmp_path / "o.zarr")):
        code, output = _run(plain, path, "--instances", *args, "-q")
        assert code == 2 and len(output.strip().splitlines()) == 1, output
        assert "this export has none: train one with `peftexport finetune --instance-decoder`" in output
        assert "`peftexport demo --instances`" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]
