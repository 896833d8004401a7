"""The Cell Tracking Challenge's track files: one ``L B E P`` line per track (label, first frame,
last frame, parent label or 0), as in ``res_track.txt`` and ``man_track.txt``."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import PeftExportError
from ..fsutil import atomic_file

Lineage = list[tuple[int, int, int, int]]


def write_ctc_tracks(path: str | os.PathLike, lineage: Lineage, overwrite: bool = False) -> Path:
    """Write ``lineage`` (id, first frame, last frame, parent or 0) as a CTC track file."""
    with atomic_file(path, overwrite) as tmp:
        tmp.write_text("".join(f"{k} {a} {b} {p}\n" for k, a, b, p in lineage))
    return Path(path)


def read_ctc_tracks(path: str | os.PathLike) -> Lineage:
    """A CTC track file as (id, first frame, last frame, parent) tuples; bad lines are refused."""
    path = Path(path)
    if not path.is_file():
        raise PeftExportError(f"{path}: no such track file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            k, a, b, p = (int(v) for v in parts)
        except ValueError:
            raise PeftExportError(f"{path}:{n}: expected 'label first last parent' (4 whole numbers), got "
                                  f"{line.strip()!r}") from None
        if k < 1 or a < 0 or b < a or p < 0:
            raise PeftExportError(f"{path}:{n}: {line.strip()!r} is not a valid track (label >= 1, "
                                  "0 <= first <= last, parent >= 0)")
        out.append((k, a, b, p))
    return out
