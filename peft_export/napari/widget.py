"""The dock widget "Segment with an export": load an export, compute an image's embedding in a
worker thread, segment objects by clicking (points) and dragging (boxes), commit them, run
"Segment all", save the labels.

Keys (anywhere in the viewer): Shift-C commit the current object, Shift-X clear the prompts,
Shift-N switch new points between positive (green) and negative (red).

The GUI thread never reads a whole plane or makes a full-size array for a click: pixels are read
in workers (``images.lazy_plane``), a click is decoded on its tile's embedding and shown in that
tile's window, and results of very large images are lazily backed (``pyramid``). Every worker
belongs to a ``current.Target``; ``_valid`` and ``_target`` here are the one rule for which
results still apply (``worker.Tasks`` drops the others). Commit, Segment all and Save are in
``results.ResultActions``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from napari.layers import Image, Labels

from ..errors import PeftExportError
from ..runtime import SamSession
from . import layers as L
from .automatic import has_instance_decoder, needs_tiles
from .current import LayerVersions, Target
from .images import check_displayed, current_index, lazy_plane, leading_axes
from .panel import Panel
from .prompts import ClickDecoder, Decoded, clip_to_image, slice_prompts
from .results import ResultActions
from .volume import VolumeActions
from .worker import EmbeddingCache, Task, Tasks


def one_line(exc: BaseException) -> str:
    """``error: ...`` in one line (ONNX Runtime's messages may span several)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"error: {text}" if isinstance(exc, PeftExportError) else f"error: {type(exc).__name__}: {text}"


class SegmentWidget(VolumeActions, ResultActions, Panel):
    """napari dock widget; every button has a method tests and scripts can call."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session: Optional[SamSession] = None
        self.versions = LayerVersions()
        self.cache = EmbeddingCache()
        self.tasks = Tasks(self._valid, self._tasks_changed, self._dropped)
        self.decoder: Optional[ClickDecoder] = None
        self.last_timing: dict = {}  # what -> seconds of its last run
        self.last_span: dict = {}  # what -> (start, end) perf_counter seconds of its last run
        self.last_decoded: Optional[Decoded] = None  # the shown mask of the last decode
        self._waiting: Dict[Target, List[Callable[[], None]]] = {}  # run when that target's embedding is ready
        self._next_label: Dict[str, int] = {}  # lazily backed result layers: the next free id
        self._updating = False
        self._init_volumes()
        self._build()
        self.viewer.layers.events.inserted.connect(self._refresh_images)
        self.viewer.layers.events.removed.connect(self._on_removed)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self._refresh_images()
        for key, action in (("Shift-C", self.commit), ("Shift-X", self.clear), ("Shift-N", self.toggle_polarity)):
            self.viewer.bind_key(key, lambda _viewer, action=action: action(), overwrite=True)

    # ---- what is current -------------------------------------------------------------------------

    def _target(self, image: Optional[Image] = None) -> Optional[Target]:
        """The export, layer (and its data generation), slice and adapter the viewer shows now."""
        image = image if image is not None else self.image_layer
        if self.session is None or image is None:
            return None
        return Target(self.session, image.unique_id, self.versions.generation(image),
                      current_index(image, self.viewer.dims.point), self.adapter)

    def _valid(self, target: Target) -> bool:
        """A result for ``target`` still applies: same export, its layer still there with the same data."""
        return (target.session is self.session and self.versions.alive(target.layer)
                and any(l.unique_id == target.layer and self.versions.generation(l) == target.generation
                        for l in self.viewer.layers))

    def _tasks_changed(self) -> None:
        reporting = [t for t in self.tasks if t.progress[1]]
        self._show_progress(bool(len(self.tasks)), *(reporting[-1].progress if reporting else (0, 0)))

    def _dropped(self, task: Task, why: str) -> None:
        for target in [t for t in self._waiting if not self._valid(t)]:
            del self._waiting[target]
        if isinstance(task.key, tuple) and task.key[0] == "volume":
            self._volume_waiting.pop(task.key[1], None)
        if why == "cancelled":
            self._say(f"{task.what}: cancelled")

    def cancel(self) -> None:
        """Stop the running work (Cancel); results that arrive afterwards are dropped."""
        n = self.tasks.cancel()
        self._waiting.clear()
        self._volume_waiting.clear()
        self._say(f"cancelling {n} task{'s' * (n != 1)} …" if n else "nothing to cancel")

    def _refresh_images(self, *_: Any) -> None:
        current = self.image_box.currentText()
        images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        for layer in images:
            self.versions.watch(layer, self._on_data)
        names = [layer.name for layer in images]
        self.image_box.blockSignals(True)
        self.image_box.clear()
        self.image_box.addItems(names)
        if current in names:
            self.image_box.setCurrentText(current)
        self.image_box.blockSignals(False)
        if self.image_box.currentText() != current:
            self._on_image()

    def _on_removed(self, event: Any) -> None:
        layer = getattr(event, "value", None)
        if isinstance(layer, Image):
            self.versions.forget(layer)
            self.cache.drop(lambda target: target.layer == layer.unique_id)
            self._forget_volumes(lambda target: target.layer == layer.unique_id)
        if isinstance(layer, Labels):
            self._next_label.pop(layer.unique_id, None)
        self._refresh_images()

    def _on_data(self, layer: Image) -> None:
        """The image's data was replaced: its embeddings are of other pixels."""
        generation = self.versions.generation(layer)
        self.cache.drop(lambda target: target.layer == layer.unique_id and target.generation != generation)
        self._forget_volumes(lambda target: target.layer == layer.unique_id and target.generation != generation)
        if layer is self.image_layer:
            self._use_cached()
            self.update_mask()

    def _fail(self, exc: BaseException) -> None:
        self._say(one_line(exc))

    # ---- export and embedding ------------------------------------------------------------------

    @property
    def image_layer(self) -> Optional[Image]:
        name = self.image_box.currentText()
        return next((l for l in self.viewer.layers if l.name == name and isinstance(l, Image)), None)

    @property
    def adapter(self) -> Optional[str]:
        return self.adapter_box.currentText() or None

    def _run(self, what: str, work: Callable[[Task], Any], then: Callable[[dict], None],
             target: Optional[Target] = None, key: Any = None, replace: bool = False) -> Task:
        self._say(f"{what} …")

        def done(out: dict) -> None:
            self.last_timing[what] = out["end"] - out["start"]
            self.last_span[what] = (out["start"], out["end"])
            then(out)

        def failed(exc: Exception) -> None:
            if target is not None:
                self._waiting.pop(target, None)
            if isinstance(key, tuple) and key[0] == "volume":
                self._volume_waiting.pop(key[1], None)
            self._fail(exc)

        return self.tasks.start(what, work, on_done=done, on_error=failed, target=target, key=key, replace=replace)

    def load_export(self, path: Optional[str] = None) -> Optional[Task]:
        """Open the export (in a worker: a vit_h session takes seconds); returns the task."""
        if path is not None:
            self.path_edit.setText(str(path))
        folder = self.path_edit.text().strip()
        if not folder:
            self._say("error: choose an export folder first")
            return None
        threads = self.threads_box.value() or None
        backend, precision = self.backend_box.currentText(), self.precision_box.currentText()
        return self._run("loading the export", lambda task: SamSession(
            Path(folder), backend=backend, precision=precision, intra_op_threads=threads),
            then=lambda out: self.use_session(out["result"]), key="export", replace=True)

    def use_session(self, session: SamSession) -> None:
        """Segment with ``session`` from now on (what Load export does once the export is open).
        Work for the previous export is cancelled and its results dropped."""
        self.session, self.decoder = session, None
        self.tasks.cancel(lambda task: task.target is not None and task.target.session is not session)
        self.cache.clear()
        self._waiting.clear()
        self._forget_volumes(lambda target: target.session is not session)
        self.adapter_box.blockSignals(True)
        self.adapter_box.clear()
        self.adapter_box.addItems(list(session.adapters))
        self.adapter_box.setEnabled(bool(session.adapters))
        self.adapter_box.blockSignals(False)
        self._on_adapter()
        self._volume_controls()
        d = session.describe()
        self._say(f"{session.export_dir.name}: {d['model_type']} {d['image_size']}px, {d['backend']} "
                  f"{d['graphs']['encoder']['precision'] if 'encoder' in d['graphs'] else session.precision}"
                  + (f", adapters {', '.join(session.adapters)}" if session.adapters else ""))
        if self._layer(L.CURRENT) is not None:
            self.update_mask()  # prompts already placed: decode them with this export

    def _on_adapter(self, *_: Any) -> None:
        ais = self.session is not None and has_instance_decoder(self.session, self.adapter)
        self.ais_form.setVisible(ais or self.session is None)
        self.everything_form.setVisible(not ais and self.session is not None)
        self._use_cached()

    def _use_cached(self) -> bool:
        """Point the decoder at the cached embedding of the current target, if any."""
        target = self._target()
        emb = self.cache.get(target) if target is not None else None
        volume = self._volume_of(target) if emb is None and target is not None else None
        if volume is not None:  # embedded with the whole stack: used for clicks too
            emb = volume.embedding(target.index[0])
            self.cache.put(target, emb)
        if emb is None:
            self.decoder = None
            return False
        if self.decoder is None or self.decoder.embedding is not emb:
            self.decoder = ClickDecoder(self.session, emb, self.adapter)
        return True

    def compute_embedding(self, then: Optional[Callable[[], None]] = None) -> Optional[Task]:
        """Encode the current slice in a worker (None when it is cached; ``then`` runs right away).
        An image larger than the model input: the worker prepares its tiles (intensity statistics
        from a strided sample); each tile is encoded when a prompt needs it."""
        try:
            if self.session is None:
                raise PeftExportError("load an export first")
            image = self.image_layer
            if image is None:
                raise PeftExportError("no image layer: open an image (or File > Open Sample > synthetic nuclei)")
            check_displayed(image, self.viewer)
            target = self._target(image)
            if self._use_cached():
                self._say("embedding ready (cached)")
                if then:
                    then()
                return None
            plane = lazy_plane(image, target.index)  # read in the worker, not here
        except PeftExportError as exc:
            self._fail(exc)
            return None
        if then and then not in self._waiting.get(target, []):
            self._waiting.setdefault(target, []).append(then)
        session, adapter = self.session, self.adapter
        if needs_tiles(session, plane.shape[:2]):
            what, work = "preparing the tiles", lambda task: session.tiled(plane, adapter=adapter)
        else:
            adapters = [adapter] if adapter else None
            what, work = "computing the embedding", lambda task: session.encode(plane.read(), adapters)
        return self._run(what, work, then=lambda out: self._embedded(target, out), target=target,
                         key=("embedding", target))

    def _embedded(self, target: Target, out: dict) -> None:
        self.cache.put(target, out["result"])
        waiting = self._waiting.pop(target, [])
        if target != self._target():
            return  # kept for its slice; not what the viewer shows now
        self._use_cached()
        self._say(f"embedding ready ({out['end'] - out['start']:.2f} s)")
        for fn in waiting:
            fn()

    # ---- interactive -----------------------------------------------------------------------------

    def _on_image(self) -> None:
        self.decoder = None
        image = self.image_layer
        self.volume_group.setVisible(image is not None and leading_axes(image) == 1)
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
        if self._volume_object is not None:
            self._drop_volume_object()  # made from the prompts as they were
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

    def _show(self, decoded: Optional[Decoded]) -> None:
        current, image = self._layer(L.CURRENT), self.image_layer
        self.last_decoded = decoded
        if current is not None and image is not None:
            L.show_mask(current, image, None if decoded is None else decoded.mask,
                        (0, 0, 0, 0) if decoded is None else decoded.window)

    def update_mask(self) -> None:
        """Decode the current slice's prompts into the "current object" layer (computing the
        embedding, or the prompts' tile's embedding, first when it is missing)."""
        if self.image_layer is None or self._layer(L.CURRENT) is None:
            return
        prompts = self.current_prompts()
        if prompts.empty or self.session is None:
            if self.decoder is not None:
                self.decoder.reset()
            self._show(None)
            if not prompts.empty:
                self._say("error: load an export first")
            return
        if self.decoder is None and not self._use_cached():
            self._show(None)  # nothing shown (or committed) from another slice while this one is encoded
            self.compute_embedding(then=self.update_mask)  # one worker per target, however many prompts
            return
        target = self._target()
        try:
            tile_embedding = None
            if self.decoder.tiled:
                tile = self.decoder.tile_for(prompts)
                tile_embedding = self.cache.get((target, tile.index))
                if tile_embedding is None:
                    self._show(None)
                    self._encode_tile(target, tile)
                    return  # decoded when the tile's embedding is ready
            decoded = self.decoder.decode(prompts, tile_embedding)
        except Exception as exc:  # an ONNX Runtime error too: the status line, not a traceback
            self._fail(exc)
            return
        self._show(decoded)
        self._record_shown(target, prompts, decoded)
        self._say(f"mask {decoded.index}: predicted IoU {decoded.iou:.3f}, {int(decoded.mask.sum())} px")

    def _encode_tile(self, target: Target, tile: Any) -> None:
        """Encode ``tile`` of the current large image in a worker (one tile at a time per image)."""
        tiled = self.decoder.embedding

        def encoded(out: dict) -> None:
            self.cache.put((target, tile.index), out["result"])
            if target == self._target():
                self.update_mask()

        self._run("computing the tile's embedding", lambda task: tiled.embedding(tile), then=encoded,
                  target=target, key=("tile", target))

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
        self._shown_masks.clear()  # every slice's prompts are gone
        self._show(None)

    def clear(self) -> None:
        """Remove the prompts and the current object."""
        self._clear_prompts()
        self._say("cleared")
