"""Atomic file and directory writes: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import PeftExportError


def zarr_named(path: str | os.PathLike) -> bool:
    """Whether a path is named as a zarr store (``.zarr``, any case): such an output is written as zarr."""
    return Path(path).suffix.lower() == ".zarr"


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


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(mask)
    return mask


def _share_like_a_normal_file(path: Path, replaces: Path) -> None:
    """Give ``path`` the mode ``open()`` would have: the replaced file's mode if there is one,
    else 0666 minus the umask (mkstemp and some writers use 0600, unreadable by a lab's group)."""
    if replaces.exists():
        mode = stat.S_IMODE(replaces.stat().st_mode)
    else:
        mode = 0o666 & ~current_umask()
    os.chmod(path, mode)


def _share_tree(tmp: Path, replaces: Path) -> None:
    """Directories 0777 and files 0666 (keeping execute bits) minus the umask, as mkdir/open
    make them; the top directory keeps the mode of the one it replaces."""
    umask = current_umask()
    for root, dirs, files in os.walk(tmp):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, (0o666 | (os.stat(p).st_mode & 0o111)) & ~umask)
    os.chmod(tmp, stat.S_IMODE(replaces.stat().st_mode) if replaces.is_dir() else 0o777 & ~umask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The result has the mode a plain ``open()`` would give it (umask, or the replaced file's mode).
    """
    path = check_can_write(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _share_like_a_normal_file(tmp, path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the OS or file system cannot (then nothing was changed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, other libc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _old_name(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def recover_replacement(path: str | os.PathLike) -> str | None:
    """Finish or undo a directory replacement that a killed process left half done.

    Only the fallback of ``atomic_dir`` (no atomic exchange) has a window, between renaming the
    old directory aside and the new one into place: then ``path`` is missing and ``.<name>.old``
    holds the complete old directory, which is put back. Returns what was done, or None.
    """
    path = Path(path)
    old = _old_name(path)
    if not old.is_dir():
        return None
    if path.exists():  # killed after the new one was in place: the old one is garbage
        shutil.rmtree(old, ignore_errors=True)
        return f"removed {old} left by an interrupted replacement"
    os.replace(old, path)
    return f"restored {path} from {old} (a replacement of it was interrupted)"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` only on success.

    A non-empty existing ``path`` is refused unless ``overwrite``; on failure the temporary
    directory is removed and ``path`` is left exactly as it was. An existing ``path`` is swapped
    with the new directory in one atomic step, so readers always find the old or the new one
    complete. Where the file system cannot swap atomically, the old one is renamed aside first:
    a process killed between the two renames leaves ``.<name>.old``, which the next
    ``atomic_dir`` on ``path`` puts back (``recover_replacement``).
    """
    path = Path(path)
    recover_replacement(path)
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
        _share_tree(tmp, path)
        if not path.exists():
            os.replace(tmp, path)
        elif exchange_paths(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old directory
        else:
            old = _old_name(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
