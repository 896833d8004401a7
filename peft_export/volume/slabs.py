"""Automatic 3D segmentation of a volume larger than memory into OME-Zarr, slab by slab, resumable,
in this process or as Dask tasks (``peft_export.distributed.run_jobs(..., stages=stages,
finish=finish_volume, read_input=read_volume_corner)``).

``plan_volume`` checks every input and lays out ``OUT.zarr.partial/``: the labels "0", ``_work/``
(each plane's own labels, the closing's mask, the overlap edges) and ``run.json``. The steps, each
a function of (job, index) that reads earlier steps' outputs and writes only its own window:

1. ``plane_step``: a slab of planes segmented (AIS or segment-everything, tiled where planes are
   larger than the model input); each plane's labels keep their own ids 1..n;
2. with ``gap_closing``: ``closing_step`` (one yx block through all planes) and ``regroup_step``
   (a slab of planes re-labelled from the closed mask, as ``volume.merge`` does);
3. ``edge_step``: the overlaps between each plane of a slab and the next;
4. ``merge_step``: the multicut over all planes' objects, short objects dropped, ids renumbered:
   one lookup table;
5. ``label_step``: a slab of planes written through the table; ``finish_volume`` adds the
   OME-NGFF metadata and renames ``OUT.zarr.partial`` to ``OUT.zarr``.

The run's state is a large image's (``predict.large_state``): absolute paths; ``run.json`` with
the run's id, the export's manifest hash and the volume's identity (a stopped run of another
export, volume or settings is refused); the partial laid out under a temporary name; markers
(a rerun of the same command skips the steps that have one); the kill-safe end. A worker keeps
the export's session (``predict.large.session_for``) and the run's id tables (keyed by the run's
id) between steps. The labels equal ``segment_volume``'s on the same volume. Memory holds a few
planes and the object graph, not the volume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import PeftExportError
from ..predict.large import _done, _mark, _read_mark, _run_cache, _work, _zarr, forget_run, session_for
from ..predict.large import total_steps as large_total_steps
from .merge import CLOSING_BLOCK, check_merge_options, close_along_z, closed_plane, plane_edges, relabel_volume, solve_merge

SLAB = 8  # planes per task


def _n_slabs(job: Dict[str, Any]) -> int:
    return -(-int(job["shape"][0]) // int(job["slab"]))


def _slab(job: Dict[str, Any], k: int) -> range:
    s = int(job["slab"])
    return range(k * s, min((k + 1) * s, int(job["shape"][0])))


def _yx_blocks(job: Dict[str, Any]) -> List[tuple]:
    _, h, w = job["shape"]
    return [(y, x) for y in range(0, h, CLOSING_BLOCK) for x in range(0, w, CLOSING_BLOCK)]


def _volume(job: Dict[str, Any]):
    from ..runtime.tiling import IntensityRange
    from .embeddings import VolumeEmbeddings
    from .stacks import open_stack

    stack = open_stack(job["image"], "z", job.get("axes"), job.get("channel"))
    spec = job["spec"]
    return VolumeEmbeddings(session_for(job), stack, tile=spec["tile"], halo=spec["halo"], adapter=job.get("adapter"),
                            keep=False, intensity=IntensityRange.from_record(job["intensity"]))


def plan_volume(export_dir: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike, mode: str = "auto",
                instance_options: Optional[Dict[str, Any]] = None,
                everything_options: Optional[Dict[str, Any]] = None, merge: Optional[Dict[str, Any]] = None,
                axes: Optional[str] = None, channel: Optional[int] = None, tile: Optional[int] = None,
                halo: Optional[int] = None, scale: Optional[float] = None, precision: str = "fp32",
                adapter: Optional[str] = None, slab: int = SLAB, overwrite: bool = False,
                threads: Optional[int] = None, device: str = "cpu", backend: str = "onnxruntime") -> Dict[str, Any]:
    """Check the inputs and lay out (or find, to resume) ``OUT.zarr.partial``; return the job.
    As ``predict.large.plan_large``: paths made absolute, the run's id, the export's manifest
    hash and the volume's identity in ``run.json`` (a stopped run of another export, volume or
    settings is refused), ``resumed`` / ``finished`` (only the end remains) in the job."""
    from ..predict.large_checks import check_zarr_output
    from ..predict.large_state import (image_identity, manifest_sha256, new_layout, new_run_id, stopped_run,
                                       write_json_atomic)
    from ..runtime import SamSession
    from ..runtime.adapters import pick_adapter
    from .automatic import plane_options, resolve_mode
    from .embeddings import plane_spec, stack_intensity
    from .outputs import create_stack_labels
    from .stacks import open_stack

    check_zarr_output(Path(out))
    out = Path(os.path.abspath(out))  # workers get absolute paths: their own directory is not the client's
    export_dir, image = Path(os.path.abspath(export_dir)), Path(os.path.abspath(image))
    if out.suffix.lower() != ".zarr":
        raise PeftExportError(f"{out}: a volume's labels go slab by slab to a zarr store; name it OUT.zarr")
    merge = {"beta": 0.5, "with_background": True, "gap_closing": None, "min_z_extent": None, **(merge or {})}
    check_merge_options(merge["beta"], merge["gap_closing"], merge["min_z_extent"])
    if int(slab) < 1:
        raise PeftExportError(f"slab: must be >= 1 plane, got {slab}")
    stack = open_stack(image, "z", axes, channel)
    session = SamSession(export_dir, backend=backend, device=device, precision=precision, intra_op_threads=threads)
    adapter = pick_adapter(adapter, session.adapters)
    mode = resolve_mode(session, mode, adapter)
    options = plane_options(mode, instance_options, everything_options)
    spec = plane_spec(session.manifest, stack.plane_shape, tile, halo, scale, adapter)
    shape = [stack.n_planes, *stack.plane_shape]
    partial = out.with_name(out.name + ".partial")
    settings = {"export_dir": str(export_dir), "image": str(image), "axes": axes, "channel": channel, "shape": shape,
                "mode": mode, "options": options, "merge": merge,
                "spec": {"tile": spec.tile, "halo": spec.halo, "image_size": spec.image_size},
                "precision": precision, "adapter": adapter, "slab": int(slab),
                "manifest_sha256": manifest_sha256(export_dir), "image_identity": image_identity(image)}
    job = {**settings, "kind": "volume", "out": str(out), "partial": str(partial), "threads": threads, "device": device,
           "backend": backend}
    found = stopped_run(out, partial, settings, overwrite, what="volume")
    if found is not None:
        return {**job, **found}
    job.update(intensity=stack_intensity(stack, session._intensity_rule).record(), run_id=new_run_id())
    import zarr

    with new_layout(out, partial) as layout:
        create_stack_labels(layout, shape, "z", str(image))
        work = zarr.open_group(str(layout / "_work"), mode="w", zarr_format=2)
        chunks = (1, *[min(1024, s) for s in shape[1:]])
        work.create_array("planes", shape=shape, chunks=chunks, dtype="uint32", fill_value=0)
        if merge["gap_closing"]:
            work.create_array("closed", shape=shape, chunks=(shape[0], min(CLOSING_BLOCK, shape[1]),
                                                             min(CLOSING_BLOCK, shape[2])), dtype="bool",
                              fill_value=False)
            work.create_array("regrouped", shape=shape, chunks=chunks, dtype="uint32", fill_value=0)
        (layout / "_work" / "done").mkdir()
        write_json_atomic(layout / "run.json", {k: job[k] for k in (*settings, "intensity", "run_id")})
    return {**job, "resumed": False, "finished": False}


def read_volume_corner(job: Dict[str, Any]) -> None:
    """The volume's first voxel, read as the steps read it (a worker's probe: ``distributed``)."""
    from .stacks import open_stack

    open_stack(job["image"], "z", job.get("axes"), job.get("channel")).read(0, slice(0, 1), slice(0, 1))


def _final(job: Dict[str, Any]) -> str:
    return "_work/regrouped" if job["merge"]["gap_closing"] else "_work/planes"


def plane_step(job: Dict[str, Any], k: int) -> List[int]:
    """Slab ``k`` segmented plane by plane; the marker holds each plane's object count."""
    from .automatic import segment_plane

    name = f"planes_{k}"
    if not _done(job, name):
        vol, planes = _volume(job), _zarr(job, "_work/planes")
        counts = []
        for z in _slab(job, k):
            labels = relabel_volume(segment_plane(vol, z, job["mode"], job["options"]))
            planes[z] = labels
            counts.append(int(labels.max()))
        _mark(job, name, counts)
    return _read_mark(job, name)


