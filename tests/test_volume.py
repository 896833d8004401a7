"""Volumes and movies (peft_export.volume): stack I/O, plane embeddings kept in a zarr store (reopened
without an encoder run, refused when made differently), the 3D merge against micro-sam's own
``merge_instance_segmentation_3d``, slab-by-slab 3D into OME-Zarr equal to the in-memory run
(resumable, and on a real LocalCluster), tracking with divisions scored by traccuracy, the CLI and
its bad input, and the room without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from peft_export.cli.main import app
from peft_export.errors import PeftExportError
from peft_export.runtime import SamSession
from peft_export.volume import (
    VolumeEmbeddings,
    link_frames,
    merge_instance_segmentation_3d,
    open_stack,
    segment_object_in_volume,
    segment_volume,
    stack_from_array,
    write_ctc,
)
from helpers import import_blocker
from tiled_helpers import ais_export_dir
from volume_helpers import per_plane_segmentation, same_up_to_renumbering, small_volume


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return ais_export_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def volume_tif(tmp_path_factory):
    image, gt = small_volume()
    path = tmp_path_factory.mktemp("vol") / "stack.tif"
    tifffile.imwrite(path, image, metadata={"axes": "ZYX"})
    return path, image, gt


def _cli(*args):
    res = CliRunner().invoke(app, [*map(str, args)])
    return res.exit_code, res.output


class EncoderCounter:
    """Counts the encoder graph's runs of a session (the real backend runs; only counted)."""

    def __init__(self, session):
        self.n, backend = 0, session._backend
        run = backend.run

        def counted(name, feeds):
            self.n += name == "encoder"
            return run(name, feeds)

        backend.run = counted


# ---- stack I/O --------------------------------------------------------------------------------


def test_stacks_read_tiff_zarr_ome_zarr_and_channels(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 4000, (5, 20, 30), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "zyx.tif", vol, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "packed.tif", vol, compression="zlib", metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "tyx.tif", vol, metadata={"axes": "TYX"})
    czyx = rng.integers(0, 255, (2, 5, 20, 30), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "czyx.tif", czyx, metadata={"axes": "CZYX"})
    g = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w", zarr_format=2)
    g.create_array("0", shape=(2, 5, 20, 30), chunks=(1, 1, 10, 10), dtype="uint8")[:] = czyx
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n} for n in "czyx"], "datasets": [{"path": "0"}]}]
    np.save(tmp_path / "v.npy", vol)

    for name in ("zyx.tif", "packed.tif", "v.npy"):
        s = open_stack(tmp_path / name)
        assert s.shape == (5, 20, 30) and np.array_equal(s[3], vol[3])
        assert np.array_equal(s.plane_view(2)[4:9, 10:25], vol[2, 4:9, 10:25])  # a window of one plane
    assert open_stack(tmp_path / "tyx.tif", kind="t").n_planes == 5
    for name in ("czyx.tif", "ome.zarr"):
        s = open_stack(tmp_path / name, channel=1)
        assert s.shape == (5, 20, 30) and np.array_equal(s[4], czyx[1, 4])
        with pytest.raises(PeftExportError, match="2 channels; choose one with --channel"):
            open_stack(tmp_path / name)
    # a file that calls its time axis Z is read as a movie when told so
    assert np.array_equal(open_stack(tmp_path / "zyx.tif", kind="t", axes="tyx")[1], vol[1])
    rgb = stack_from_array(rng.integers(0, 255, (4, 12, 14, 3), dtype=np.uint8))
    assert rgb.shape == (4, 12, 14, 3) and rgb.rgb


