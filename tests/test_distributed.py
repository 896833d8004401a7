"""Large images end to end: zarr / OME-Zarr / TIFF in, OME-Zarr labels out, resumable steps, and
the same steps on a real dask.distributed LocalCluster (2 worker processes on loopback)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr
from typer.testing import CliRunner

from peft_export.cli.main import app
from peft_export.errors import PeftExportError
from peft_export.predict.arrays import open_image_array
from peft_export.predict.large import _marker, finish_large, plan_large, run_large, stages
from peft_export.runtime import SamSession
from helpers import import_blocker
from tiled_helpers import ais_export_dir, nuclei_mosaic

pytestmark = pytest.mark.slow  # a tiny export, a LocalCluster: about a minute in all


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return ais_export_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def image_zarr(tmp_path_factory):
    image, _ = nuclei_mosaic(300, 270, seed=5)
    path = tmp_path_factory.mktemp("zin") / "slide.zarr"  # OME-Zarr image: (c, y, x) level "0"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", shape=(1, *image.shape), chunks=(1, 100, 100), dtype=image.dtype)[:] = image[None]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n} for n in "cyx"],
                                   "datasets": [{"path": "0"}]}]
    return path, image


@pytest.fixture(scope="module")
def labels_96(export, image_zarr, tmp_path_factory):
    """The labels of one in-process run on the slide (tiles of 96 px, halo 24, watershed blocks of 96 px):
    what a resumed run and a LocalCluster run of the same job must give (each test made this run itself)."""
    path, _ = image_zarr
    out = tmp_path_factory.mktemp("ref96") / "one.zarr"
    run_large(plan_large(export, path, out, tile=96, halo=24, block=96))
    return _labels(out)


def _run(*args):
    res = CliRunner().invoke(app, ["predict", *map(str, args)])
    return res.exit_code, res.output


def _labels(path):
    return zarr.open_group(str(path), mode="r")["0"][:]


def test_reading_large_formats(tmp_path, image_zarr):
    path, image = image_zarr
    arr = open_image_array(path)
    assert arr.shape == image.shape and np.array_equal(arr[10:50, 20:90], image[10:50, 20:90])
    tifffile.imwrite(tmp_path / "plain.tif", image)
    tifffile.imwrite(tmp_path / "packed.tif", image, compression="zlib", tile=(64, 64))
    plain, packed = open_image_array(tmp_path / "plain.tif"), open_image_array(tmp_path / "packed.tif")
    assert isinstance(plain, np.memmap)  # uncompressed: memory-mapped, nothing read yet
    assert np.array_equal(plain[5:70, 3:9], image[5:70, 3:9]) and np.array_equal(packed[100:200, 50:60],
                                                                                   image[100:200, 50:60])
    rgb = zarr.open_array(str(tmp_path / "rgb.zarr"), mode="w", shape=(3, 40, 50), dtype="uint8", zarr_format=2)
    rgb[:] = np.arange(3 * 40 * 50, dtype=np.uint8).reshape(3, 40, 50)
    view = open_image_array(tmp_path / "rgb.zarr")
    assert view.shape == (40, 50, 3) and np.array_equal(view[2:4, 5:7], np.moveaxis(rgb[:, 2:4, 5:7], 0, -1))


def test_npy_is_memory_mapped_and_png_is_decoded_once_or_refused_with_the_zarr_command(tmp_path):
    import shlex
    import subprocess

    from PIL import Image

    from peft_export.predict import arrays

    image, _ = nuclei_mosaic(120, 100, seed=2, uint8=True)
    np.save(tmp_path / "a.npy", image)
    npy = open_image_array(tmp_path / "a.npy")
    assert isinstance(npy, arrays.NpyWindows) and np.array_equal(npy[10:20, 5:9], image[10:20, 5:9])
    Image.fromarray(image).save(tmp_path / "a.png")
    png = open_image_array(tmp_path / "a.png")
    assert open_image_array(tmp_path / "a.png") is png and np.array_equal(png, image)  # decoded once per process
    side = int(arrays.MAX_DECODED_PIXELS ** 0.5) + 1
    Image.new("L", (side, side)).save(tmp_path / "huge.png")  # over the limit: refused from its header
    with pytest.raises(PeftExportError, match=rf"huge.png: {side}x{side} px is too large to decode whole") as err:
        open_image_array(tmp_path / "huge.png")
    # the command the message shows converts a PNG into a zarr the large-image path reads tile by tile
    command = str(err.value).split("tile by tile: ")[1].replace(str(tmp_path / "huge"), str(tmp_path / "a"))
    subprocess.run(shlex.split(command), check=True, cwd=tmp_path)
    converted = open_image_array(tmp_path / "a.zarr")
    assert converted.shape == image.shape and np.array_equal(converted[:], image)


def test_cli_tiled_instances_zarr_in_ome_zarr_out(export, image_zarr, tmp_path):
    path, image = image_zarr
    out = tmp_path / "labels.zarr"
    code, output = _run(export, path, "--instances", "--tile", "96", "--halo", "24", "-o", out, "-q")
    assert code == 0, output
    assert "42 tile(s) of 96 px" in output and not (tmp_path / "labels.zarr.partial").exists()
    group = zarr.open_group(str(out), mode="r")
    ms = group.attrs["multiscales"][0]
    assert ms["datasets"][0]["path"] == "0" and [a["name"] for a in ms["axes"]] == ["y", "x"]
    assert "image-label" in group.attrs and sorted(p.name for p in out.iterdir()) == [".zattrs", ".zgroup", "0"]
    got = group["0"][:]
    ref, _ = SamSession(export).tiled(image, tile=96, halo=24).segment_instances(block=1008, halo=64)
    assert got.dtype == np.uint32 and ref.max() > 5
    np.testing.assert_array_equal(got, ref)
    assert group.attrs["peftexport"]["n_objects"] == ref.max()


def test_stopped_run_resumes_without_redoing_finished_tiles(export, image_zarr, labels_96, tmp_path):
    path, _ = image_zarr
    out = tmp_path / "r.zarr"
    job = plan_large(export, path, out, tile=96, halo=24, block=96)
    _, tile_step, n = stages(job)[0]
    for k in range(n // 2):  # the run stops after half the tiles
        tile_step(job, k)
    done = {k: _marker(job, f"tile_{k}").stat().st_mtime_ns for k in range(n // 2)}
    assert not out.exists() and (tmp_path / "r.zarr.partial" / "run.json").is_file()
    code, output = _run(export, path, "--instances", "--tile", "96", "--halo", "24", "-o", out, "-q")
    assert code == 2 and "other settings" in output  # another block size: not the same run
    job2 = plan_large(export, path, out, tile=96, halo=24, block=96)
    assert job2["resumed"]
    for _, step, m in stages(job2):
        for k in range(m) if m else [None]:
            step(job2) if k is None else step(job2, k)
    assert {k: _marker(job2, f"tile_{k}").stat().st_mtime_ns for k in range(n // 2)} == done  # not redone
    finish_large(job2)
    np.testing.assert_array_equal(_labels(out), labels_96)  # what a fresh run gives
    assert not (tmp_path / "r.zarr.partial").exists()
    # a rerun skips a finished tile: its marker (written after its data) is not rewritten
    job3 = plan_large(export, path, tmp_path / "s.zarr", tile=96, halo=24, block=96)
    tile_step(job3, 0)
    t0 = _marker(job3, "tile_0").stat().st_mtime_ns
    job3 = plan_large(export, path, tmp_path / "s.zarr", tile=96, halo=24, block=96)
    tile_step(job3, 0)
    assert _marker(job3, "tile_0").stat().st_mtime_ns == t0


def test_local_cluster_gives_the_same_labels_and_loads_the_export_once_per_worker(export, image_zarr, labels_96,
                                                                                  tmp_path):
    from peft_export.distributed import close, connect, run_jobs

    path, _ = image_zarr
    client = connect(workers=2)
    try:
        assert len(client.scheduler_info()["workers"]) == 2
        job = plan_large(export, path, tmp_path / "two.zarr", tile=96, halo=24, block=96)
        records = run_jobs(client, [job])
        per_worker = client.run(lambda: len(__import__("peft_export.predict.large", fromlist=["_"])._SESSIONS))
        assert sorted(per_worker.values()) == [1, 1]  # each worker opened the export once, for all its tiles
    finally:
        close(client)
    a, b = labels_96, _labels(tmp_path / "two.zarr")  # the in-process run's (16 watershed blocks)
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))  # the same labels up to renumbering
    assert records[0]["n_objects"] == a.max() > 5


def test_cli_folder_over_two_workers(export, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    images = {}
    for i, (h, w) in enumerate([(200, 150), (120, 100)]):
        images[f"img{i}"] = nuclei_mosaic(h, w, seed=20 + i)[0]
        tifffile.imwrite(folder / f"img{i}.tif", images[f"img{i}"])
    code, output = _run(export, folder, "--instances", "--tile", "128", "--workers", "2", "-o", tmp_path / "out", "-q")
    assert code == 0, output
    assert "wrote 2 result(s)" in output
    session = SamSession(export)
    for stem, image in images.items():
        ref, _ = session.tiled(image, tile=128, halo=32).segment_instances(block=1024, halo=64)
        np.testing.assert_array_equal(_labels(tmp_path / "out" / f"{stem}_labels.zarr"), ref)
    small = session.segment_instances(image=images["img1"])[0]  # smaller than a tile: exactly as untiled
    np.testing.assert_array_equal(_labels(tmp_path / "out" / "img1_labels.zarr"), small)


def test_bad_input_is_one_line_and_leaves_nothing(export, image_zarr, tmp_path):
    path, _ = image_zarr
    notimage = tmp_path / "table.zarr"
    g = zarr.open_group(str(notimage), mode="w", zarr_format=2)
    g.create_array("a", shape=(4,), dtype="int32")
    g.create_array("b", shape=(4,), dtype="int32")
    cases = [
        ((notimage, "--instances"), "not an image"),
        ((path, "--instances", "--tile", "96", "--halo", "48"), "--halo: 48 px must be >= 0 and less than half"),
        ((path, "--instances", "--tile", "256"), "--tile: 256 px is larger than the model input (128 px)"),
        ((path, "--instances", "--scheduler", "tcp://127.0.0.1:9"), "--scheduler tcp://127.0.0.1:9: no Dask scheduler"),
        ((path, "--instances", "--everything", "--tile", "96"), "--instances: cannot be combined with"),
    ]
    for args, says in cases:
        out = tmp_path / "o.zarr"
        code, output = _run(export, *args, "-o", out, "-q")
        assert code == 2 and says in output and len(output.strip().splitlines()) == 1, (args, output)
        assert not out.exists() and not (tmp_path / "o.zarr.partial").exists()
    with pytest.raises(PeftExportError, match="written as OME-Zarr, not .tif; name the output labels.zarr"):
        plan_large(export, path, tmp_path / "labels.tif")


def test_tiles_and_large_jobs_run_with_torch_blocked(export, image_zarr, tmp_path):
    import subprocess
    import sys

    path, _ = image_zarr
    code = import_blocker(("torch", "torchvision", "segment_anything", "onnx")) + f"""
