"""Automatic instance segmentation of one large image into OME-Zarr, as small resumable steps.

``plan_large`` checks every input and lays out ``OUT.zarr.partial/``: the labels array "0",
``_work/`` (the assembled AIS maps, seeds, watershed labels) and ``run.json`` (the settings and
the run's identity: ``predict.large_state``). Each step is a function of (job, index) that
reads and writes only its own window, so the same steps run in this process (``run_large``) or
as Dask tasks (``peft_export.distributed``):

1. ``tile_step``: encoder + instance decoder on one tile; its inner area of the maps written;
2. ``seed_step`` / ``merge_step`` / ``watershed_step`` / ``relabel_step``: the block-wise seeded
   watershed of ``runtime.blockwise``, blocks aligned with the tiles' chunks;
3. ``finish_large``: OME-NGFF metadata written, ``_work`` removed, ``OUT.zarr.partial`` renamed
   to ``OUT.zarr`` (only a finished run has that name), in the kill-safe order of ``large_state``.

Resume: a step ends by writing its marker in ``_work/done/`` (a file renamed into place after
its data is written), and a rerun of the same command skips every step whose marker exists; a
step cut midway has none and is redone whole (its window is rewritten). Every step is idempotent:
it reads only the outputs of earlier stages, never its own.

Paths travel as absolute paths (a worker resolves nothing in its own directory). What a process
keeps between steps (the export's session, the merge map, the size table) is keyed by the run's
id and the export's manifest hash, so a worker that outlives a run never serves it to another.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import PeftExportError
from ..fsutil import zarr_named
from .large_checks import check_device, check_zarr_output, large_adapter, require_instance_decoder
from .large_state import is_done as _done
from .large_state import mark as _mark
from .large_state import marker as _marker  # noqa: F401 - the steps' markers, for callers
from .large_state import read_mark as _read_mark
from .large_state import work_dir as _work

WATERSHED_HALO = 64  # px: the watershed's first context around a block (grown to fit the objects)
WATERSHED_BLOCK = 1024  # px, rounded to whole tiles
# What a process keeps between steps. Sessions: one per export per process (a worker loads the
# export once), replaced when the export's content changes. Merge maps and size tables: per run.
_SESSIONS: Dict[tuple, Any] = {}
_MERGE: "OrderedDict[tuple, Any]" = OrderedDict()
_MERGE_RUNS = 8  # runs whose tables a process keeps (a folder's images run stage by stage together)


def session_for(job: Dict[str, Any]) -> Any:
    """This process's session of the job's export, opened on first use and again when the
    export's content (its manifest's sha256) is not what the run was planned with."""
    from ..runtime import SamSession
    from .large_state import manifest_sha256

    key = (job["export_dir"], job["precision"], job.get("threads"), job.get("device", "cpu"),
           job.get("backend", "onnxruntime"))
    digest, session = _SESSIONS.get(key, (None, None))
    if digest != job["manifest_sha256"]:
        if manifest_sha256(job["export_dir"]) != job["manifest_sha256"]:
            raise PeftExportError(f"{job['export_dir']}: manifest.json changed while this run was going on "
                                  "(re-exported?); run the command again with --overwrite")
        session = SamSession(job["export_dir"], backend=job.get("backend", "onnxruntime"),
                             device=job.get("device", "cpu"), precision=job["precision"],
                             intra_op_threads=job.get("threads"))
        _SESSIONS[key] = (job["manifest_sha256"], session)
    return session


def _run_cache(job: Dict[str, Any], what: str, make: Any) -> Any:
    """``make()`` once per run and process (keyed by the run's id, not its path)."""
    key = (job["partial"], job["run_id"], what)
    if key not in _MERGE:
        _MERGE[key] = make()
        while len({k[:2] for k in _MERGE}) > _MERGE_RUNS:
            _MERGE.popitem(last=False)
    _MERGE.move_to_end(key)
    return _MERGE[key]


def forget_run(job: Dict[str, Any]) -> None:
    """Drop what this process keeps for the job's output (its run has ended)."""
    for key in [k for k in _MERGE if k[0] == job["partial"]]:
        del _MERGE[key]


def _zarr(job: Dict[str, Any], name: str) -> Any:
    import zarr

    return zarr.open_array(str(Path(job["partial"]) / name), mode="r+")


def _grid(job: Dict[str, Any]):
    from ..runtime.tiling import TileGrid, TileSpec

    return TileGrid(tuple(job["shape"]), TileSpec(**job["spec"]))


def _blocks(job: Dict[str, Any]) -> List[tuple]:
    from ..runtime.blockwise import blocks

    return blocks(tuple(job["shape"]), job["block"])


def plan_large(export_dir: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike,
               tile: Optional[int] = None, halo: Optional[int] = None, scale: Optional[float] = None,
               instance_options: Optional[Dict[str, Any]] = None, precision: str = "fp32",
               overwrite: bool = False, threads: Optional[int] = None, block: Optional[int] = None,
               adapter: Optional[str] = None, device: str = "cpu", backend: str = "onnxruntime") -> Dict[str, Any]:
    """Check the inputs and lay out (or find, to resume) ``OUT.zarr.partial``; return the job.
    ``block``: the watershed's block (default ``WATERSHED_BLOCK``), rounded to whole tiles.
    ``adapter``: for an export of several, whose decoders and default tile (training scale) run.
    The job's ``resumed``: a stopped run goes on; ``finished``: its labels are complete and only
    the end (``finish_large``) remains."""
    from ..runtime import read_manifest
    from ..runtime.instances import check_ais_params, require_ais_packages
    from ..runtime.tiling import IntensityRange, TileGrid, tile_spec
    from .arrays import create_labels_group, open_image_array
    from .large_state import image_identity, manifest_sha256, new_layout, new_run_id, stopped_run, write_json_atomic

    check_zarr_output(Path(out))
    out = Path(os.path.abspath(out))  # workers get absolute paths: their own directory is not the client's
    export_dir, image = Path(os.path.abspath(export_dir)), Path(os.path.abspath(image))
    if out.suffix.lower() != ".zarr":
        raise PeftExportError(f"{out}: a large image's labels go to a zarr store; name it OUT.zarr")
    check_device(device)
    params = check_ais_params(dict(instance_options or {}))
    manifest = read_manifest(export_dir)
    require_instance_decoder(export_dir, manifest)
    require_ais_packages()
    adapter = large_adapter(export_dir, manifest, adapter)
    spec = tile_spec(manifest, tile, halo, scale, adapter)
    array = open_image_array(image)
    shape = (int(array.shape[0]), int(array.shape[1]))
    grid = TileGrid(shape, spec)
    step = max(shape) if grid.single else spec.step
    block = step * max(1, int(block or WATERSHED_BLOCK) // step)
    partial = out.with_name(out.name + ".partial")
    settings = {"export_dir": str(export_dir), "image": str(image), "shape": list(shape),
                "spec": {"tile": spec.tile, "halo": spec.halo, "image_size": spec.image_size},
                "params": params, "precision": precision, "block": block, "step": step, "adapter": adapter,
                "manifest_sha256": manifest_sha256(export_dir), "image_identity": image_identity(image)}
    job = {**settings, "out": str(out), "partial": str(partial), "threads": threads, "device": device,
           "backend": backend}
    found = stopped_run(out, partial, settings, overwrite)
    if found is not None:
        return {**job, **found}
    job.update(intensity=IntensityRange(array, manifest["preprocessing"].get("intensity")).record(),
               run_id=new_run_id())
    import zarr

    with new_layout(out, partial) as layout:
        create_labels_group(layout, shape, block, out.stem, str(image))
        work = zarr.open_group(str(layout / "_work"), mode="w", zarr_format=2)
        mchunk = (1, step, step)
        work.create_array("maps", shape=(3, *shape), chunks=mchunk, dtype="float32", fill_value=0)
        work.create_array("seeds", shape=shape, chunks=(block, block), dtype="int64", fill_value=0)
        work.create_array("ws", shape=shape, chunks=(block, block), dtype="uint32", fill_value=0)
        (layout / "_work" / "done").mkdir()
        write_json_atomic(layout / "run.json", {k: job[k] for k in (*settings, "intensity", "run_id")})
    return {**job, "resumed": False, "finished": False}


def tile_step(job: Dict[str, Any], k: int) -> None:
    """Encoder + instance decoder on tile ``k``; its inner area of the maps written."""
    from ..runtime.tiled import TiledImage
    from ..runtime.tiling import IntensityRange, TileSpec
    from .arrays import open_image_array

    name = f"tile_{k}"
    if _done(job, name):
        return
    session = session_for(job)
    tiled = TiledImage(session, open_image_array(job["image"]), TileSpec(**job["spec"]), adapter=job.get("adapter"),
                       cache=1, intensity=IntensityRange.from_record(job["intensity"]))
    tile = tiled.grid.tiles[k]
    y0, y1, x0, x1 = tile.inner
    _zarr(job, "_work/maps")[:, y0:y1, x0:x1] = tiled.tile_maps(tile)
    _mark(job, name)


def seed_step(job: Dict[str, Any], k: int) -> int:
    from ..runtime.blockwise import seed_block

    name = f"seeds_{k}"
    if not _done(job, name):
        n = seed_block(_zarr(job, "_work/maps"), _zarr(job, "_work/seeds"), _blocks(job)[k], k, job["block"],
                       WATERSHED_HALO, job["params"])
        _mark(job, name, n)
    return int(_read_mark(job, name))


def merge_step(job: Dict[str, Any]) -> None:
    """Seeds touching across block faces merged (connected components); the id map saved."""
    from ..runtime.blockwise import face_pairs, merge_seeds

    path = _work(job) / "merge.npz"
    if _done(job, "merge"):
        return
    counts = [int(_read_mark(job, f"seeds_{k}")) for k in range(len(_blocks(job)))]
    keys, merged = merge_seeds(counts, job["block"], face_pairs(_zarr(job, "_work/seeds"), tuple(job["shape"]),
                                                                job["block"]))
    tmp = path.with_name(f".merge.tmp{os.getpid()}.npz")
    np.savez(tmp, keys=keys, merged=merged)
    os.replace(tmp, path)
    _mark(job, "merge")


def _merge_map(job: Dict[str, Any]):
    def load():
        with np.load(_work(job) / "merge.npz") as f:
            return f["keys"], f["merged"]

    return _run_cache(job, "merge", load)


def watershed_step(job: Dict[str, Any], k: int) -> None:
    from ..runtime.blockwise import watershed_block

    name = f"ws_{k}"
    if _done(job, name):
        return
    keys, merged = _merge_map(job)
    counts, context, whole = watershed_block(_zarr(job, "_work/maps"), _zarr(job, "_work/seeds"),
                                             _zarr(job, "_work/ws"), _blocks(job)[k], WATERSHED_HALO, job["params"],
                                             keys, merged)
    _mark(job, name, {"counts": counts.tolist(), "context": int(context), "whole": bool(whole)})


def _ws_counts(job: Dict[str, Any], i: int) -> np.ndarray:
    return np.asarray(_read_mark(job, f"ws_{i}")["counts"], np.int64).reshape(2, -1)


def relabel_step(job: Dict[str, Any], k: int) -> int:
    """Objects under min_size removed, ids consecutive; block ``k`` written into the labels."""
    from ..runtime.blockwise import size_filter

    name = f"relabel_{k}"
    if not _done(job, name):
        new_ids = _run_cache(job, "sizes", lambda: size_filter(
            [_ws_counts(job, i) for i in range(len(_blocks(job)))], int(job["params"]["min_size"])))
        y0, y1, x0, x1 = _blocks(job)[k]
        lab = new_ids[np.asarray(_zarr(job, "_work/ws")[y0:y1, x0:x1]).astype(np.int64)]
        _zarr(job, "0")[y0:y1, x0:x1] = lab.astype(np.uint32)
        _mark(job, name, int(lab.max()) if lab.size else 0)
    return int(_read_mark(job, name))


def _record(job: Dict[str, Any]) -> Dict[str, Any]:
    """The run's record, from the steps' markers."""
    nb = len(_blocks(job))
    n = max((int(_read_mark(job, f"relabel_{k}")) for k in range(nb)), default=0)
    ws = [_read_mark(job, f"ws_{k}") for k in range(nb)]
    return {"image": job["image"], "shape": job["shape"], "mode": "instances", "tiled": True,
            "tile": job["spec"]["tile"], "halo": job["spec"]["halo"],
            "scale": job["spec"]["image_size"] / job["spec"]["tile"], "tiles": len(_grid(job)),
            "options": job["params"], "device": job["device"], "n_objects": n, "outputs": {"labels": job["out"]},
            "watershed": {"block": job["block"], "largest_context": max(w["context"] for w in ws),
                          "blocks_at_context_limit": sum(not w["whole"] for w in ws)}}


def finish_large(job: Dict[str, Any]) -> Dict[str, Any]:
    """Metadata, scratch removed, ``OUT.zarr.partial`` renamed to ``OUT.zarr`` (in the order of
    ``large_state.finish``, which a rerun completes from wherever a stop cut it); the run's record."""
    from .large_state import finish

    record = finish(job, lambda: _record(job))
    forget_run(job)
    return record


def stages(job: Dict[str, Any]) -> List[tuple]:
    """(name, step function, number of indices) in order; ``merge`` runs once. None for a run
    whose labels are complete (``finished``: only its end remains)."""
    if job.get("finished"):
        return []
    nb = len(_blocks(job))
    return [("tiles", tile_step, len(_grid(job))), ("seeds", seed_step, nb), ("merge", merge_step, 0),
            ("watershed", watershed_step, nb), ("labels", relabel_step, nb)]


def total_steps(job: Dict[str, Any], stages: Any = stages) -> int:
    """The number of steps of the job (``stages``: another kind of job's, e.g. a volume's)."""
    return sum(max(n, 1) for _, _, n in stages(job))


def run_large(job: Dict[str, Any], progress: bool = False) -> Dict[str, Any]:
    """Every step in this process (skipping those a stopped run finished), then ``finish_large``."""
    from tqdm import tqdm

    for name, step, n in stages(job):
        if n == 0:
            step(job)
            continue
        for k in tqdm(range(n), desc=name, unit="tile" if name == "tiles" else "block", disable=not progress):
            step(job, k)
    return finish_large(job)


IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")


def expand_inputs(paths: List[str | os.PathLike]) -> List[Path]:
    """Image files and zarr stores; a folder that is not a zarr store gives its images (sorted)."""
    from .arrays import is_zarr

    found: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not is_zarr(p):
            inside = sorted(q for q in p.iterdir() if (q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
                            or (zarr_named(q) and is_zarr(q)))
            if not inside:
                raise PeftExportError(f"{p}: a folder without images ({', '.join(IMAGE_SUFFIXES)} or .zarr)")
            found += inside
        else:
            found.append(p)
    return found


def plan_large_images(export_dir: str | os.PathLike, images: List[str | os.PathLike], out: str | os.PathLike,
                      **options: Any) -> List[Dict[str, Any]]:
    """One job per image, every one checked before any is laid out: ``out`` is OUT.zarr for one
    image, else a folder that gets ``<stem>_labels.zarr`` per image."""
    from ..data.io import file_stem

    resume = bool(options.pop("resume", False))
    files, out = expand_inputs(images), Path(out)
    check_zarr_output(out)
    if zarr_named(out) and len(files) != 1:
        raise PeftExportError(f"{out}: one .zarr output holds one image's labels; give an output folder for "
                              f"{len(files)} images")
    stems = [f.stem if zarr_named(f) else file_stem(f) for f in files]
    targets = [out] if zarr_named(out) else [out / f"{stem}_labels.zarr" for stem in stems]
    if len(set(targets)) != len(targets):
        raise PeftExportError(f"{out}: two images have the same name; their outputs would collide")
    if out.suffix.lower() != ".zarr" and out.exists() and not out.is_dir():
        raise PeftExportError(f"{out}: exists and is not a directory")
    from .arrays import open_image_array
    from .large_state import leftover_of_finished_run

    todo = []
    for f, t in zip(files, targets):  # every input checked (opens as an image, output free) first
        open_image_array(f)
        complete = t.exists() and leftover_of_finished_run(t) is None  # else plan_large finishes its clean-up
        if complete and resume and not options.get("overwrite"):
            continue  # finished: only a complete run has the final name
        if complete and not options.get("overwrite"):
            raise PeftExportError(f"{t}: already exists (pass --overwrite to replace it, or --resume to skip "
                                  "finished images)")
        todo.append((f, t))
    if out.suffix.lower() != ".zarr":
        out.mkdir(parents=True, exist_ok=True)
    return [plan_large(export_dir, f, t, **options) for f, t in todo]
