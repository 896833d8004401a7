"""Large-image jobs (``predict.large``) on a Dask cluster: a LocalCluster of N processes with one
thread each, or an existing scheduler.

Every step of every job is one task (tiles, then seeds, the merge, the watershed and the
relabelling, block by block); each writes its own window straight into the job's zarr store, so
the store must be on a filesystem every worker sees. Workers open the export once (a session
per process, kept for the worker's life: ``predict.large.session_for``), not per tile. A task
whose worker dies is retried on another (``retries``); a run stopped altogether resumes from the
steps' markers when the same command is run again. The client shows the progress bar.
"""

from __future__ import annotations

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
    distributed = _dask()
    if scheduler is not None:
        try:
            return distributed.Client(scheduler, timeout=f"{timeout}s")
        except (OSError, TimeoutError, ValueError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PeftExportError(f"--scheduler {scheduler}: no Dask scheduler answers there ({why})") from None
    if workers is None or workers < 1:
        raise PeftExportError(f"--workers: must be >= 1, got {workers}")
    cluster = distributed.LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    return distributed.Client(cluster)


def close(client: Any) -> None:
    """Close the client and, for a LocalCluster we started, the cluster."""
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None and type(cluster).__name__ == "LocalCluster":
        cluster.close()


def _gather(client: Any, futures: List[Any], desc: str, unit: str, progress: bool) -> List[Any]:
    from tqdm import tqdm

    distributed = _dask()
    with tqdm(total=len(futures), desc=desc, unit=unit, disable=not progress) as bar:
        for _ in distributed.as_completed(futures):
            bar.update(1)
    return client.gather(futures)


def run_jobs(client: Any, jobs: List[Dict[str, Any]], progress: bool = False, stages: Any = stages,
             finish: Any = finish_large) -> List[Dict[str, Any]]:
    """Every job's steps as Dask tasks, stage by stage over all jobs at once (so a folder of
    images spreads over the workers); then each job finished here. Returns the jobs' records.
    ``stages``/``finish``: another kind of job's steps (default: large images; volumes pass
    ``volume.slabs.stages`` and ``finish_volume``)."""
    jobs = [{**job, "threads": 1} for job in jobs]  # one ONNX Runtime thread per worker thread
    if not jobs:
        return []
    for i, (name, _, _) in enumerate(stages(jobs[0])):
        futures = []
        for job in jobs:
            _, step, n = stages(job)[i]
            if n == 0:
                futures.append(client.submit(step, job, pure=False, retries=RETRIES))
            else:
                futures += client.map(step, [job] * n, range(n), pure=False, retries=RETRIES)
        _gather(client, futures, name, "tile" if name == "tiles" else "step", progress)
    return [finish(job) for job in jobs]