from peft_export.predict.large import plan_large, run_large
import peft_export.distributed
rec = run_large(plan_large({str(export)!r}, {str(path)!r}, {str(tmp_path / 'tf.zarr')!r}, tile=96, halo=24))
print(rec["n_objects"])
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) > 5


def test_cli_on_an_existing_scheduler_leaves_it_running(export, tmp_path):
    from dask.distributed import Client

    from peft_export.distributed.cluster import close_local_cluster, local_cluster

    image = nuclei_mosaic(150, 140, seed=30)[0]
    tifffile.imwrite(tmp_path / "a.tif", image)
    cluster = local_cluster(1)  # the user's cluster (started the way that leaves this process's environment)
    try:
        code, output = _run(export, tmp_path / "a.tif", "--instances", "--tile", "128", "--scheduler",
                            cluster.scheduler_address, "-o", tmp_path / "a_labels.zarr", "-q")
        assert code == 0, output
        with Client(cluster.scheduler_address) as client:  # the cluster is the user's: still up
            assert len(client.scheduler_info()["workers"]) == 1
    finally:
        close_local_cluster(cluster)
    ref, _ = SamSession(export).tiled(image, tile=128, halo=32).segment_instances(block=1024, halo=64)
    np.testing.assert_array_equal(_labels(tmp_path / "a_labels.zarr"), ref)