def test_stack_bad_input_is_named(tmp_path):
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((20, 30), np.uint16))
    tifffile.imwrite(tmp_path / "zyx.tif", np.zeros((3, 20, 30), np.uint16), metadata={"axes": "ZYX"},
                     photometric="minisblack")
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as w:  # pages of two sizes
        w.write(np.zeros((20, 30), np.uint16))
        w.write(np.zeros((25, 30), np.uint16))
    cases = [(("flat.tif",), {}, "is a 2D image, not a volume"),
             (("zyx.tif",), {"kind": "t"}, "has no time axis"),
             (("mixed.tif",), {}, "have different sizes"),
             (("zyx.tif",), {"channel": 1}, "no channel axis"),
             (("zyx.tif",), {"axes": "zyxq"}, "do not describe"),
             (("missing.tif",), {}, "no such file")]
    for (name,), kw, says in cases:
        with pytest.raises(PeftExportError, match=says):
            open_stack(tmp_path / name, **kw)


# ---- the 3D merge against micro-sam ----------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"min_z_extent": 3}, {"gap_closing": 2}, {"gap_closing": 1, "min_z_extent": 2}])
def test_merge_equals_micro_sam(options):
    mds = pytest.importorskip("micro_sam.multi_dimensional_segmentation",
                              reason="micro-sam (its multi_dimensional_segmentation) is not installed")
    from peft_export.data.synthetic_volume import synthetic_volume

    for seed in (0, 1):
        _, gt = synthetic_volume((16, 128, 128), seed=seed, n_objects=(14, 16), radius=(6.0, 12.0))
        seg = per_plane_segmentation(gt, seed=seed)
        # micro-sam 1.8.14 restarts its ids after an empty plane among the first / last gap_closing ones
        # (ids then collide); the cases compared here have objects on every plane.
        assert all(seg[z].any() for z in range(len(seg)))
        ours = merge_instance_segmentation_3d(seg, **options)
        ref = mds.merge_instance_segmentation_3d(seg, verbose=False, **options)
        assert same_up_to_renumbering(ours, ref), (seed, options)
        assert ours.max() == len(np.unique(ref)) - 1 and ours.max() < len(np.unique(seg)) - 1  # it merged


# ---- embeddings: stored, reopened without an encoder, refused when made differently -----------


@pytest.mark.slow
def test_embeddings_store_reopens_without_encoder_and_refuses_a_mismatch(export, volume_tif, tmp_path):
    path, image, _ = volume_tif
    session = SamSession(export)
    counter = EncoderCounter(session)
    store = tmp_path / "emb.zarr"
    first = VolumeEmbeddings(session, open_stack(path), store=store)
    assert first.compute() == len(image) and counter.n == len(image)
    ref = segment_volume(session, first)
    memory = VolumeEmbeddings(session, open_stack(path))
    np.testing.assert_array_equal(memory.embedding(4).embedding, first.embedding(4).embedding)
    assert memory.embedding(4).input_size == first.embedding(4).input_size

    counter.n = 0
    again = VolumeEmbeddings(session, open_stack(path), store=store)
    assert again.n_embedded == len(image)
    np.testing.assert_array_equal(segment_volume(session, again), ref)
    mask, _ = segment_object_in_volume(again, {5: image[5] > np.percentile(image[5], 95)}, iou_threshold=0.0)
    assert counter.n == 0 and again.encoder_runs == 0 and mask.any()

    with pytest.raises(PeftExportError, match=r"made differently \(tiles"):
        VolumeEmbeddings(session, open_stack(path), store=store, tile=64)
    other = tmp_path / "other_export"
    shutil.copytree(export, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["graphs"]["encoder"]["fp32"]["sha256"] = "0" * 64  # another model's encoder
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PeftExportError, match="encoder: encoder_sha256"):
        VolumeEmbeddings(SamSession(other), open_stack(path), store=store)
    flipped = tmp_path / "flipped.tif"
    tifffile.imwrite(flipped, image[::-1, ::-1])
    with pytest.raises(PeftExportError, match="made differently"):
        VolumeEmbeddings(session, open_stack(flipped), store=store)


