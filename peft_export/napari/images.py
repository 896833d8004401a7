"""The image the model sees: the current 2D plane of a napari Image layer.

A 2D gray or RGB(A) layer is its own plane; a z-stack or time series (any leading axes)
gives the plane at the viewer's current position. Multiscale layers use their full
resolution level. The plane goes to ``SamSession.encode`` as it is: any dtype the runtime
accepts, normalised by the export's own intensity rule.

``lazy_plane`` reads no pixels: a zarr or dask layer (a whole-slide OME-Zarr) is read in the
worker that needs it, and only the part it needs (``SamSession.tiled`` reads a strided sample
for the intensity statistics, then one tile at a time).
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np

from ..errors import PeftExportError


def leading_axes(layer: Any) -> int:
    """How many non-spatial axes (z, t, ...) lie before the image rows and columns."""
    return int(layer.ndim) - 2


def current_index(layer: Any, world_point: Sequence[float]) -> Tuple[int, ...]:
    """The layer's leading-axis indices at the viewer's world position (scale/translate applied)."""
    n = leading_axes(layer)
    if n <= 0:
        return ()
    data = layer.data[0] if layer.multiscale else layer.data
    pos = np.asarray(layer.world_to_data(np.asarray(world_point, dtype=np.float64)))[:n]
    return tuple(int(np.clip(round(float(p)), 0, s - 1)) for p, s in zip(pos, data.shape[:n]))


class PlaneView:
    """One plane of an array-like (numpy, zarr, dask) at leading ``index``, read only where indexed."""

    def __init__(self, data: Any, index: Tuple[int, ...]) -> None:
        self.data, self.index = data, tuple(int(i) for i in index)
        self.shape = tuple(int(s) for s in data.shape[len(self.index):])
        self.dtype = np.dtype(data.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        return np.asarray(self.data[self.index + key])

    def read(self) -> np.ndarray:
        """The whole plane as a numpy array (for a plane that fits the model input)."""
        return self[...]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        plane = self.read()
        return plane if dtype is None else plane.astype(dtype, copy=False)


def lazy_plane(layer: Any, index: Tuple[int, ...]) -> PlaneView:
    """The (H, W) or (H, W, 3/4) plane of ``layer`` at leading ``index``, full resolution, unread."""
    if layer.ndim < 2:
        raise PeftExportError(f"image layer '{layer.name}': needs at least 2 spatial axes, has {layer.ndim}")
    plane = PlaneView(layer.data[0] if layer.multiscale else layer.data, index)
    if plane.ndim == 3 and not (layer.rgb and plane.shape[-1] in (3, 4)):
        raise PeftExportError(f"image layer '{layer.name}': plane of shape {plane.shape} is not 2D gray or RGB")
    if plane.ndim not in (2, 3):
        raise PeftExportError(f"image layer '{layer.name}': plane of shape {plane.shape} is not 2D gray or RGB")
    return plane


def check_displayed(layer: Any, viewer: Any) -> None:
    """The widget prompts on the plane napari shows: a 2D view of the layer's last two axes."""
    if viewer.dims.ndisplay != 2:
        raise PeftExportError("viewer: switch to the 2D view to segment (prompts are placed on a 2D slice)")
    displayed = tuple(viewer.dims.displayed)
    ndim = viewer.dims.ndim
    if displayed != (ndim - 2, ndim - 1):
        raise PeftExportError(f"viewer: the displayed axes {displayed} are not the image's rows and columns; "
                              "reset the axis order (the 'roll'/'transpose' buttons) to segment")