def test_a_worker_killed_mid_job_is_replaced_and_the_labels_are_right(export, image_zarr, tmp_path, monkeypatch):
    """A worker process dies (SIGKILL) while the tiles run: Dask's nanny starts a new one, the lost
    tasks run again, and the labels equal the in-process run's up to renumbering. The nanny's worker
    variables (OMP_NUM_THREADS=1) reach the workers, new ones too, but never stay in this process."""
    import os
    import signal
    import threading
    import time

    from peft_export.distributed import close, connect, run_jobs

    path, _ = image_zarr
    opts = dict(tile=64, halo=16, block=64)  # 90 tiles: the job is still running when the kill comes
    run_large(plan_large(export, path, tmp_path / "one.zarr", **opts))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    client = connect(workers=2)
    try:
        assert "OMP_NUM_THREADS" not in os.environ
        pids = client.run(os.getpid)
        job = plan_large(export, path, tmp_path / "two.zarr", **opts)
        n_tiles = stages(job)[0][2]
        done_dir = _marker(job, "x").parent
        at_kill = []

        def kill_one_worker():  # after the first tiles are done, in the middle of the tile stage
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(done_dir.glob("tile_*")):
                time.sleep(0.01)
            at_kill.append(len(list(done_dir.glob("tile_*"))))
            os.kill(next(iter(pids.values())), signal.SIGKILL)

        killer = threading.Thread(target=kill_one_worker)
        killer.start()
        records = run_jobs(client, [job])
        killer.join()
        after = client.run(os.getpid)
        threads_var = set(client.run(lambda: os.environ.get("OMP_NUM_THREADS")).values())
    finally:
        close(client)
    assert threads_var == {"1"} and "OMP_NUM_THREADS" not in os.environ
    assert 0 < at_kill[0] < n_tiles  # the worker died mid-job
    assert len(after) == 2 and set(after.values()) != set(pids.values())  # a new worker replaced it
    a, b = _labels(tmp_path / "one.zarr"), _labels(tmp_path / "two.zarr")
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))  # the same labels up to renumbering
    assert records[0]["n_objects"] == a.max() > 5 and not (tmp_path / "two.zarr.partial").exists()