def test_embedding_in_the_background_reports_progress_and_cancels(export, volume_tif):
    path, image, _ = volume_tif
    vol = VolumeEmbeddings(SamSession(export), open_stack(path))
    seen, gate = [], threading.Event()

    def progress(done, total):
        seen.append((done, total))
        if done == 3:
            gate.set()

    job = vol.start(progress)
    gate.wait(60)
    job.cancel()
    job.wait(60)
    assert job.done and 3 <= vol.n_embedded < len(image) and seen[0] == (1, len(image))
    left = len(image) - vol.n_embedded
    assert vol.compute() == left  # only the planes the cancelled job left
    assert vol.n_embedded == len(image) and vol.encoder_runs == len(image)  # each plane encoded once


# ---- automatic 3D: in memory, slab by slab, resumed, on a LocalCluster --------------------------


@pytest.mark.slow
def test_slabs_equal_in_memory_and_resume(export, volume_tif, tmp_path):
    from peft_export.predict.large import _marker
    from peft_export.predict.large_state import finish_steps
    from peft_export.volume.outputs import finish_volume_labels
    from peft_export.volume.slabs import _record, plan_volume, run_volume, stages

    path, _, _ = volume_tif
    session = SamSession(export)
    merge = {"gap_closing": 1, "min_z_extent": 2}
    ref = segment_volume(session, open_stack(path), **merge)
    assert ref.max() > 3
    out = tmp_path / "labels.zarr"
    job = plan_volume(export, path, out, merge=merge, slab=3)
    for name, step, n in stages(job)[:2]:  # a run stopped after the planes and part of the closing
        for k in range(n if name == "planes" else 1):
            step(job, k)
    assert not out.exists() and _marker(job, "planes_0").is_file()
    again = plan_volume(export, path, out, merge=merge, slab=3)
    assert again["resumed"] and not again["finished"] and again["run_id"] == job["run_id"]
    for _, step, n in stages(again):
        for k in range(n) if n else [None]:
            step(again) if k is None else step(again, k)
    for end_step in finish_steps(again, lambda: _record(again), finish_volume_labels)[:5]:
        end_step()  # stopped in the end, just after OUT.zarr.partial became OUT.zarr
    last = plan_volume(export, path, out, merge=merge, slab=3)
    assert last["resumed"] and last["finished"] and stages(last) == []
    record = run_volume(last)  # only the clean-up is left
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(group["0"][:], ref)
    assert record["n_objects"] == ref.max() and [a["name"] for a in group.attrs["multiscales"][0]["axes"]] == list("zyx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.zarr"]
    assert sorted(p.name for p in out.iterdir()) == [".zattrs", ".zgroup", "0"]
    plan_volume(export, path, tmp_path / "x.zarr", merge=merge, slab=3)
    with pytest.raises(PeftExportError, match="other settings"):  # a stopped run is resumed only as it was
        plan_volume(export, path, tmp_path / "x.zarr", merge={}, slab=3)


@pytest.mark.slow
def test_slabs_on_a_cluster_from_relative_paths_and_rerun_with_other_options(export, volume_tif, elsewhere_cluster,
                                                                             tmp_path, monkeypatch):
    """The client in one directory, the worker in another: relative paths as typed reach the
    worker; a rerun into the same output with another --min-z-extent on the same live cluster
    uses nothing the worker kept from the first run."""
    path, _, _ = volume_tif
    session = SamSession(export)
    embedded = VolumeEmbeddings(session, open_stack(path))  # in memory: both references, one encoder pass
    ref, ref_long = segment_volume(session, embedded), segment_volume(session, embedded, min_z_extent=6)
    assert 0 < ref_long.max() < ref.max()
    shutil.copy(path, tmp_path / "stack.tif")
    (tmp_path / "model").symlink_to(export)
    monkeypatch.chdir(tmp_path)
    at = ("--scheduler", elsewhere_cluster.scheduler_address)
    code, output = _cli("predict", "model", "stack.tif", "--instances", "--3d", *at, "-o", "l.zarr", "-q")
    assert code == 0, output
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "l.zarr"), mode="r")["0"][:], ref)
    code, output = _cli("predict", "model", "stack.tif", "--instances", "--3d", "--min-z-extent", "6", "--overwrite",
                        *at, "-o", "l.zarr", "-q")
    assert code == 0, output
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "l.zarr"), mode="r")["0"][:], ref_long)


