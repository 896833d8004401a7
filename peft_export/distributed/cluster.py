"""Large-image jobs (``predict.large``) on a Dask cluster: a LocalCluster of N processes with one
thread each, or an existing scheduler.

Every step of every job is one task (tiles, then seeds, the merge, the watershed and the
relabelling, block by block); each writes its own window straight into the job's zarr store, so
the store must be on a filesystem every worker sees, under the same path (the job's paths are
absolute). Before any task is submitted, one probe per worker (``probe_workers``) checks that it
reads the export (the same content: manifest hash) and the image and writes into the output;
a worker that cannot is named with the path, and nothing is left behind. Workers open the export
once (a session per process, kept while the export's content stays the same:
``predict.large.session_for``), not per tile. A task whose worker dies is retried on another
(``retries``); a run stopped altogether resumes from the steps' markers when the same command is
run again. The client shows the progress bar. Volumes (``volume.slabs``) run the same way, slab by
slab: ``run_jobs`` takes their stages, their end and how their input is read.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from ..errors import PeftExportError
from ..predict.large import finish_large, stages

RETRIES = 2
EXTRA_HINT = "pip install 'peftexport[distributed]'"


def _dask():
    try:
        from dask import distributed
    except ImportError as exc:
        raise PeftExportError(f"--workers/--scheduler: {exc.name or 'dask'} is not installed; {EXTRA_HINT}") from None
    return distributed


def connect(workers: Optional[int] = None, scheduler: Optional[str] = None, timeout: float = 10.0) -> Any:
    """A client of a new LocalCluster (``workers`` processes, one thread each) or of ``scheduler``."""
    if workers is not None and scheduler is not None:
        raise PeftExportError("--workers and --scheduler: give one (a local cluster, or an existing one)")
    distributed = _dask()
    if scheduler is not None:
        try:
            return distributed.Client(scheduler, timeout=f"{timeout}s")
        except (OSError, TimeoutError, ValueError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PeftExportError(f"--scheduler {scheduler}: no Dask scheduler answers there ({why})") from None
    if workers is None or workers < 1:
        raise PeftExportError(f"--workers: must be >= 1, got {workers}")
    cluster = local_cluster(int(workers))
    return distributed.Client(cluster)


def local_cluster(workers: int) -> Any:
    """A LocalCluster of ``workers`` processes with one thread each, this process's environment kept.

    Dask's nanny writes its workers' variables (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``, ...) into
    this process's ``os.environ`` before it spawns a worker, and never puts them back: every process
    started from here later (an ``improve`` run, a ``finetune``) would compute on one thread, and the
    thread choice (``training.threads``) would read them as the user's. They are put back once the
    workers run, and again by ``close_local_cluster`` (a worker replaced during a job sets them anew)."""
    distributed = _dask()
    before = dict(os.environ)
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
    cluster._peftexport_environ = {k: before.get(k) for k in changed}  # type: ignore[attr-defined]
    _restore_environ(cluster._peftexport_environ)
    return cluster


def _restore_environ(saved: Dict[str, Optional[str]]) -> None:
    for key, value in saved.items():  # None: it was not set
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def close_local_cluster(cluster: Any) -> None:
    """Close a ``local_cluster``; the environment as it was before it started."""
    cluster.close()
    _restore_environ(getattr(cluster, "_peftexport_environ", {}))


def close(client: Any) -> None:
    """Close the client and, for a LocalCluster we started, the cluster."""
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None and type(cluster).__name__ == "LocalCluster":
        close_local_cluster(cluster)


def _gather(client: Any, futures: List[Any], desc: str, unit: str, progress: bool) -> List[Any]:
    from tqdm import tqdm

    distributed = _dask()
    with tqdm(total=len(futures), desc=desc, unit=unit, disable=not progress) as bar:
        for _ in distributed.as_completed(futures):
            bar.update(1)
    return client.gather(futures)


def read_image_corner(job: Dict[str, Any]) -> None:
    """A large image's first pixel, read as the steps read the image (``predict.arrays``)."""
    import numpy as np

    from ..predict.arrays import open_image_array

    np.asarray(open_image_array(job["image"])[:1, :1])


