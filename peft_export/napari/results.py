"""The widget's results: commit the current object, "Segment all", save labels.

A mixin of ``widget.SegmentWidget``, which provides the session, the layers, ``_target`` (what is
current) and ``_run`` (a task in a worker). Results go to the image's "objects" and "automatic"
Labels layers (``layers.result_layer``: lazily backed when large).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import QFileDialog

from ..errors import PeftExportError
from . import layers as L
from .automatic import check_segment_all_size, has_instance_decoder, needs_tiles, segment_all
from .current import Target
from .images import check_displayed, current_index, lazy_plane
from .save import KEY, export_metadata, write_labels
from .worker import Task


class ResultActions:
    """Commit, Segment all and Save of ``SegmentWidget``."""

    _next_label: Dict[str, int]  # lazily backed result layers: the next free id (set by the widget)

    def _saving(self, layer: Labels) -> bool:
        return any(t.key == ("save", layer.unique_id) for t in self.tasks)

    def _new_label(self, layer: Labels) -> int:
        """The next free id: above the layer's maximum (kept as a counter for a lazily backed layer,
        whose maximum would mean reading it whole)."""
        if not layer.multiscale:
            return int(np.max(layer.data)) + 1
        new = self._next_label.get(layer.unique_id, int(np.max(layer.data[-1])) + 1)
        self._next_label[layer.unique_id] = new + 1
        return new

    def commit(self) -> Optional[int]:
        """Write the current object into "<image> objects" as a new id; clears the prompts. After
        "Segment object in volume" (prompts unchanged since), the object through its planes."""
        if self._volume_object is not None:
            return self._commit_volume_object()
        image, decoded = self.image_layer, self.last_decoded
        if image is None or decoded is None or not decoded.mask.any() or self.session is None:
            self._say("nothing to commit: place prompts first")
            return None
        new_id = self._paint_object(image, [(current_index(image, self.viewer.dims.point), decoded.window,
                                             decoded.mask)])
        if new_id is not None:
            self._say(f"committed object {new_id}")
        return new_id

    def _paint_object(self, image: Image, pieces: List[Tuple[tuple, tuple, np.ndarray]]) -> Optional[int]:
        """One new id in "<image> objects" where each (plane index, window, mask) piece is set; clears
        the prompts. None while that layer is being saved."""
        result = L.result_layer(self.viewer, image, "objects", {KEY: export_metadata(self.session, self.adapter)})
        if self._saving(result):
            self._say(f"wait: {result.name} is being saved (or press Cancel)")
            return None
        new_id = self._new_label(result)
        for index, window, mask in pieces:
            L.paint(result, index, window, mask, new_id)
        self._clear_prompts()
        return new_id

    # ---- automatic and saving --------------------------------------------------------------------

    def segment_all(self) -> Optional[Task]:
        """"Segment all" on the current slice, in a worker (after the embedding; an image larger than
        the model input: tile by tile, ``runtime.tiled``); returns the task."""
        image = self.image_layer
        if self.session is None or image is None:
            return self.compute_embedding()  # says what is missing
        try:
            check_displayed(image, self.viewer)
            target = self._target(image)
            plane = lazy_plane(image, target.index)
            check_segment_all_size(plane.shape)
        except PeftExportError as exc:
            self._fail(exc)
            return None
        tiled = needs_tiles(self.session, plane.shape[:2])
        if not tiled and not self._use_cached():
            return self.compute_embedding(then=self.segment_all)
        form = self.ais_form if has_instance_decoder(self.session, self.adapter) else self.everything_form
        session, adapter, params = self.session, self.adapter, form.values()
        emb = None if tiled else self.decoder.embedding
        return self._run("segmenting all objects", lambda task: segment_all(
            session, emb, adapter, params, image=plane if tiled else None),
            then=lambda out: self._segmented(image, target, out["result"], out["end"] - out["start"]),
            target=target, key=("segment all", target))

    def _segmented(self, image: Image, target: Target, out: dict, seconds: float) -> None:
        """Written to the slice it was computed for (also when the viewer shows another slice now)."""
        meta = {KEY: {**export_metadata(target.session, target.adapter), "mode": out["mode"],
                      "params": out["params"], "tiles": out["tiles"]}}
        layer = L.result_layer(self.viewer, image, "automatic", meta)
        if self._saving(layer):
            self._say(f"Segment all: dropped, {layer.name} was being saved; run it again")
            return
        L.write_plane(layer, target.index, out["labels"])
        self._next_label.pop(layer.unique_id, None)
        tiles = f", {out['tiles']} tiles" if out["tiles"] else ""
        self._say(f"{out['mode']}: {out['n_objects']} objects ({seconds:.2f} s{tiles})")

    def save(self, path: Optional[str] = None) -> Optional[Task]:
        """The selected Labels layer (else "<image> objects") to ``path`` (.tif/.tiff/.zarr; asks
        when None), in a worker; returns the task. The status line says where it went."""
        layer = self.viewer.layers.selection.active
        if not isinstance(layer, Labels) or layer.name == L.CURRENT:
            layer = self._layer(f"{self.image_layer.name} objects") if self.image_layer is not None else None
        if layer is None:
            self._say("error: nothing to save: commit an object or run Segment all first")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save labels", f"{layer.name}.tif", "TIFF (*.tif *.tiff);;zarr (*.zarr)")
            if not path:
                return None
        # A plain layer is copied here (commits may follow at once); a lazily backed one is read
        # block by block in the worker, and commits to it wait until the save is done.
        data = list(layer.data) if layer.multiscale else np.array(layer.data)
        attributes = {"name": layer.name, "metadata": dict(layer.metadata)}
        name = layer.name
        return self._run(f"saving {name}", lambda task: write_labels(path, data, attributes, progress=task.step)[0],
                         then=lambda out: self._say(f"saved {name} to {out['result']}"),
                         key=("save", layer.unique_id))