@pytest.mark.slow
def test_a_stopped_volume_run_resumes_on_a_cluster_without_recomputing_slabs(export, volume_tif, elsewhere_cluster,
                                                                             tmp_path):
    from dask.distributed import Client

    from peft_export.distributed import run_jobs
    from peft_export.predict.large import _marker
    from peft_export.volume.slabs import finish_volume, plan_volume, read_volume_corner, stages

    path, _, _ = volume_tif
    out = tmp_path / "r.zarr"
    job = plan_volume(export, path, out, slab=3)
    _, plane_step, n = stages(job)[0]
    assert n == 4
    for k in range(2):  # the run stops after half the slabs
        plane_step(job, k)
    done = {k: _marker(job, f"planes_{k}").stat().st_mtime_ns for k in range(2)}
    resumed = plan_volume(export, path, out, slab=3)
    assert resumed["resumed"] and resumed["run_id"] == job["run_id"]
    seen = {}

    def finish(job):  # the markers as the steps left them, before the end removes them
        seen.update({k: _marker(job, f"planes_{k}").stat().st_mtime_ns for k in range(n)})
        return finish_volume(job)

    with Client(elsewhere_cluster) as client:
        record = run_jobs(client, [resumed], stages=stages, finish=finish, read_input=read_volume_corner)[0]
    assert len(seen) == n and {k: seen[k] for k in done} == done  # the finished slabs were not redone
    ref = segment_volume(SamSession(export), open_stack(path))
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][:], ref)
    assert record["n_objects"] == ref.max()


@pytest.mark.slow
def test_a_stopped_volume_run_whose_input_changed_is_refused(export, volume_tif, tmp_path):
    from peft_export.volume.slabs import plan_volume, stages
    from tiled_helpers import reexport_other_decoder

    path, image, _ = volume_tif
    model, vol, out = tmp_path / "export", tmp_path / "stack.tif", tmp_path / "o.zarr"
    shutil.copytree(export, model)
    shutil.copy(path, vol)
    job = plan_volume(model, vol, out, slab=3)
    stages(job)[0][1](job, 0)  # one slab done, then the run stops
    tifffile.imwrite(vol, image[::-1], metadata={"axes": "ZYX"})  # written over: same name, shape and dtype
    with pytest.raises(PeftExportError, match=r"a stopped run whose volume .*stack.tif has changed since"):
        plan_volume(model, vol, out, slab=3)
    job = plan_volume(model, vol, out, slab=3, overwrite=True)
    assert not job["resumed"]
    stages(job)[0][1](job, 0)
    reexport_other_decoder(model)  # another model exported into the same folder
    code, output = _cli("predict", model, vol, "--instances", "--3d", "-o", out, "-q")
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "a stopped run of another export (the manifest.json of" in output, output
    assert not out.exists() and (tmp_path / "o.zarr.partial" / "run.json").is_file()  # nothing lost


