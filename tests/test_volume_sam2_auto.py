"""Automatic 3D and tracking on a SAM 2 export (issue 33 on every export): each plane segmented with the
``Sam2Session``'s own segment-everything, then the volume room's merge across z / linking over time, as on SAM
exports. Checked against what the test computes itself plane by plane with ``Sam2Session.segment_everything``
(on ``session.encode(plane)``, or its tiles for planes larger than the model input) put through the project's
merge (``merge_instance_segmentation_3d``) and linker (``link_frames``); ``peftexport predict --3d`` (TIFF, and
slab by slab into zarr) and ``--track`` without torch; an embeddings store reopened without an encoder run;
bad input as one ``error:`` line.

The model: a random hiera_t exported at 128 px (tests/volume_helpers.py); the stacks are uint8, which the
export's intensity rule keeps as is, so a plane read alone normalises as the stack does.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tifffile

pytest.importorskip(
    "sam2", reason="sam2 is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)")
pytest.importorskip("torch")
pytest.importorskip("bioimage_cpp", reason="the 3D merge needs bioimage-cpp (pip install '.[volume]')")

from typer.testing import CliRunner  # noqa: E402

from helpers import import_blocker  # noqa: E402
from peft_export import volume as V  # noqa: E402
from peft_export.cli.main import app  # noqa: E402
from peft_export.data.synthetic_volume import synthetic_movie, synthetic_volume  # noqa: E402
from peft_export.runtime import SamSession  # noqa: E402
from peft_export.runtime.sam2_session import Sam2Session  # noqa: E402
from peft_export.volume.merge import merge_instance_segmentation_3d, relabel_volume  # noqa: E402
from peft_export.volume.tracking import link_frames  # noqa: E402
from volume_helpers import same_up_to_renumbering, sam2_image_export  # noqa: E402

pytestmark = pytest.mark.slow  # one SAM 2 export (~15 s, shared), then a few seconds each

# a random model's masks are large and overlapping: keep every candidate NMS does not find a duplicate of
OPTIONS = dict(points_per_side=4, points_per_batch=64, pred_iou_thresh=0.0, stability_score_thresh=0.0,
               box_nms_thresh=0.95, min_mask_region_area=0)
CLI_OPTIONS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0", "--box-nms-thresh",
               "0.95"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return sam2_image_export(tmp_path_factory)


def as_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(image.astype(np.float64) / image.max() * 255).astype(np.uint8)


def per_plane(session, planes, tiled: bool = False) -> np.ndarray:
    """Each plane's segment-everything as the session gives it on that plane alone, ids unique over the stack."""
    out = np.zeros(planes.shape[:3], np.uint32)
    offset = 0
    for z, plane in enumerate(planes):
        if tiled:
            labels, _ = session.tiled(plane).segment_everything(**OPTIONS)
        else:
            labels, _ = session.segment_everything(embedding=session.encode(plane), **OPTIONS)
        labels = relabel_volume(np.asarray(labels))
        out[z] = np.where(labels > 0, labels + offset, 0)
        offset += int(labels.max())
    return out


def test_automatic_3d_equals_merging_each_planes_segment_everything(export, tmp_path):
    session = SamSession(export)
    assert isinstance(session, Sam2Session)
    image, _ = synthetic_volume((5, 64, 80), seed=2, n_objects=(3, 4), radius=(7.0, 12.0))
    stack = as_uint8(image)
    planes = per_plane(session, stack)
    want = merge_instance_segmentation_3d(planes)
    assert planes.max() >= 2 * len(stack) and want.max() < planes.max()  # several per plane, merged across z
    assert any(len(np.flatnonzero((want == k).any(axis=(1, 2)))) > 1 for k in np.unique(want)[1:])
    got, got_planes = V.segment_volume(session, stack, "everything", everything_options=OPTIONS, return_planes=True)
    np.testing.assert_array_equal(got_planes, planes)
    np.testing.assert_array_equal(got, want)
    # "auto" on an export without an instance decoder is segment-everything
    np.testing.assert_array_equal(V.segment_volume(session, stack, everything_options=OPTIONS), want)

    # a zarr store keeps the planes' Sam2Embeddings (with both high-res maps): reopened, no encoder runs
    store = tmp_path / "stack.emb.zarr"
    vol = V.VolumeEmbeddings(session, V.stack_from_array(stack), store=store)
    np.testing.assert_array_equal(V.segment_volume(session, vol, "everything", everything_options=OPTIONS), want)
    assert vol.encoder_runs == len(stack)
    again = V.VolumeEmbeddings(SamSession(export), V.stack_from_array(stack), store=store)
    assert again.n_embedded == len(stack)
    np.testing.assert_array_equal(V.segment_volume(again.session, again, "everything", everything_options=OPTIONS),
                                  want)
    assert again.encoder_runs == 0

    # planes larger than the model input are segmented tile by tile, as a large 2D image is
    big, _ = synthetic_volume((2, 150, 140), seed=4, n_objects=(3, 4), radius=(8.0, 14.0))
    big = as_uint8(big)
    vol = V.VolumeEmbeddings(session, V.stack_from_array(big), keep=False)
    assert len(vol.grid) > 1 and vol.spec.tile == 128
    got = V.segment_volume(session, vol, "everything", everything_options=OPTIONS)
    np.testing.assert_array_equal(got, merge_instance_segmentation_3d(per_plane(session, big, tiled=True)))


