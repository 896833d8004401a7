"""The layers the widget works with, found by name or created to match the image layer:

- "point prompts" (Points): green = positive, red = negative (``positive`` feature);
- "box prompts" (Shapes): rectangles; the last one on the slice is the object's box;
- "current object" (Labels, 2D): the mask of the prompts being placed, covering only the window
  it was decoded in (the whole image, or on a large image the prompts' tile), placed there by
  its translation: a click never makes a full-size array;
- "<image> objects" (Labels): committed objects, one id each;
- "<image> automatic" (Labels): the result of "Segment all".

Prompt and result layers share the image layer's scale and translation, so their data
coordinates are the image's pixel coordinates. A result layer whose int32 array would be larger
than ``pyramid.LARGE_LABELS_BYTES`` is a multiscale layer of chunked zarr arrays in memory
(``pyramid``); ``paint`` and ``write_plane`` write either kind.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import numpy as np
from napari.layers import Labels, Points, Shapes

from . import pyramid

POINTS, BOXES, CURRENT = "point prompts", "box prompts", "current object"
POLARITY_COLORS = {True: "limegreen", False: "red"}


def image_shape(image: Any) -> Tuple[int, ...]:
    """The image layer's shape without its RGB(A) channel axis (full resolution)."""
    data = image.data[0] if image.multiscale else image.data
    return tuple(data.shape[:-1] if image.rgb else data.shape)


def _find(viewer: Any, name: str, kind: type) -> Any:
    for layer in viewer.layers:
        if layer.name == name and isinstance(layer, kind):
            return layer
    return None


def _placement(image: Any, last: int = 0) -> dict:
    scale, translate = np.asarray(image.scale), np.asarray(image.translate)
    if last:
        scale, translate = scale[-last:], translate[-last:]
    return {"scale": scale, "translate": translate}


def _matches(layer: Any, image: Any, ndim: int, last: int = 0) -> bool:
    place = _placement(image, last)
    return (layer is not None and layer.ndim == ndim and np.allclose(layer.scale, place["scale"])
            and np.allclose(layer.translate, place["translate"]))


def _reuse(viewer: Any, name: str, kind: type, fits: Callable[[Any], bool], make: Callable[[], Any]) -> Any:
    """The layer ``name`` if it still fits the image, else a new one from ``make`` (the misfit removed)."""
    layer = _find(viewer, name, kind)
    if layer is not None and fits(layer):
        return layer
    if layer is not None:
        viewer.layers.remove(layer)
    return make()


def points_layer(viewer: Any, image: Any) -> Points:
    return _reuse(viewer, POINTS, Points, lambda layer: _matches(layer, image, image.ndim), lambda: viewer.add_points(
        np.zeros((0, image.ndim)), name=POINTS, ndim=image.ndim, size=max(image_shape(image)[-2:]) / 60,
        features={"positive": np.zeros(0, bool)}, feature_defaults={"positive": True},
        face_color="positive", face_color_cycle=POLARITY_COLORS, border_color="white", **_placement(image)))


def boxes_layer(viewer: Any, image: Any) -> Shapes:
    return _reuse(viewer, BOXES, Shapes, lambda layer: _matches(layer, image, image.ndim), lambda: viewer.add_shapes(
        ndim=image.ndim, name=BOXES, face_color="transparent", edge_color="yellow",
        edge_width=max(image_shape(image)[-2:]) / 300, **_placement(image)))


def current_layer(viewer: Any, image: Any) -> Labels:
    """2D: napari shows it on every slice; the widget clears it when the slice changes."""
    return _reuse(viewer, CURRENT, Labels, lambda layer: layer.ndim == 2 and np.allclose(
        layer.scale, _placement(image, 2)["scale"]), lambda: viewer.add_labels(
        np.zeros((1, 1), np.uint8), name=CURRENT, opacity=0.6, **_placement(image, 2)))


def show_mask(layer: Labels, image: Any, mask: Optional[np.ndarray], window: Tuple[int, int, int, int]) -> None:
    """Show ``mask`` (the window's rows and columns) at ``window`` (y0, y1, x0, x1) of the image;
    None clears the layer."""
    if mask is None:
        if layer.data.any():
            layer.data = np.zeros_like(layer.data)
        return
    place = _placement(image, 2)
    translate = place["translate"] + np.array(window[::2], np.float64) * place["scale"]
    if not np.allclose(layer.translate, translate):
        layer.translate = translate
    layer.data = mask.astype(np.uint8)


def shown_window(layer: Labels, image: Any) -> Tuple[int, int, int, int]:
    """The (y0, y1, x0, x1) window of the image that ``layer`` (the current object) covers."""
    place = _placement(image, 2)
    y0, x0 = np.round((np.asarray(layer.translate) - place["translate"]) / place["scale"]).astype(int)
    h, w = layer.data.shape
    return int(y0), int(y0) + h, int(x0), int(x0) + w


def result_layer(viewer: Any, image: Any, kind: str, metadata: dict) -> Labels:
    """The image's "objects" or "automatic" Labels layer (created empty, int32, full image shape;
    lazily backed when large), kept below the prompt layers so that they stay visible."""
    name = f"{image.name} {kind}"
    shape = image_shape(image)
    layer = _find(viewer, name, Labels)
    if _matches(layer, image, len(shape)) and tuple(layer.data.shape) == shape:
        layer.metadata = {**layer.metadata, **metadata}
        return layer
    if pyramid.needs_pyramid(shape):
        layer = viewer.add_labels(pyramid.empty_pyramid(shape), multiscale=True, name=name,
                                  metadata=dict(metadata), **_placement(image))
    else:
        layer = viewer.add_labels(np.zeros(shape, np.int32), name=name, metadata=dict(metadata), **_placement(image))
    prompts = [i for i, l in enumerate(viewer.layers) if l.name in (POINTS, BOXES, CURRENT)]
    if prompts:
        viewer.layers.move(viewer.layers.index(layer), min(prompts))
    return layer


def paint(layer: Labels, index: Tuple[int, ...], window: Tuple[int, int, int, int], mask: np.ndarray,
          value: int) -> None:
    """Label ``value`` where ``mask`` (the window's pixels) is set, over earlier labels."""
    y0, y1, x0, x1 = window
    if layer.multiscale:
        pyramid.write_window(list(layer.data), tuple(index), window, np.full(mask.shape, value, np.int32), mask)
    else:
        layer.data[tuple(index) + (slice(y0, y1), slice(x0, x1))][mask] = value
    layer.refresh()


def write_plane(layer: Labels, index: Tuple[int, ...], labels: np.ndarray) -> None:
    """Replace plane ``index`` of the layer by ``labels``."""
    h, w = labels.shape
    if layer.multiscale:
        pyramid.write_window(list(layer.data), tuple(index), (0, h, 0, w), labels)
    else:
        layer.data[tuple(index)] = labels
    layer.refresh()


def write_stack(layer: Labels, labels: np.ndarray) -> None:
    """Replace every plane of the layer by ``labels`` (N x H x W)."""
    if layer.multiscale:
        h, w = labels.shape[-2:]
        for z in range(len(labels)):
            pyramid.write_window(list(layer.data), (z,), (0, h, 0, w), labels[z])
    else:
        layer.data[...] = labels
    layer.refresh()