@pytest.mark.slow
def test_a_worker_that_cannot_read_the_volume_is_named_and_nothing_is_left(export, volume_tif, elsewhere_cluster,
                                                                          tmp_path):
    from dask.distributed import Client

    from peft_export.distributed import run_jobs
    from peft_export.volume.slabs import finish_volume, plan_volume, read_volume_corner, stages

    vol = tmp_path / "stack.tif"
    shutil.copy(volume_tif[0], vol)
    job = plan_volume(export, vol, tmp_path / "o.zarr", slab=3)
    vol.rename(tmp_path / "moved.tif")  # gone from where the job says, as from a folder workers do not see
    with Client(elsewhere_cluster) as client:
        address = next(iter(client.scheduler_info()["workers"]))
        with pytest.raises(PeftExportError) as err:
            run_jobs(client, [job], stages=stages, finish=finish_volume, read_input=read_volume_corner)
    assert str(err.value).startswith(f"worker {address}: cannot read the volume {vol} (no such file); a cluster's "
                                     "workers need the export, the volume and the output"), str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved.tif"]  # the run laid the partial out: removed


@pytest.mark.slow
def test_ctrl_c_in_a_volume_run_says_where_the_partial_is_and_the_rerun_resumes(export, volume_tif, tmp_path):
    from tiled_helpers import interrupt_predict

    path, _, _ = volume_tif
    out = tmp_path / "o.zarr"
    args = [str(export), str(path), "--instances", "--3d", "-o", str(out), "-q"]
    code, err = interrupt_predict(args, tmp_path / "o.zarr.partial", "planes")
    assert code == 130, err
    assert err.strip().splitlines()[-1] == (f"interrupted: the finished steps are kept in {out}.partial; run the same "
                                            "command again to resume"), err
    code, output = _cli("predict", *args)
    assert code == 0, output
    first = output.splitlines()[0]
    assert first.startswith(f"{path}: resuming the stopped run in {out}.partial (") and "steps done)" in first, output
    ref = segment_volume(SamSession(export), open_stack(path))
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")["0"][:], ref)
    code, output = _cli("predict", *args)  # finished: refused as every existing output is, or skipped
    assert code == 2 and "already exists (pass --overwrite" in output, output
    code, output = _cli("predict", *args, "--resume")
    assert code == 0 and output.strip() == f"{path}: skipped, {out} is complete (--resume)", output


# ---- tracking --------------------------------------------------------------------------------


@pytest.mark.slow
def test_tracking_a_perfectly_segmented_movie_scores_tra_1(tmp_path):
    pytest.importorskip("laptrack", reason="laptrack is not installed")
    pytest.importorskip("traccuracy", reason="traccuracy is not installed")
    from traccuracy.loaders import load_ctc_data

    from peft_export.data.synthetic_volume import synthetic_movie
    from peft_export.evaluation.volume import tracking_scores

    _, labels, lineage = synthetic_movie(12, 192, seed=4, divisions=3)
    assert sum(1 for *_, p in lineage if p) >= 4  # at least two divisions in the ground truth
    rng = np.random.default_rng(0)
    frames = np.zeros_like(labels)
    for t, frame in enumerate(labels):  # per-frame ids in a random order: the tracker must find the links
        ids = np.unique(frame)[1:]
        lut = np.zeros(frame.max() + 1, np.int32)
        lut[ids] = rng.permutation(len(ids)) + 1
        frames[t] = lut[frame]
    result = link_frames(frames)
    assert result.n_divisions == len({p for *_, p in lineage if p})
    scores = tracking_scores(result.labels, result.lineage, labels, lineage)  # what evaluate --track reports
    assert scores["TRA"] >= 0.99 and scores["DET"] == 1.0 and scores["division_f1"] == 1.0
    write_ctc(result, tmp_path / "res")
    loaded = load_ctc_data(str(tmp_path / "res"), run_checks=True)  # the CTC format's own checks
    assert loaded.graph.number_of_nodes() == sum(len(np.unique(f)) - 1 for f in labels)
    assert result.tracks.shape[1] == 4 and set(result.graph) == {k for k, _, _, p in result.lineage if p}