def _cli(args: list) -> subprocess.CompletedProcess:
    """``peftexport`` in a fresh process with torch, torchvision, sam2 and onnx blocked."""
    script = import_blocker(("torch", "torchvision", "sam2", "onnx")) + (
        f"sys.argv = ['peftexport'] + {[str(a) for a in args]!r}\nfrom peft_export.cli.main import main\nmain()\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


def stack_tif_and_its_labels(session, path, seed: int) -> np.ndarray:
    """A synthetic 4 x 64 x 80 uint8 stack written to ``path`` (ZYX TIFF); its automatic 3D labels in memory."""
    image, _ = synthetic_volume((4, 64, 80), seed=seed, n_objects=(3, 4), radius=(7.0, 12.0))
    stack = as_uint8(image)
    tifffile.imwrite(path, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    want = V.segment_volume(session, stack, "everything", everything_options=OPTIONS)
    assert want.max() >= 2
    return want


def test_predict_3d_and_track_on_a_sam2_export_without_torch(export, tmp_path):
    import zarr

    session = SamSession(export)
    want = stack_tif_and_its_labels(session, tmp_path / "stack.tif", seed=5)
    for out in (tmp_path / "labels.tif", tmp_path / "labels.zarr"):  # in memory; slab by slab into zarr
        res = _cli(["predict", export, tmp_path / "stack.tif", "--3d", "--everything", *CLI_OPTIONS, "-o", out, "-q"])
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"objects in 3D -> {out}" in res.stdout
        got = tifffile.imread(out) if out.suffix == ".tif" else np.asarray(zarr.open_group(str(out), mode="r")["0"])
        assert same_up_to_renumbering(got, want), out

    movie, _, _ = synthetic_movie(4, 96, seed=3, n_objects=(4, 5))
    movie = as_uint8(movie)
    tifffile.imwrite(tmp_path / "movie.tif", movie, photometric="minisblack", metadata={"axes": "TYX"})
    frames = per_plane(session, movie)
    result = V.track(session, movie, "everything", everything_options=OPTIONS, max_distance=20.0)
    expected = link_frames(frames, max_distance=20.0)
    np.testing.assert_array_equal(result.labels, expected.labels)
    assert result.lineage == expected.lineage and result.n_tracks >= 2
    res = _cli(["predict", export, tmp_path / "movie.tif", "--track", "--everything", *CLI_OPTIONS,
                "--max-distance", "20", "-o", tmp_path / "tracked.tif", "-q"])
    assert res.returncode == 0, res.stderr[-2000:]
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "tracked.tif"), expected.labels)
    ctc = tmp_path / "tracked_ctc"
    assert sorted(p.name for p in ctc.iterdir()) == ["mask000.tif", "mask001.tif", "mask002.tif", "mask003.tif",
                                                     "res_track.txt"]
    rows = [tuple(map(int, line.split())) for line in (ctc / "res_track.txt").read_text().splitlines()]
    assert rows == [tuple(r) for r in expected.lineage]
    np.testing.assert_array_equal(tifffile.imread(ctc / "mask002.tif"), expected.labels[2])
    assert (tmp_path / "tracked_tracks.csv").is_file()


def test_sam2_slabs_on_a_local_cluster_equal_the_in_memory_labels(export, elsewhere_cluster, tmp_path):
    """``--3d -o OUT.zarr --scheduler ADDRESS`` on a SAM 2 export: the slabs run on a real LocalCluster's worker
    (another working directory, the export loaded there) and give the in-memory labels."""
    import zarr

    session = SamSession(export)
    want = stack_tif_and_its_labels(session, tmp_path / "stack.tif", seed=6)
    out = tmp_path / "labels.zarr"
    res = _cli(["predict", export, tmp_path / "stack.tif", "--3d", "--everything", *CLI_OPTIONS, "--scheduler",
                elsewhere_cluster.scheduler_address, "-o", out, "-q"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert same_up_to_renumbering(np.asarray(zarr.open_group(str(out), mode="r")["0"]), want)


def test_bad_input_on_a_sam2_export_is_one_error_line(export, tmp_path):
    stack = as_uint8(synthetic_volume((3, 48, 48), seed=1, n_objects=2, radius=(6.0, 9.0))[0])
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack", metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "plane.tif", stack[0])
    out = tmp_path / "o.tif"
    cases = [
        ("plane.tif", ["--3d"], "plane.tif"),
        ("stack.tif", ["--3d", "--instances"], "has no instance decoder"),
        ("stack.tif", ["--track"], "stack.tif"),
    ]
    for name, args, says in cases:
        res = CliRunner().invoke(app, ["predict", str(export), str(tmp_path / name), *map(str, args), "-o", str(out)])
        assert res.exit_code == 2 and res.output.startswith("error: ") and says in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1, (args, res.output)
        assert not out.exists() and not (tmp_path / "e.zarr").exists()