def closing_step(job: Dict[str, Any], k: int) -> None:
    name = f"closing_{k}"
    if _done(job, name):
        return
    y, x = _yx_blocks(job)[k]
    ys, xs = slice(y, y + CLOSING_BLOCK), slice(x, x + CLOSING_BLOCK)
    planes = _zarr(job, "_work/planes")
    _zarr(job, "_work/closed")[:, ys, xs] = close_along_z(np.asarray(planes[:, ys, xs]) > 0, job["merge"]["gap_closing"])
    _mark(job, name)


def regroup_step(job: Dict[str, Any], k: int) -> List[int]:
    from .merge import _offset_plane

    name = f"regroup_{k}"
    if not _done(job, name):
        g, n = int(job["merge"]["gap_closing"]), int(job["shape"][0])
        planes, closed, out = _zarr(job, "_work/planes"), _zarr(job, "_work/closed"), _zarr(job, "_work/regrouped")
        counts = []
        for z in _slab(job, k):
            seg = np.asarray(planes[z])
            new = _offset_plane(seg, 1)[0] if (z < g or z >= n - g) else closed_plane(seg, np.asarray(closed[z]), 1)[0]
            out[z] = new
            counts.append(int(new.max()))
        _mark(job, name, counts)
    return _read_mark(job, name)