# ---- the command line ------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_3d_propagate_and_track(export, volume_tif, tmp_path):
    from peft_export.data.synthetic_volume import synthetic_movie

    path, image, _ = volume_tif
    code, output = _cli("predict", export, path, "--3d", "-o", tmp_path / "a.tif", "-q")
    assert code == 0 and "objects in 3D" in output, output
    labels = tifffile.imread(tmp_path / "a.tif")
    np.testing.assert_array_equal(labels, segment_volume(SamSession(export), open_stack(path)))
    code, output = _cli("predict", export, path, "--propagate", "--points", "5,48,48", "--iou-threshold", "0",
                        "--embeddings", tmp_path / "e.zarr", "-o", tmp_path / "obj.tif", "-q")
    assert code == 0, output
    obj = tifffile.imread(tmp_path / "obj.tif")
    assert obj.shape == image.shape and obj[5].any() and obj.any(axis=(1, 2)).all()  # threshold 0: every plane
    # The object's ends annotated and --stop-lower/--stop-upper: nothing outside them, even at threshold 0
    code, output = _cli("predict", export, path, "--propagate", "--points", "3,48,48;6,48,48", "--iou-threshold", "0",
                        "--stop-lower", "--stop-upper", "--embeddings", tmp_path / "e.zarr", "-o", tmp_path / "ends.tif",
                        "-q")
    assert code == 0 and "annotated 3, 6" in output, output
    planes = np.flatnonzero(tifffile.imread(tmp_path / "ends.tif").any(axis=(1, 2)))
    assert planes.min() >= 3 and planes.max() <= 6 and {3, 6} <= set(planes), planes
    movie, _, _ = synthetic_movie(5, 96, seed=1, n_objects=(3, 4), radius=(6.0, 9.0), divisions=1)
    tifffile.imwrite(tmp_path / "movie.tif", movie, metadata={"axes": "TYX"})
    code, output = _cli("predict", export, tmp_path / "movie.tif", "--track", "-o", tmp_path / "t.zarr", "-q")
    assert code == 0 and "tracks" in output, output
    assert (tmp_path / "t_ctc" / "res_track.txt").is_file() and (tmp_path / "t_tracks.csv").is_file()
    axes = zarr.open_group(str(tmp_path / "t.zarr"), mode="r").attrs["multiscales"][0]["axes"]
    assert axes[0] == {"name": "t", "type": "time"}


def test_cli_bad_input_one_line_exit_2_nothing_written(export, volume_tif, tmp_path):
    path, _, _ = volume_tif
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((40, 50), np.uint16))
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as w:
        w.write(np.zeros((40, 50), np.uint16))
        w.write(np.zeros((41, 50), np.uint16))
    out = tmp_path / "o.zarr"
    cases = [
        ((tmp_path / "flat.tif", "--3d"), "is a 2D image, not a volume"),
        ((path, "--track"), "has no time axis"),
        ((tmp_path / "mixed.tif", "--3d"), "have different sizes"),
        ((path, "--propagate", "--points", "50,10,10"), "plane 50 lies outside the volume"),
        ((path, "--propagate", "--box", "2,10,10,500,20"), "is not a box inside the volume"),
        ((path, "--3d", "--points", "1,2,3", "--track"), "a stack is a volume or a movie"),
        ((path, "--propagate"), "give the object with --points"),
        ((path, "--3d", "--stop-upper"), "--stop-lower/--stop-upper: options of --propagate"),
        ((path, "--3d", "--projection", "blob", "--points", "2,20,20", "--propagate"), "projection: unknown"),
    ]
    cases += [((path, "--3d", "-o", "s3://bucket/o.zarr"), "URL outputs are not written"),  # as on the large path
              ((path, "--3d", "-o", tmp_path / "o.png"), "name it o.zarr or o.tif"),
              ((path, "--3d", "--workers", "1", "-o", tmp_path / "o.tif"), "run automatic --3d into OUT.zarr"),
              ((path, "--3d", "--workers", "1", "--scheduler", "tcp://127.0.0.1:9"), "--workers and --scheduler: give one"),
              ((path, "--3d", "--workers", "0"), "--workers: must be >= 1, got 0"),
              # upper-case .ZARR is a zarr store too: the slab path (a cluster), not "into OUT.zarr"
              ((path, "--3d", "--workers", "0", "-o", tmp_path / "o.ZARR"), "--workers: must be >= 1, got 0")]
    # 2D-only options are refused on stacks, never ignored; --device reaches the stack's session
    cases += [((path, "--3d", "--overlay"), "--overlay: not written for stacks"),
              ((path, "--propagate", "--points", "2,20,20", "--all-masks"), "--all-masks: not written for stacks"),
              ((path, "--3d", "--single-mask"), "--single-mask: stacks choose each plane's mask"),
              ((path, "--3d", "--device", "cuda"), "CUDA"),
              ((path, "--3d", "--device", "cuda", "-o", tmp_path / "o.tif"), "CUDA"),
              ((path, "--propagate", "--points", "2,20,20", "--device", "cuda"), "CUDA")]
    for args, says in cases:
        code, output = _cli("predict", export, *args, *(("-o", out) if "-o" not in args else ()))
        assert code == 2 and says in output and len(output.strip().splitlines()) == 1, (args, output)
        assert not out.exists() and not (tmp_path / "o.zarr.partial").exists() and not Path("s3:").exists()
        assert not list(tmp_path.glob("o_*")) and not list(tmp_path.glob(".o*")) and not list(tmp_path.glob("o.*"))


