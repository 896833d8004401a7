"""The layers the widget works with, found by name or created to match the image layer:

- "point prompts" (Points): green = positive, red = negative (``positive`` feature);
- "box prompts" (Shapes): rectangles; the last one on the slice is the object's box;
- "current object" (Labels, 2D): the mask of the prompts being placed;
- "<image> objects" (Labels): committed objects, one id each;
- "<image> automatic" (Labels): the result of "Segment all".

Prompt and result layers share the image layer's scale and translation, so their data
coordinates are the image's pixel coordinates.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import numpy as np
from napari.layers import Labels, Points, Shapes

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
    shape = image_shape(image)[-2:]
    return _reuse(viewer, CURRENT, Labels, lambda layer: _matches(layer, image, 2, last=2) and layer.data.shape == shape,
                  lambda: viewer.add_labels(np.zeros(shape, np.uint8), name=CURRENT, opacity=0.6,
                                            **_placement(image, 2)))


def result_layer(viewer: Any, image: Any, kind: str, metadata: dict) -> Labels:
    """The image's "objects" or "automatic" Labels layer (created empty, int32, full image shape)."""
    name = f"{image.name} {kind}"
    layer = _find(viewer, name, Labels)
    if _matches(layer, image, len(image_shape(image))) and layer.data.shape == image_shape(image):
        layer.metadata = {**layer.metadata, **metadata}
        return layer
    return viewer.add_labels(np.zeros(image_shape(image), np.int32), name=name, metadata=dict(metadata),
                             **_placement(image))
