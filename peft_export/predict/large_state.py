"""The on-disk state of a large-image run (``predict.large``; a volume's slab-by-slab run,
``volume.slabs``, uses the same): what it is, how far it got, and how it ends, so that a run
stopped at any point (Ctrl-C, a crash, a killed node) is resumed or finished by running the same
command again.

Identity: ``run.json`` records the run's id (a new one per started run: workers key their
caches by it), the export's content (sha256 of its ``manifest.json``, which lists every graph's
sha256) and the image's identity (``image_identity``: a file's size and mtime, a zarr store's
metadata files' digest). A rerun whose export or image changed since is refused, never mixed in.

Progress: a step ends by renaming its marker into ``_work/done/`` after its data is written.

The end (``finish``), in an order where a kill between any two steps leaves a state the next run
recognises and completes (``finished`` in ``run.json`` means: the labels are complete):

1. the OME-NGFF metadata and the run's record written into the labels group (idempotent);
2. ``run.json`` rewritten with ``"finished": record`` (atomic);
3. ``_work`` removed;
4. an existing ``OUT.zarr`` (``--overwrite``) renamed to ``.OUT.zarr.replaced``;
5. ``OUT.zarr.partial`` renamed to ``OUT.zarr``: the result appears whole;
6. ``.OUT.zarr.replaced`` removed;
7. ``run.json`` removed from ``OUT.zarr``.

A rerun finds: a partial whose ``run.json`` is finished (killed in 3-4, or 5 not reached): it
goes on from 3; no partial but ``OUT.zarr/run.json`` (killed in 6-7): it does 6 and 7.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from ..errors import PeftExportError
from ..fsutil import sha256_file

ZARR_METADATA = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")


def new_run_id() -> str:
    return uuid.uuid4().hex


def manifest_sha256(export_dir: str | os.PathLike) -> str:
    """The export's content: manifest.json lists every graph file's sha256."""
    return sha256_file(Path(export_dir) / "manifest.json")


def image_identity(path: str | os.PathLike) -> Dict[str, Any]:
    """What tells an image apart from one written over it: a file's size and mtime; a zarr
    store's metadata files (content and mtime, every group and array) as one digest."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = hashlib.sha256()

    def visit(d: Path) -> None:
        names = sorted(e.name for e in os.scandir(d))
        for name in names:
            if name in ZARR_METADATA:
                f = d / name
                digest.update(f"{f.relative_to(path)}:{f.stat().st_mtime_ns}:".encode())
                digest.update(f.read_bytes())
        is_array = ".zarray" in names or ('"array"' in (d / "zarr.json").read_text() if "zarr.json" in names else False)
        if not is_array:  # a group: its members (an array's own folders hold chunks only)
            for name in names:
                if (d / name).is_dir():
                    visit(d / name)

    visit(path)
    return {"metadata_sha256": digest.hexdigest()}


def read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PeftExportError(f"{path}: damaged ({type(e).__name__}); delete it to start the run again") from None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def check_same_run(partial: Path, before: Dict[str, Any], settings: Dict[str, Any], what: str = "image") -> None:
    """Refuse to resume a stopped run whose export, input (``what``: image, volume) or settings
    differ from this command's."""
    again = "delete it or pass --overwrite to start again"
    if before.get("manifest_sha256") != settings["manifest_sha256"]:
        raise PeftExportError(f"{partial}: a stopped run of another export (the manifest.json of "
                              f"{settings['export_dir']} changed since: re-exported?); {again}")
    if before.get("image_identity") != settings["image_identity"]:
        raise PeftExportError(f"{partial}: a stopped run whose {what} {settings['image']} has changed since "
                              f"(size, modification time or zarr metadata); {again}")
    if {k: before.get(k) for k in settings} != json.loads(json.dumps(settings)):  # as run.json holds them
        raise PeftExportError(f"{partial}: a stopped run with other settings ({what}, tile, options); {again}")


def stopped_run(out: Path, partial: Path, settings: Dict[str, Any], overwrite: bool = False,
                what: str = "image") -> Optional[Dict[str, Any]]:
    """What a run of ``settings`` into ``out`` goes on from: a stopped run's intensity, run id and
    state (``resumed``; ``finished``: only the end remains), or None when a new run is laid out
    (none stopped, or ``overwrite``). Refuses a ``partial`` that is not ours, a stopped run of
    other settings (``check_same_run``) and a finished ``out`` (without ``overwrite``)."""
    if partial.exists() and not (partial / "run.json").is_file():
        raise PeftExportError(f"{partial}: exists and is not a stopped run of peftexport; move it away")
    if overwrite:
        return None
    if (partial / "run.json").is_file():
        before = read_json(partial / "run.json")
        check_same_run(partial, before, settings, what)
        return {"intensity": before["intensity"], "run_id": before["run_id"], "resumed": True,
                "finished": bool(before.get("finished"))}
    leftover = leftover_of_finished_run(out)
    if leftover is not None:  # stopped in the last clean-up steps: the result is complete
        return {"intensity": leftover["intensity"], "run_id": leftover["run_id"], "resumed": True, "finished": True}
    if out.exists():
        raise PeftExportError(f"{out}: already exists (pass --overwrite to replace it)")
    return None


