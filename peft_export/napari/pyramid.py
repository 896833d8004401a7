"""Result labels of images too large for a full-size int32 array: a multiscale Labels layer whose
levels are chunked zarr arrays in memory.

A whole-slide image of 20000 x 20000 px would need 1.6 GB per int32 labels layer, and napari would
draw a non-multiscale layer of that size from its whole plane. Here only the chunks an object
touches are stored (compressed), and napari draws the level that fits the screen. Level 0 is
the image's full resolution; each further level halves the rows and columns (nearest pixel)
until the longest side is at most ``SMALLEST_LEVEL``. Writes go to level 0 and are copied down
to the region they touch on every other level.
"""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np

LARGE_LABELS_BYTES = 256 << 20  # a full int32 result layer larger than this is lazily backed
CHUNK = 1024
SMALLEST_LEVEL = 2048


def needs_pyramid(shape: Sequence[int]) -> bool:
    """Whether an int32 labels array of ``shape`` is too large to keep whole in memory."""
    return int(np.prod(shape, dtype=np.int64)) * 4 > LARGE_LABELS_BYTES


def level_shapes(shape: Sequence[int]) -> List[Tuple[int, ...]]:
    """Full resolution, then the rows and columns halved (rounded up) down to ``SMALLEST_LEVEL``."""
    shapes = [tuple(int(s) for s in shape)]
    while max(shapes[-1][-2:]) > SMALLEST_LEVEL:
        *lead, h, w = shapes[-1]
        shapes.append((*lead, (h + 1) // 2, (w + 1) // 2))
    return shapes


def empty_pyramid(shape: Sequence[int]) -> List[Any]:
    """Zero int32 zarr arrays (in memory, chunks of ``CHUNK`` px per plane) for napari's multiscale Labels."""
    import zarr
    from zarr.storage import MemoryStore

    group = zarr.open_group(store=MemoryStore(), mode="w")
    return [group.create_array(str(k), shape=s, dtype="int32", fill_value=0,
                               chunks=(1,) * (len(s) - 2) + tuple(min(CHUNK, n) for n in s[-2:]))
            for k, s in enumerate(level_shapes(shape))]


def _sources(start: int, stop: int, full: int, level: int) -> Tuple[int, int, np.ndarray]:
    """Rows ``start:stop`` of a level of ``level`` rows: (first, last) touched on that level and
    the full-resolution rows they sample (nearest pixel)."""
    factor = full / level
    first, last = int(start // factor), min(level, int(np.ceil(stop / factor)))
    rows = np.minimum((np.arange(first, last) * factor).astype(np.int64), full - 1)
    return first, last, rows


def write_window(levels: Sequence[Any], index: Tuple[int, ...], window: Tuple[int, int, int, int],
                 values: np.ndarray, where: np.ndarray | None = None) -> None:
    """Write ``values`` ((y1-y0) x (x1-x0)) into plane ``index`` of level 0 at ``window`` (only where
    ``where`` is True, if given), then refresh the region it covers on the other levels."""
    y0, y1, x0, x1 = window
    base = levels[0]
    if where is None:
        base[index + (slice(y0, y1), slice(x0, x1))] = values
    else:
        region = np.asarray(base[index + (slice(y0, y1), slice(x0, x1))])
        region[where] = values[where]
        base[index + (slice(y0, y1), slice(x0, x1))] = region
    full_h, full_w = base.shape[-2:]
    for level in levels[1:]:
        h, w = level.shape[-2:]
        r0, r1, rows = _sources(y0, y1, full_h, h)
        c0, c1, cols = _sources(x0, x1, full_w, w)
        if r1 <= r0 or c1 <= c0:
            continue
        source = np.asarray(base[index + (slice(int(rows[0]), int(rows[-1]) + 1),
                                          slice(int(cols[0]), int(cols[-1]) + 1))])
        level[index + (slice(r0, r1), slice(c0, c1))] = source[np.ix_(rows - rows[0], cols - cols[0])]