# ---- a cluster that outlives runs, workers elsewhere (issue 36, points 1, 2 and 19) -------------


@pytest.fixture(scope="module")
def small_tif(tmp_path_factory):
    image = nuclei_mosaic(150, 140, seed=30)[0]  # tiles of 96 px with a 24-px halo: 4 x 3 tiles
    path = tmp_path_factory.mktemp("small") / "a.tif"
    tifffile.imwrite(path, image)
    return path, image


def _tiled_reference(model, image, *min_sizes):
    """A fresh session's tiled AIS (blocks of 48 px, as the runs below), one label image per min_size."""
    from peft_export.runtime.blockwise import instances_blockwise
    from peft_export.runtime.instances import check_ais_params

    maps = SamSession(model).tiled(image, tile=96, halo=24).instance_maps()
    refs = [instances_blockwise(maps, check_ais_params({"min_size": m}), block=48, halo=64) for m in min_sizes]
    return refs[0] if len(refs) == 1 else refs


def test_one_cluster_serves_reruns_with_other_options_and_a_reexported_model(export, small_tif, elsewhere_cluster,
                                                                             tmp_path):
    """Workers keep the merge map, size table and session between tasks; a rerun into the same
    output with another --min-size, then with another model re-exported into the same folder, on
    the same live cluster gives what a fresh run of those settings gives."""
    import shutil

    from dask.distributed import Client

    from peft_export.distributed import run_jobs
    from tiled_helpers import reexport_other_decoder

    path, image = small_tif
    model = tmp_path / "export"
    shutil.copytree(export, model)
    out = tmp_path / "labels.zarr"
    opts = dict(tile=96, halo=24, block=48)  # 12 watershed blocks
    with Client(elsewhere_cluster) as client:
        run_jobs(client, [plan_large(model, path, out, **opts)])
        first = _labels(out)
        min_size = int(np.median(np.bincount(first.ravel())[1:])) + 1  # drops about half the objects
        ref_first, ref_bigger = _tiled_reference(model, image, 0, min_size)
        np.testing.assert_array_equal(first, ref_first)
        assert 0 < ref_bigger.max() < first.max()
        run_jobs(client, [plan_large(model, path, out, instance_options={"min_size": min_size}, overwrite=True,
                                     **opts)])
        np.testing.assert_array_equal(_labels(out), ref_bigger)
        reexport_other_decoder(model)
        run_jobs(client, [plan_large(model, path, out, instance_options={"min_size": min_size}, overwrite=True,
                                     **opts)])
        other = _tiled_reference(model, image, min_size)
        assert other.max() > 0 and not np.array_equal(other, ref_bigger)  # the new model segments differently
        np.testing.assert_array_equal(_labels(out), other)