@contextlib.contextmanager
def new_layout(out: Path, partial: Path) -> Iterator[Path]:
    """A new run's ``partial``, laid out whole under a temporary name and renamed into place
    (a kill midway leaves no half-made ``partial``; the next run removes the temporary one).
    What an earlier run left (its partial, a replaced result) is removed first."""
    if partial.exists():
        shutil.rmtree(partial)
    shutil.rmtree(replaced_name(out), ignore_errors=True)  # an earlier replacement's leftover
    for stale in out.parent.glob(f".{out.name}.partial.tmp*"):  # a layout a kill cut short
        shutil.rmtree(stale, ignore_errors=True)
    layout = out.with_name(f".{out.name}.partial.tmp{os.getpid()}")
    try:
        yield layout
        os.replace(layout, partial)
    finally:
        shutil.rmtree(layout, ignore_errors=True)


# ---- markers -------------------------------------------------------------------------------


def work_dir(job: Dict[str, Any]) -> Path:
    return Path(job["partial"]) / "_work"


def marker(job: Dict[str, Any], name: str) -> Path:
    return work_dir(job) / "done" / name


def is_done(job: Dict[str, Any], name: str) -> bool:
    return marker(job, name).is_file()


def mark(job: Dict[str, Any], name: str, payload: Any = None) -> None:
    write_json_atomic(marker(job, name), payload)


def read_mark(job: Dict[str, Any], name: str) -> Any:
    return json.loads(marker(job, name).read_text())


def steps_done(job: Dict[str, Any]) -> int:
    """How many steps of the run have their marker (a finished run: all)."""
    done = work_dir(job) / "done"
    return sum(1 for p in done.iterdir() if not p.name.startswith(".")) if done.is_dir() else 0


# ---- the end ---------------------------------------------------------------------------------


def replaced_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.replaced")


def finish_steps(job: Dict[str, Any], make_record: Callable[[], Dict[str, Any]],
                 metadata: Optional[Callable[[Any, str, str], None]] = None) -> List[Callable[[], None]]:
    """The steps of the end in order (module docstring), each safe to repeat; ``make_record``
    reads the steps' markers (only called while they exist); ``metadata(group, name, source)``
    writes the labels' OME-NGFF metadata (default: a 2D image's, ``arrays.finish_labels``)."""
    from .arrays import finish_labels

    metadata = metadata or finish_labels

    partial, out = Path(job["partial"]), Path(job["out"])
    state: Dict[str, Any] = {}

    def record() -> Dict[str, Any]:
        if "record" not in state:
            before = read_json(partial / "run.json")
            state["record"] = before.get("finished") or make_record()
        return state["record"]

    def write_metadata() -> None:
        import zarr

        group = zarr.open_group(str(partial), mode="r+")
        metadata(group, out.stem, job["image"])
        group.attrs["peftexport"] = record()
        for pattern in (".z*.partial", ".run.json.tmp*"):  # temporary files (zarr's, ours) a kill left
            for tmp in partial.glob(pattern):
                tmp.unlink()

    def flag_finished() -> None:
        write_json_atomic(partial / "run.json", {**read_json(partial / "run.json"), "finished": record()})

    def drop_work() -> None:
        shutil.rmtree(partial / "_work", ignore_errors=True)

    def move_old_aside() -> None:
        if out.exists():
            shutil.rmtree(replaced_name(out), ignore_errors=True)
            os.replace(out, replaced_name(out))

    def publish() -> None:
        os.replace(partial, out)

    def drop_old() -> None:
        shutil.rmtree(replaced_name(out), ignore_errors=True)

    def drop_run_json() -> None:
        (out / "run.json").unlink(missing_ok=True)

    return [write_metadata, flag_finished, drop_work, move_old_aside, publish, drop_old, drop_run_json]


def finish(job: Dict[str, Any], make_record: Callable[[], Dict[str, Any]],
           metadata: Optional[Callable[[Any, str, str], None]] = None) -> Dict[str, Any]:
    """Run the end's steps that remain (from where a stopped run left off); the run's record.
    ``metadata``: as ``finish_steps``'s (a volume's labels pass their own)."""
    partial, out = Path(job["partial"]), Path(job["out"])
    steps = finish_steps(job, make_record, metadata)
    if partial.is_dir():
        todo = steps
    elif (out / "run.json").is_file():  # renamed into place, clean-up cut short
        todo = steps[5:]
    else:
        raise PeftExportError(f"{partial}: missing; the run's work is gone (was it deleted?); run again")
    for step in todo:
        step()
    return finished_record(out)


def finished_record(out: Path) -> Dict[str, Any]:
    import zarr

    return dict(zarr.open_group(str(out), mode="r").attrs["peftexport"])


def leftover_of_finished_run(out: Path) -> Optional[Dict[str, Any]]:
    """``OUT.zarr``'s run.json when a run was stopped in its last clean-up steps (else None)."""
    path = out / "run.json"
    if not path.is_file():
        return None
    before = read_json(path)
    return before if before.get("finished") else None
