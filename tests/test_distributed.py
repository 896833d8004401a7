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
from peft_export.predict.large import _marker, plan_large, run_large, stages
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


def test_stopped_run_resumes_without_redoing_finished_tiles(export, image_zarr, tmp_path):
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
    run_large(job2)
    fresh = plan_large(export, path, tmp_path / "fresh.zarr", tile=96, halo=24, block=96)
    run_large(fresh)
    np.testing.assert_array_equal(_labels(out), _labels(tmp_path / "fresh.zarr"))
    assert not (tmp_path / "r.zarr.partial").exists()
    # a rerun skips a finished tile: its marker (written after its data) is not rewritten
    job3 = plan_large(export, path, tmp_path / "s.zarr", tile=96, halo=24, block=96)
    tile_step(job3, 0)
    t0 = _marker(job3, "tile_0").stat().st_mtime_ns
    job3 = plan_large(export, path, tmp_path / "s.zarr", tile=96, halo=24, block=96)
    tile_step(job3, 0)
    assert _marker(job3, "tile_0").stat().st_mtime_ns == t0 and len(done) == n // 2


def test_local_cluster_gives_the_same_labels_and_loads_the_export_once_per_worker(export, image_zarr, tmp_path):
    from peft_export.distributed import close, connect, run_jobs

    path, _ = image_zarr
    ref = plan_large(export, path, tmp_path / "one.zarr", tile=96, halo=24, block=96)  # 16 watershed blocks
    run_large(ref)
    client = connect(workers=2)
    try:
        assert len(client.scheduler_info()["workers"]) == 2
        job = plan_large(export, path, tmp_path / "two.zarr", tile=96, halo=24, block=96)
        records = run_jobs(client, [job])
        per_worker = client.run(lambda: len(__import__("peft_export.predict.large", fromlist=["_"])._SESSIONS))
        assert sorted(per_worker.values()) == [1, 1]  # each worker opened the export once, for all its tiles
    finally:
        close(client)
    a, b = _labels(tmp_path / "one.zarr"), _labels(tmp_path / "two.zarr")
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
    with pytest.raises(PeftExportError, match="name it OUT.zarr"):
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
    from dask.distributed import Client, LocalCluster

    image = nuclei_mosaic(150, 140, seed=30)[0]
    tifffile.imwrite(tmp_path / "a.tif", image)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        code, output = _run(export, tmp_path / "a.tif", "--instances", "--tile", "128", "--scheduler",
                            cluster.scheduler_address, "-o", tmp_path / "a_labels.zarr", "-q")
        assert code == 0, output
        with Client(cluster.scheduler_address) as client:  # the cluster is the user's: still up
            assert len(client.scheduler_info()["workers"]) == 1
    ref, _ = SamSession(export).tiled(image, tile=128, halo=32).segment_instances(block=1024, halo=64)
    np.testing.assert_array_equal(_labels(tmp_path / "a_labels.zarr"), ref)


def test_a_worker_killed_mid_job_is_replaced_and_the_labels_are_right(export, image_zarr, tmp_path):
    """A worker process dies (SIGKILL) while the tiles run: Dask's nanny starts a new one, the lost
    tasks run again, and the labels equal the in-process run's up to renumbering."""
    import os
    import signal
    import threading
    import time

    from peft_export.distributed import close, connect, run_jobs

    path, _ = image_zarr
    opts = dict(tile=64, halo=16, block=64)  # 90 tiles: the job is still running when the kill comes
    run_large(plan_large(export, path, tmp_path / "one.zarr", **opts))
    client = connect(workers=2)
    try:
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
    finally:
        close(client)
    assert 0 < at_kill[0] < n_tiles  # the worker died mid-job
    assert len(after) == 2 and set(after.values()) != set(pids.values())  # a new worker replaced it
    a, b = _labels(tmp_path / "one.zarr"), _labels(tmp_path / "two.zarr")
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    assert pairs.shape[1] == len(np.unique(a)) == len(np.unique(b))  # the same labels up to renumbering
    assert records[0]["n_objects"] == a.max() > 5 and not (tmp_path / "two.zarr.partial").exists()
