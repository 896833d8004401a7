"""The dock widget "Segment with an export": load an export, compute an image's embedding in a
worker thread, segment objects by clicking (points) and dragging (boxes), commit them, run
"Segment all", save the labels.

Keys (anywhere in the viewer): Shift-C commit the current object, Shift-X clear the prompts,
Shift-N switch new points between positive (green) and negative (red).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import QFileDialog

from ..errors import PeftExportError
from ..runtime import SamSession
from . import layers as L
from .automatic import has_instance_decoder, needs_tiles, segment_all
from .panel import Panel
from .images import check_displayed, current_index, image_plane
from .prompts import ClickDecoder, clip_to_image, slice_prompts
from .save import KEY, export_metadata, write_labels
from .worker import EmbeddingCache, start_worker


class SegmentWidget(Panel):
    """napari dock widget; every button has a method tests and scripts can call."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session: Optional[SamSession] = None
        self.cache = EmbeddingCache()
        self.decoder: Optional[ClickDecoder] = None
        self.workers: list = []  # running workers (kept referenced until they finish)
        self.last_timing: dict = {}
        self.last_decoded = None  # the shown mask of the last decode (prompts.Decoded)
        self._after_embedding: list = []
        self._updating = False
        self._build()
        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._refresh_images)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self._refresh_images()
        for key, action in (("Shift-C", self.commit), ("Shift-X", self.clear), ("Shift-N", self.toggle_polarity)):
            self.viewer.bind_key(key, lambda _viewer, action=action: action(), overwrite=True)

    def _refresh_images(self, *_: Any) -> None:
        current = self.image_box.currentText()
        names = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        self.image_box.blockSignals(True)
        self.image_box.clear()
        self.image_box.addItems(names)
        if current in names:
            self.image_box.setCurrentText(current)
        self.image_box.blockSignals(False)
        if self.image_box.currentText() != current:
            self._on_image()

    def _fail(self, exc: BaseException) -> None:
        self._say(f"error: {exc}" if isinstance(exc, PeftExportError) else f"error: {type(exc).__name__}: {exc}")

    # ---- export and embedding ------------------------------------------------------------------

    @property
    def image_layer(self) -> Optional[Image]:
        name = self.image_box.currentText()
        return next((l for l in self.viewer.layers if l.name == name and isinstance(l, Image)), None)

    @property
    def adapter(self) -> Optional[str]:
        return self.adapter_box.currentText() or None

    def _run(self, what: str, fn: Callable, *args: Any, then: Callable[[dict], None], **kwargs: Any) -> Any:
        self.progress.show()
        self._say(f"{what} …")

        def done(out: dict) -> None:
            self._finish(worker)
            self.last_timing[what] = out["end"] - out["start"]
            then(out)

        def failed(exc: Exception) -> None:
            self._finish(worker)
            self._after_embedding.clear()
            self._fail(exc)

        worker = start_worker(fn, *args, on_done=done, on_error=failed, **kwargs)
        self.workers.append(worker)
        return worker

    def _finish(self, worker: Any) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        self.progress.setVisible(bool(self.workers))

    def load_export(self, path: Optional[str] = None) -> Any:
        """Open the export (in a worker: a vit_h session takes seconds); returns the worker."""
        if path is not None:
            self.path_edit.setText(str(path))
        folder = self.path_edit.text().strip()
        if not folder:
            self._say("error: choose an export folder first")
            return None
        threads = self.threads_box.value() or None
        return self._run("loading the export", SamSession, Path(folder), backend=self.backend_box.currentText(),
                         precision=self.precision_box.currentText(), intra_op_threads=threads,
                         then=lambda out: self._set_session(out["result"]))

    def _set_session(self, session: SamSession) -> None:
        self.session, self.decoder = session, None
        self.cache.clear()
        self.adapter_box.blockSignals(True)
        self.adapter_box.clear()
        self.adapter_box.addItems(list(session.adapters))
        self.adapter_box.setEnabled(bool(session.adapters))
        self.adapter_box.blockSignals(False)
        self._on_adapter()
        d = session.describe()
        self._say(f"{session.export_dir.name}: {d['model_type']} {d['image_size']}px, {d['backend']} "
                  f"{d['graphs']['encoder']['precision'] if 'encoder' in d['graphs'] else session.precision}"
                  + (f", adapters {', '.join(session.adapters)}" if session.adapters else ""))

    def _on_adapter(self, *_: Any) -> None:
        ais = self.session is not None and has_instance_decoder(self.session, self.adapter)
        self.ais_form.setVisible(ais or self.session is None)
        self.everything_form.setVisible(not ais and self.session is not None)
        self._use_cached()

    def _key(self) -> Optional[tuple]:
        image = self.image_layer
        if image is None:
            return None
        return id(image), current_index(image, self.viewer.dims.point), self.adapter

    def _use_cached(self) -> bool:
        """Point the decoder at the cached embedding of the current image/slice/adapter, if any."""
        key = self._key()
        emb = self.cache.get(key) if key is not None and self.session is not None else None
        if emb is None:
            self.decoder = None
            return False
        if self.decoder is None or self.decoder.embedding is not emb:
            self.decoder = ClickDecoder(self.session, emb, self.adapter)
        return True

    def compute_embedding(self, then: Optional[Callable[[], None]] = None) -> Any:
        """Encode the current slice in a worker (None when it is cached; ``then`` runs right away)."""
        try:
            if self.session is None:
                raise PeftExportError("load an export first")
            image = self.image_layer
            if image is None:
                raise PeftExportError("no image layer: open an image (or File > Open Sample > synthetic nuclei)")
            check_displayed(image, self.viewer)
            key = self._key()
            if self._use_cached():
                self._say("embedding ready (cached)")
                if then:
                    then()
                return None
            plane = image_plane(image, key[1])
        except PeftExportError as exc:
            self._fail(exc)
            return None
        if then:
            self._after_embedding.append(then)
        if any(getattr(w, "_peftexport_key", None) == key for w in self.workers):
            return None  # already running for this slice
        if needs_tiles(self.session, plane.shape[:2]):  # tiles at full resolution, each encoded when prompted
            worker = self._run("preparing the tiles", self.session.tiled, plane, adapter=self.adapter,
                               then=lambda out: self._embedded(key, image, out))
        else:
            adapters = [self.adapter] if self.adapter else None
            worker = self._run("computing the embedding", self.session.encode, plane, adapters,
                               then=lambda out: self._embedded(key, image, out))
        worker._peftexport_key = key
        return worker

    def _embedded(self, key: tuple, image: Image, out: dict) -> None:
        if not any(l is image for l in self.viewer.layers):
            return
        self.cache.put(key, out["result"])
        image.events.data.connect(lambda _e, i=id(image): self.cache.drop_layer(i))
        self._say(f"embedding ready ({out['end'] - out['start']:.2f} s)")
        if self._key() == key:
            self._use_cached()
        waiting, self._after_embedding = self._after_embedding, []
        for fn in waiting:
            fn()

    # ---- interactive -----------------------------------------------------------------------------

    def _on_image(self) -> None:
        self.decoder = None
        image = self.image_layer
        if image is None:
            return
        self._prompt_layers(image)
        self._use_cached()

    def _prompt_layers(self, image: Image) -> tuple:
        before = [l for l in self.viewer.layers]
        points, boxes, current = (L.points_layer(self.viewer, image), L.boxes_layer(self.viewer, image),
                                  L.current_layer(self.viewer, image))
        for layer in (points, boxes):
            if not any(layer is b for b in before):
                layer.events.data.connect(self._on_prompts)
        if not any(points is b for b in before):
            points.mode = "add"
            self.viewer.layers.selection.active = points
        self._on_polarity(self.negative_box.isChecked())
        return points, boxes, current

    def _on_polarity(self, negative: bool) -> None:
        layer = self._layer(L.POINTS)
        if layer is not None:
            layer.selected_data = set()  # feature_defaults would also recolour selected points
            layer.feature_defaults = {"positive": not negative}

    def toggle_polarity(self) -> None:
        self.negative_box.setChecked(not self.negative_box.isChecked())

    def _layer(self, name: str) -> Any:
        return next((l for l in self.viewer.layers if l.name == name), None)

    def _on_prompts(self, event: Any) -> None:
        if self._updating or str(getattr(event, "action", "")).endswith("ing"):
            return  # napari announces "adding"/"removing" before the change
        self.update_mask()

    def _on_step(self, *_: Any) -> None:
        if self.image_layer is None or self._layer(L.CURRENT) is None:
            return
        self._use_cached()
        self.update_mask()

    def current_prompts(self):
        image = self.image_layer
        points, boxes = self._layer(L.POINTS), self._layer(L.BOXES)
        index = current_index(image, self.viewer.dims.point)
        rects = [d for d, t in zip(boxes.data, boxes.shape_type) if t == "rectangle"] if boxes is not None else []
        positive = points.features["positive"].to_numpy() if points is not None and len(points.data) else []
        prompts = slice_prompts(points.data if points is not None else np.zeros((0, image.ndim)), positive,
                                rects, index)
        return clip_to_image(prompts, L.image_shape(image)[-2:])

    def update_mask(self) -> None:
        """Decode the current slice's prompts into the "current object" layer (computing the
        embedding first when it is missing)."""
        current = self._layer(L.CURRENT)
        if self.image_layer is None or current is None:
            return
        prompts = self.current_prompts()
        if prompts.empty or self.session is None:
            if self.decoder is not None:
                self.decoder.reset()
            current.data = np.zeros_like(current.data)
            if not prompts.empty:
                self._say("error: load an export first")
            return
        if self.decoder is None and not self._use_cached():
            if not any(getattr(w, "_peftexport_key", None) == self._key() for w in self.workers):
                self.compute_embedding(then=self.update_mask)
            return
        try:
            if self.decoder.tiled and self._encode_tile(self.decoder.tile_for(prompts)):
                return  # decoded when the tile's embedding is ready
            decoded = self.decoder.decode(prompts)
        except PeftExportError as exc:
            self._fail(exc)
            return
        current.data = decoded.mask.astype(np.uint8)
        self.last_decoded = decoded
        self._say(f"mask {decoded.index}: predicted IoU {decoded.iou:.3f}, {int(decoded.mask.sum())} px")

    def _encode_tile(self, tile: Any) -> bool:
        """Start encoding ``tile`` of a large image in a worker unless cached; True while it runs."""
        tiled = self.decoder.embedding
        if tiled.has_embedding(tile):
            return False
        key = (*self._key(), tile.index)
        if not any(getattr(w, "_peftexport_key", None) == key for w in self.workers):
            worker = self._run("computing the tile's embedding", tiled.embedding, tile,
                               then=lambda out: self.update_mask())
            worker._peftexport_key = key
        return True

    def _clear_prompts(self) -> None:
        self._updating = True
        try:
            for name in (L.POINTS, L.BOXES):
                layer = self._layer(name)
                if layer is not None and len(layer.data):
                    layer.data = np.zeros((0, layer.ndim)) if name == L.POINTS else []
        finally:
            self._updating = False
        if self.decoder is not None:
            self.decoder.reset()
        current = self._layer(L.CURRENT)
        if current is not None:
            current.data = np.zeros_like(current.data)

    def clear(self) -> None:
        """Remove the prompts and the current object."""
        self._clear_prompts()
        self._say("cleared")

    def commit(self) -> Optional[int]:
        """Write the current object into "<image> objects" as a new id; clears the prompts."""
        image, current = self.image_layer, self._layer(L.CURRENT)
        if image is None or current is None or not current.data.any() or self.session is None:
            self._say("nothing to commit: place prompts first")
            return None
        result = L.result_layer(self.viewer, image, "objects", {KEY: export_metadata(self.session, self.adapter)})
        index = current_index(image, self.viewer.dims.point)
        new_id = int(result.data.max()) + 1
        plane = result.data[index] if index else result.data
        plane[current.data.astype(bool)] = new_id  # a new object is drawn over earlier ones
        result.refresh()
        self._clear_prompts()
        self._say(f"committed object {new_id}")
        return new_id

    # ---- automatic and saving --------------------------------------------------------------------

    def segment_all(self) -> Any:
        """"Segment all" on the current slice, in a worker (after the embedding; an image larger than
        the model input: tile by tile, ``runtime.tiled``); returns the worker."""
        image = self.image_layer
        if self.session is None or image is None:
            return self.compute_embedding()  # says what is missing
        index = current_index(image, self.viewer.dims.point)
        plane = None
        if needs_tiles(self.session, L.image_shape(image)[-2:]):
            plane = image_plane(image, index)
        elif self.decoder is None:
            return self.compute_embedding(then=self.segment_all)
        form = self.ais_form if has_instance_decoder(self.session, self.adapter) else self.everything_form
        emb = self.decoder.embedding if plane is None else None
        return self._run("segmenting all objects", segment_all, self.session, emb, self.adapter, form.values(),
                         image=plane,
                         then=lambda out: self._segmented(image, index, out["result"], out["end"] - out["start"]))

    def _segmented(self, image: Image, index: tuple, out: dict, seconds: float) -> None:
        meta = {KEY: {**export_metadata(self.session, self.adapter), "mode": out["mode"], "params": out["params"],
                      "tiles": out["tiles"]}}
        layer = L.result_layer(self.viewer, image, "automatic", meta)
        if index:
            layer.data[index] = out["labels"]
        else:
            layer.data[...] = out["labels"]
        layer.refresh()
        tiles = f", {out['tiles']} tiles" if out["tiles"] else ""
        self._say(f"{out['mode']}: {out['n_objects']} objects ({seconds:.2f} s{tiles})")

    def save(self, path: Optional[str] = None) -> Optional[str]:
        """The selected Labels layer (else "<image> objects") to ``path`` (.tif/.tiff/.zarr; asks when None)."""
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
        try:
            written = write_labels(path, layer.data, {"name": layer.name, "metadata": layer.metadata})[0]
        except PeftExportError as exc:
            self._fail(exc)
            return None
        self._say(f"saved {layer.name} to {written}")
        return written