def _probe(jobs: List[Dict[str, Any]], read_input: Any = read_image_corner) -> Optional[str]:
    """On a worker: None if it reads each job's export and input (``read_input(job)``) and writes
    into its output, else what it cannot do, naming the path."""
    import os
    import uuid
    from pathlib import Path

    from ..predict.large_checks import check_device
    from ..predict.large_state import manifest_sha256

    for job in jobs:
        try:
            check_device(job.get("device", "cpu"))
        except PeftExportError as e:
            return str(e)
        try:
            if manifest_sha256(job["export_dir"]) != job["manifest_sha256"]:
                return f"sees another export at {job['export_dir']} (its manifest.json differs from the client's)"
        except OSError as e:
            return f"cannot read the export {job['export_dir']} ({e.strerror or type(e).__name__})"
        try:
            read_input(job)
        except (OSError, PeftExportError) as e:
            why = str(e).removeprefix(f"{job['image']}: ") if isinstance(e, PeftExportError) else e.strerror
            return f"cannot read the {job.get('kind', 'image')} {job['image']} ({why or type(e).__name__})"
        probe = Path(job["partial"]) / "_work" / "done" / f".probe-{uuid.uuid4().hex}"
        try:
            probe.write_bytes(b"")
            os.remove(probe)
        except OSError as e:
            return f"cannot write into {job['partial']} ({e.strerror or type(e).__name__})"
    return None


def probe_workers(client: Any, jobs: List[Dict[str, Any]], read_input: Any = read_image_corner) -> None:
    """One probe task per worker (``_probe``); refuse, naming the first worker that failed and
    the path, when any did. ``read_input``: how a job's input is read (default: a large image)."""
    found = {w: why for w, why in client.run(_probe, jobs, read_input).items() if why}
    if found:
        worker, why = sorted(found.items())[0]
        more = f" (and {len(found) - 1} other worker(s))" if len(found) > 1 else ""
        what = jobs[0].get("kind", "image") if jobs else "image"
        raise PeftExportError(f"worker {worker}{more}: {why}; a cluster's workers need the export, the {what} and "
                              "the output under the same paths as this machine (a shared filesystem)")


def run_steps(client: Any, jobs: List[Dict[str, Any]], progress: bool = False, stages: Any = stages) -> None:
    """Every job's steps as Dask tasks, stage by stage over all jobs at once (so a folder of
    images spreads over the workers); steps a stopped run finished return at once. ``stages``:
    another kind of job's steps (default: large images; volumes pass ``volume.slabs.stages``)."""
    jobs = [{**job, "threads": 1} for job in jobs if not job.get("finished")]  # one ORT thread per worker thread
    if not jobs:
        return
    for i, (name, _, _) in enumerate(stages(jobs[0])):
        futures = []
        for job in jobs:
            _, step, n = stages(job)[i]
            if n == 0:
                futures.append(client.submit(step, job, pure=False, retries=RETRIES))
            else:
                futures += client.map(step, [job] * n, range(n), pure=False, retries=RETRIES)
        _gather(client, futures, name, "tile" if name == "tiles" else "step", progress)


def run_jobs(client: Any, jobs: List[Dict[str, Any]], progress: bool = False, stages: Any = stages,
             finish: Any = finish_large, read_input: Any = read_image_corner) -> List[Dict[str, Any]]:
    """Probe the workers, run every job's steps (``run_steps``), then finish each job here.
    Returns the jobs' records. A failed probe removes the partial outputs this run laid out.
    ``stages``/``finish``/``read_input``: another kind of job's (volumes pass ``volume.slabs``'s
    ``stages``, ``finish_volume`` and ``read_volume_corner``)."""
    import shutil

    try:
        probe_workers(client, [job for job in jobs if not job.get("finished")], read_input)
    except PeftExportError:
        for job in jobs:
            if not job.get("resumed"):
                shutil.rmtree(job["partial"], ignore_errors=True)
        raise
    run_steps(client, jobs, progress, stages)
    return [finish(job) for job in jobs]