def _offsets(job: Dict[str, Any]) -> np.ndarray:
    """Each plane's first global id minus one (planes' own ids 1..n follow it); read once per
    run and process, once every slab's planes are done."""
    stage = "regroup" if job["merge"]["gap_closing"] else "planes"

    def read() -> np.ndarray:
        counts = [c for k in range(_n_slabs(job)) for c in _read_mark(job, f"{stage}_{k}")]
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.uint64)

    return _run_cache(job, "offsets", read)


def _global(plane: np.ndarray, offset: int) -> np.ndarray:
    plane = np.asarray(plane).astype(np.uint64)
    return np.where(plane > 0, plane + np.uint64(offset), np.uint64(0))


def edge_step(job: Dict[str, Any], k: int) -> None:
    name = f"edges_{k}"
    if _done(job, name):
        return
    offsets, final, n = _offsets(job), _zarr(job, _final(job)), int(job["shape"][0])
    uv, overlap = [np.zeros((0, 2), np.uint64)], [np.zeros(0)]
    for z in _slab(job, k):
        if z + 1 < n:
            e = plane_edges(_global(final[z], offsets[z]), _global(final[z + 1], offsets[z + 1]))
            uv.append(e[0])
            overlap.append(e[1])
    path = _work(job) / f"edges_{k}.npz"
    tmp = path.with_name(f".edges_{k}.tmp{os.getpid()}.npz")
    np.savez(tmp, uv=np.concatenate(uv), overlap=np.concatenate(overlap))
    os.replace(tmp, path)
    _mark(job, name)


