"""Atomic file and directory writes: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import PeftExportError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_can_write(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing output unless told to overwrite; check the parent is writable."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise PeftExportError(f"{path}: already exists (pass --overwrite to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise PeftExportError(f"{parent}: output directory does not exist")
    if not os.access(parent, os.W_OK):
        raise PeftExportError(f"{parent}: output directory is not writable")
    return path


@contextlib.contextmanager
def output_dir(path: str | os.PathLike | None) -> Iterator[Path | None]:
    """Create the output directory ``path`` if missing; if the block fails and the directory it
    created is still empty, remove it again (a refused command leaves nothing behind)."""
    if path is None:
        yield None
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PeftExportError(f"{path}: exists and is not a directory")
    made = []  # the directories this call creates, innermost first
    missing = path
    while not missing.exists():
        made.append(missing)
        missing = missing.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for d in made:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = check_can_write(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` only on success.

    A non-empty existing ``path`` is refused unless ``overwrite``; on failure the
    temporary directory is removed and ``path`` is left exactly as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PeftExportError(f"{path}: exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise PeftExportError(f"{path}: directory exists and is not empty (pass --overwrite to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise PeftExportError(f"{parent}: output directory is not writable")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        if path.exists():
            old = parent / f".{path.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