# ---- without torch ---------------------------------------------------------------------------


@pytest.mark.slow
def test_volume_room_runs_with_torch_blocked(export, volume_tif, tmp_path):
    path, _, _ = volume_tif
    code = import_blocker(("torch", "torchvision", "segment_anything", "onnx")) + f"""
import numpy as np
from peft_export.runtime import SamSession
from peft_export.volume import VolumeEmbeddings, open_stack, segment_object_in_volume, segment_volume, link_frames
s = SamSession({str(export)!r})
vol = VolumeEmbeddings(s, open_stack({str(path)!r}), store={str(tmp_path / 'e.zarr')!r})
labels = segment_volume(s, vol)
mask, span = segment_object_in_volume(vol, {{4: labels[4] == labels[4].max()}}, projection="box")
tracks = link_frames(labels)
print(int(labels.max()), int(mask.sum()), tracks.n_tracks, 'torch' in sys.modules)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    n, voxels, n_tracks, torch_loaded = res.stdout.split()
    assert int(n) > 3 and int(voxels) > 0 and int(n_tracks) > 0 and torch_loaded == "False"


def test_mask_prompt_resize_matches_torch_antialiased_bilinear():
    """``resize_float`` (the mask prompt's resize) against torch's interpolate(antialias=True), down and up."""
    import torch
    import torch.nn.functional as F

    from peft_export.runtime.preprocess import resize_float

    rng = np.random.default_rng(3)
    for h, w, out in [(300, 420, (183, 256)), (96, 120, (205, 256)), (700, 500, (256, 183)), (64, 64, (256, 256))]:
        image = (rng.random((h, w)) > 0.7).astype(np.float32)
        ref = F.interpolate(torch.from_numpy(image)[None, None], out, mode="bilinear", align_corners=False,
                            antialias=True)[0, 0].numpy()
        got = resize_float(image, out)
        assert got.shape == out and np.abs(got - ref).max() < 1e-4  # float32 sums in another order
        yy, xx = np.mgrid[0:h, 0:w]
        blobs = np.zeros((h, w), np.float32)
        for cy, cx, r in rng.uniform(0, 1, (4, 3)) * [h, w, min(h, w) / 4]:
            blobs[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
        ref = F.interpolate(torch.from_numpy(blobs)[None, None], out, mode="bilinear", align_corners=False,
                            antialias=True)[0, 0].numpy()
        np.testing.assert_array_equal(resize_float(blobs, out) > 0.5, ref > 0.5)  # the binary mask prompt