def test_a_run_stopped_in_process_resumes_on_a_cluster_without_recomputing_tiles(export, small_tif,
                                                                                 elsewhere_cluster, tmp_path):
    from dask.distributed import Client

    from peft_export.distributed import run_steps

    path, image = small_tif
    out = tmp_path / "r.zarr"
    job = plan_large(export, path, out, tile=96, halo=24, block=48)
    _, tile_step, n = stages(job)[0]
    for k in range(n // 2):  # the run stops after half the tiles
        tile_step(job, k)
    done = {k: _marker(job, f"tile_{k}").stat().st_mtime_ns for k in range(n // 2)}
    resumed = plan_large(export, path, out, tile=96, halo=24, block=48)
    assert resumed["resumed"]
    with Client(elsewhere_cluster) as client:
        run_steps(client, [resumed])
    assert all(_marker(resumed, f"tile_{k}").is_file() for k in range(n))
    assert {k: _marker(resumed, f"tile_{k}").stat().st_mtime_ns for k in range(n // 2)} == done  # not redone
    finish_large(resumed)
    np.testing.assert_array_equal(_labels(out), _tiled_reference(export, image, 0))


def test_relative_paths_reach_a_worker_in_another_directory(export, small_tif, elsewhere_cluster, tmp_path,
                                                          monkeypatch):
    """The client runs in one directory, the worker in another: paths as typed (relative) are
    resolved before they travel, so the worker reads and writes the client's files."""
    import shutil

    path, image = small_tif
    shutil.copy(path, tmp_path / "a.tif")
    (tmp_path / "model").symlink_to(export)
    monkeypatch.chdir(tmp_path)
    code, output = _run("model", "a.tif", "--instances", "--tile", "96", "--halo", "24", "--scheduler",
                        elsewhere_cluster.scheduler_address, "-o", "a_labels.zarr", "-q")
    assert code == 0, output
    ref, _ = SamSession(export).tiled(image, tile=96, halo=24).segment_instances(block=1008, halo=64)
    np.testing.assert_array_equal(_labels(tmp_path / "a_labels.zarr"), ref)


def _private_mount_prefix():
    """A command prefix that runs a process in its own mount namespace (root, or a user namespace
    mapping the user to root), or None where this system allows neither."""
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-m", "--propagation", "private"], ["unshare", "-r", "-m", "--propagation", "private"]):
        if subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True).returncode == 0:
            return prefix
    return None


def test_a_worker_that_cannot_see_the_image_is_named_and_nothing_is_written(export, small_tif, tmp_path):
    """A worker on "another machine": a `dask worker` process whose view of the filesystem hides
    the image's folder (an empty tmpfs mounted over it in its own mount namespace). The client
    reads the image; the probe before any tile finds the worker cannot: one line naming the
    worker and the path, exit 2, no output and no partial left."""
    import shutil
    import subprocess
    import sys

    from dask.distributed import Client, LocalCluster

    prefix = _private_mount_prefix()
    if prefix is None:
        pytest.skip("no private mount namespace here (unshare -m)")
    hidden = tmp_path / "images"
    hidden.mkdir()
    shutil.copy(small_tif[0], hidden / "a.tif")
    with LocalCluster(n_workers=0, processes=True, dashboard_address=None) as cluster:
        script = (f"mount -t tmpfs tmpfs {hidden} && exec {sys.executable} -m distributed.cli.dask_worker "
                  f"{cluster.scheduler_address} --nworkers 1 --nthreads 1 --no-dashboard --no-nanny")
        worker = subprocess.Popen([*prefix, "sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(cluster) as client:
                client.wait_for_workers(1, timeout=60)
                address = next(iter(client.scheduler_info()["workers"]))
            out = tmp_path / "out" / "a_labels.zarr"
            code, output = _run(export, hidden / "a.tif", "--instances", "--tile", "96", "--scheduler",
                                cluster.scheduler_address, "-o", out, "-q")
        finally:
            worker.terminate()
            worker.wait(timeout=30)
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert output.startswith(f"error: worker {address}: cannot read the image {hidden / 'a.tif'}"), output
    assert not out.exists() and not out.with_name("a_labels.zarr.partial").exists()


def test_the_probe_names_the_worker_and_path_it_cannot_write(export, small_tif, tmp_path):
    """The library's side of the probe: a job whose output folder the workers cannot write into
    (it vanished after planning, as a folder not shared with the workers looks to them)."""
    import shutil

    from peft_export.distributed import close, connect, run_jobs

    path, _ = small_tif
    job = plan_large(export, path, tmp_path / "o.zarr", tile=96, halo=24)
    shutil.rmtree(tmp_path / "o.zarr.partial" / "_work" / "done")
    client = connect(workers=1)
    try:
        address = next(iter(client.scheduler_info()["workers"]))
        with pytest.raises(PeftExportError) as err:
            run_jobs(client, [job])
    finally:
        close(client)
    assert str(err.value).startswith(f"worker {address}: cannot write into {tmp_path / 'o.zarr.partial'} "
                                     "(No such file or directory)")
    assert not (tmp_path / "o.zarr.partial").exists()  # the run laid it out: removed again


# ---- resume identity and the end's order (issue 36, point 7) -------------------------------------


def test_a_stopped_run_of_a_changed_image_or_export_is_refused(export, small_tif, tmp_path):
    import shutil

    from tiled_helpers import reexport_other_decoder

    path, image = small_tif
    model, img = tmp_path / "export", tmp_path / "a.tif"
    shutil.copytree(export, model)
    shutil.copy(path, img)
    job = plan_large(model, img, tmp_path / "o.zarr", tile=96, halo=24)
    stages(job)[0][1](job, 0)  # one tile done, then the run stops
    tifffile.imwrite(img, image[::-1])  # the image written over (same name, size and dtype)
    with pytest.raises(PeftExportError, match="a stopped run whose image .*a.tif has changed since"):
        plan_large(model, img, tmp_path / "o.zarr", tile=96, halo=24)
    job = plan_large(model, img, tmp_path / "o.zarr", tile=96, halo=24, overwrite=True)
    stages(job)[0][1](job, 0)
    reexport_other_decoder(model)  # another model exported into the same folder
    code, output = _run(model, img, "--instances", "--tile", "96", "--halo", "24", "-o", tmp_path / "o.zarr", "-q")
    assert code == 2 and "a stopped run of another export (the manifest.json of" in output, output
    assert plan_large(model, img, tmp_path / "o.zarr", tile=96, halo=24, overwrite=True)["resumed"] is False


KILL_IN_THE_END = r"""
import os, shutil, signal, sys
from pathlib import Path
from peft_export.predict.large import finish_large, plan_large

job = plan_large(*sys.argv[1:4], tile=96, halo=24)
kill_at, calls = int(sys.argv[4]), [0]


def killing(fn, what):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            if what == "rmtree" and os.path.isdir(args[0]):  # killed midway: half the folder's entries gone
                for e in sorted(os.scandir(args[0]), key=lambda e: e.name)[::2]:
                    shutil.rmtree(e.path) if e.is_dir() else os.remove(e.path)
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped


shutil.rmtree, os.replace = killing(shutil.rmtree, "rmtree"), killing(os.replace, "replace")
Path.unlink = killing(Path.unlink, "unlink")
finish_large(job)
"""


def test_a_run_killed_anywhere_in_its_end_is_finished_by_running_it_again(export, small_tif, tmp_path):
    """The end of a run (metadata, scratch removed, the rename) killed (SIGKILL) before each of its
    file operations in turn, one removal cut midway: the same command run again finishes it, with
    the labels of the complete run and nothing left over."""
    import shutil
    import signal
    import subprocess
    import sys

    path, _ = small_tif
    template = tmp_path / "template"
    job = plan_large(export, path, template / "out.zarr", tile=96, halo=24)
    for _, step, n in stages(job):
        for k in range(n) if n else [None]:
            step(job) if k is None else step(job, k)
    labels = zarr.open_array(str(template / "out.zarr.partial" / "0"), mode="r")[:]
    assert labels.max() > 0
    for kill_at in range(1, 30):
        case = tmp_path / f"kill{kill_at}"
        shutil.copytree(template, case)
        res = subprocess.run([sys.executable, "-c", KILL_IN_THE_END, str(export), str(path), str(case / "out.zarr"),
                              str(kill_at)], capture_output=True, text=True)
        assert res.returncode in (0, -signal.SIGKILL), res.stderr[-2000:]
        if res.returncode == -signal.SIGKILL:  # killed: the same command again
            code, output = _run(export, path, "--instances", "--tile", "96", "--halo", "24", "-o", case / "out.zarr",
                                "-q")
            assert code == 0, (kill_at, output)
        np.testing.assert_array_equal(_labels(case / "out.zarr"), labels)
        assert sorted(p.name for p in case.iterdir()) == ["out.zarr"], kill_at
        assert sorted(p.name for p in (case / "out.zarr").iterdir()) == [".zattrs", ".zgroup", "0"], kill_at
        if res.returncode == 0:
            break  # the end ran through: every point before it was tried
    assert kill_at >= 8


def test_ctrl_c_says_where_the_partial_is_and_the_rerun_says_it_resumes(export, small_tif, tmp_path):
    """Ctrl-C (SIGINT) in the middle of the tiles: one line naming the partial output and how to go
    on, exit 130; the same command again says in one line that it resumes, and finishes."""
    from tiled_helpers import interrupt_predict

    path, image = small_tif
    out = tmp_path / "o.zarr"
    args = [str(export), str(path), "--instances", "--tile", "96", "--halo", "24", "-o", str(out), "-q"]
    code, err = interrupt_predict(args, tmp_path / "o.zarr.partial", "tile")
    assert code == 130, err
    assert err.strip().splitlines()[-1] == (f"interrupted: the finished steps are kept in {out}.partial; run the same "
                                            "command again to resume"), err
    code, output = _run(*args)
    assert code == 0, output
    first = output.splitlines()[0]
    assert first.startswith(f"{path}: resuming the stopped run in {out}.partial (") and "steps done)" in first
    ref, _ = SamSession(export).tiled(image, tile=96, halo=24).segment_instances(block=1008)
    np.testing.assert_array_equal(_labels(out), ref)
