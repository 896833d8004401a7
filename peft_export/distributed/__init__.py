"""Stage 10, distributed: tiled segmentation of large images and folders, and volumes slab by slab,
spread over a Dask cluster (a LocalCluster of N processes or an existing scheduler), results
written straight into zarr.

May import: runtime, predict, data, errors, fsutil (and dask, distributed, zarr lazily).
"""

from .cluster import close, connect, probe_workers, run_jobs, run_steps

__all__ = ["close", "connect", "probe_workers", "run_jobs", "run_steps"]