def merge_step(job: Dict[str, Any]) -> None:
    """The multicut over every plane's objects; ``min_z_extent``; the id table saved."""
    if _done(job, "merge"):
        return
    offsets, m = _offsets(job), job["merge"]
    uv, overlap = [], []
    for k in range(_n_slabs(job)):
        with np.load(_work(job) / f"edges_{k}.npz") as f:
            uv.append(f["uv"])
            overlap.append(f["overlap"])
    n_nodes = int(offsets[-1]) + 1
    labels = solve_merge(n_nodes, np.concatenate(uv), np.concatenate(overlap), m["beta"], m["with_background"])
    if m["min_z_extent"]:
        plane_of = np.searchsorted(offsets, np.arange(n_nodes, dtype=np.uint64), side="left") - 1
        first = np.full(int(labels.max()) + 1, np.iinfo(np.int64).max)
        last = np.full(int(labels.max()) + 1, -1)
        np.minimum.at(first, labels[1:].astype(np.int64), plane_of[1:])
        np.maximum.at(last, labels[1:].astype(np.int64), plane_of[1:])
        short = (last - first + 1) < int(m["min_z_extent"])
        short[0] = False
        labels = np.where(short[labels.astype(np.int64)], 0, labels)
    present = np.unique(labels[1:])
    present = present[present > 0]
    lut = np.zeros(int(labels.max()) + 1, np.uint32)
    lut[present.astype(np.int64)] = np.arange(1, len(present) + 1, dtype=np.uint32)
    table = lut[labels.astype(np.int64)]
    path = _work(job) / "lut.npy"
    tmp = path.with_name(f".lut.tmp{os.getpid()}.npy")
    np.save(tmp, table)
    os.replace(tmp, path)
    _mark(job, "merge", int(len(present)))


def label_step(job: Dict[str, Any], k: int) -> None:
    name = f"labels_{k}"
    if _done(job, name):
        return
    table = _run_cache(job, "lut", lambda: np.load(_work(job) / "lut.npy"))
    offsets = _offsets(job)
    final, labels = _zarr(job, _final(job)), _zarr(job, "0")
    for z in _slab(job, k):
        labels[z] = table[_global(final[z], offsets[z]).astype(np.int64)]
    _mark(job, name)


def stages(job: Dict[str, Any]) -> List[tuple]:
    """(name, step, number of indices) in order; 0 indices: the step runs once. None for a run
    whose labels are complete (``finished``: only its end remains)."""
    if job.get("finished"):
        return []
    n = _n_slabs(job)
    out = [("planes", plane_step, n)]
    if job["merge"]["gap_closing"]:
        out += [("closing", closing_step, len(_yx_blocks(job))), ("regroup", regroup_step, n)]
    return out + [("edges", edge_step, n), ("merge", merge_step, 0), ("labels", label_step, n)]


def total_steps(job: Dict[str, Any]) -> int:
    return large_total_steps(job, stages)


def _record(job: Dict[str, Any]) -> Dict[str, Any]:
    """The run's record, from the steps' markers."""
    return {"image": job["image"], "shape": job["shape"], "mode": job["mode"], "merge": job["merge"],
            "tile": job["spec"]["tile"], "halo": job["spec"]["halo"], "slab": job["slab"],
            "n_objects": int(_read_mark(job, "merge")), "outputs": {"labels": job["out"]}}


def finish_volume(job: Dict[str, Any]) -> Dict[str, Any]:
    """Metadata, scratch removed, ``OUT.zarr.partial`` renamed to ``OUT.zarr``, in the kill-safe
    order of ``predict.large_state.finish`` (a rerun completes it from wherever a stop cut it);
    the run's record."""
    from ..predict.large_state import finish
    from .outputs import finish_volume_labels

    record = finish(job, lambda: _record(job), metadata=finish_volume_labels)
    forget_run(job)
    return record


def run_volume(job: Dict[str, Any], progress: bool = False) -> Dict[str, Any]:
    """Every step in this process (skipping those a stopped run finished), then ``finish_volume``."""
    from tqdm import tqdm

    for name, step, n in stages(job):
        if n == 0:
            step(job)
            continue
        for k in tqdm(range(n), desc=name, unit="slab" if name != "closing" else "block", disable=not progress):
            step(job, k)
    return finish_volume(job)
