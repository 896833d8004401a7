"""z-stacks and movies in the widget: on an Image layer with one axis before its rows and columns,
every plane is embedded once in a worker (``volume.VolumeEmbeddings``: progress bar, Cancel, kept
in memory or in a zarr store that a later session reopens without an encoder run), then

- "Segment object in volume": the object prompted on one or a few slices is carried through z
  (micro-sam's ``segment_mask_in_volume``: projection mode, IoU stop) into the "volume object"
  layer; Commit writes it into "<image> objects" as one id through its planes;
- "Segment all (3D)": every plane's instances (AIS or segment-everything, the "Segment all"
  parameters) merged across z (multicut) into "<image> automatic 3D";
- "Track": every frame's instances linked over time (laptrack) into "<image> tracked" (one id per
  track) and a Tracks layer "<image> tracks" (with divisions).

On a SAM 2 export with memory graphs, "Segment object in volume" is SAM 2's propagation (``method=
"sam2"``): nothing is embedded first, the annotated slices' shown masks or prompts are its conditioning
frames, the prompts method's options are hidden; "Segment all (3D)" and "Track" encode each plane as they
reach it (nothing kept); the store and "Embed all planes" are disabled (``volume_sam2``).

A mixin of ``widget.SegmentWidget``. A volume belongs to a ``current.Target`` whose index is ()
(the whole layer: export, layer, data generation, adapter) and the store path; its tasks are
dropped by the widget's rule like every other. Planes embedded here are used for clicks too, and
the mask a user saw on a slice (with its prompts unchanged) is what propagation starts from there;
slices with prompts but no shown mask are decoded on the volume's embeddings.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from napari.layers import Image, Labels, Tracks

from .. import volume as V
from ..errors import PeftExportError
from ..volume.embeddings import is_sam2
from . import layers as L
from .automatic import Param, check_stack_size, mode_params
from .current import Target
from .images import check_displayed, leading_axes
from .prompts import ClickDecoder, Decoded, Prompts, clip_to_image, prompted_slices, same_prompts, slice_prompts
from .save import KEY, export_metadata
from .volume_sam2 import EMBED, PROPAGATE, sam2_note, sam2_planes, sam2_prompt, sam2_refusal
from .worker import Task

VOLUME_OBJECT = "volume object"
VOLUMES_KEPT = 2  # vit_b: 4 MiB a plane in memory

PROPAGATION_PARAMS: Tuple[Param, ...] = (
    Param("iou_threshold", "IoU threshold", V.PROPAGATION_DEFAULTS["iou_threshold"], 0, 1, 0.05,
          "Carrying the object outwards stops at the first plane whose mask overlaps the previous plane's less "
          "than this (IoU). CLI --iou-threshold."),
    Param("box_extension", "box extension", V.PROPAGATION_DEFAULTS["box_extension"], 0, 1, 0.01,
          "Boxes carried to the next plane grow by this fraction of their size. CLI --box-extension."),
)
MERGE_PARAMS: Tuple[Param, ...] = (
    Param("gap_closing", "gap closing", 0, 0, 1000, 1,
          "Close gaps of up to N planes along z before merging (0: off). CLI --gap-closing."),
    Param("min_z_extent", "min z extent", 0, 0, 1000, 1,
          "Objects spanning fewer planes are dropped (0: keep all). CLI --min-z-extent."),
)
TRACK_PARAMS: Tuple[Param, ...] = (
    Param("max_distance", "max distance", 0, 0, 100000, 1,
          "Largest move (px) of an object between frames; 0: the median object diameter. CLI --max-distance."),
    Param("gap_frames", "gap frames", 0, 0, 100, 1,
          "A track may skip this many frames where its object was missed."),
)


def annotation_mask(volume: V.VolumeEmbeddings, z: int, prompts: Prompts) -> np.ndarray:
    """The object on plane ``z`` from its prompts, decoded on the volume's embedding of that plane
    (or of the prompts' tile) as a click is: H x W uint8."""
    if volume.grid.single:
        decoded = ClickDecoder(volume.session, volume.embedding(z), volume.adapter).decode(prompts)
    else:
        decoder = ClickDecoder(volume.session, volume.plane(z), volume.adapter)
        tile = decoder.tile_for(prompts)
        decoded = decoder.decode(prompts, volume.embedding(z, volume.grid.tiles.index(tile)))
    return placed(decoded, volume.plane_shape)


def placed(decoded: Decoded, shape: Tuple[int, int]) -> np.ndarray:
    """A decoded mask (of its window) in a full H x W uint8 plane."""
    full = np.zeros(shape, np.uint8)
    y0, y1, x0, x1 = decoded.window
    full[y0:y1, x0:x1] = decoded.mask
    return full


class VolumeActions:
    """Embed all planes, Segment object in volume, Segment all (3D) and Track of ``SegmentWidget``."""

    def _init_volumes(self) -> None:
        self.volumes: Dict[Tuple[Target, Optional[str]], V.VolumeEmbeddings] = {}
        self._volume_waiting: Dict[Tuple[Target, Optional[str]], List[Callable[[Any], None]]] = {}
        self._shown_masks: Dict[Target, Tuple[Prompts, Decoded]] = {}  # the mask a user saw on a slice
        self._volume_object: Optional[Tuple[Target, np.ndarray, Tuple[int, int]]] = None

    def _volume_controls(self) -> None:
        """The Volume / movie box for the loaded export: on SAM 2 the prompts method's options are
        hidden, the store and Embed all planes are disabled, and a note says why."""
        sam2 = self.session is not None and is_sam2(self.session)
        self.propagation_form.setVisible(not sam2)
        for w in (self.store_edit, self.embed_volume_button):
            w.setEnabled(not sam2)
        self.propagate_button.setEnabled(not sam2_refusal(self.session, PROPAGATE))
        self.volume_note.setText(sam2_note(self.session))
        self.volume_note.setVisible(sam2)

    def _check_volume_action(self, action: str) -> None:
        """Refuse ``action`` where the loaded export cannot run it (one line: why, and what can)."""
        refusal = sam2_refusal(self.session, action)
        if refusal:
            raise PeftExportError(refusal)

    # ---- which volume ----------------------------------------------------------------------------

    def _volume_key(self, image: Optional[Image] = None) -> Tuple[Target, Optional[str]]:
        """(the whole layer as a target, the store path) of the current image; refuses 2D layers."""
        image = image if image is not None else self.image_layer
        if self.session is None:
            raise PeftExportError("load an export first")
        if image is None:
            raise PeftExportError("no image layer: open a z-stack or a movie")
        if leading_axes(image) != 1:
            raise PeftExportError(
                f"image layer '{image.name}': the volume tools need a z-stack or a movie (one axis before rows and "
                f"columns); it has {leading_axes(image)} (split it: right-click the layer > Split Stack)")
        check_displayed(image, self.viewer)
        # SAM 2 keeps no plane embeddings (VolumeEmbeddings refuses a store there; the field is disabled)
        store = None if is_sam2(self.session) else self.store_edit.text().strip() or None
        return replace(self._target(image), index=()), store

    def _volume_of(self, target: Target) -> Optional[V.VolumeEmbeddings]:
        """The volume of ``target``'s layer (any store) when it holds ``target``'s plane, else None."""
        whole = replace(target, index=())
        for (t, _), volume in self.volumes.items():
            if t == whole and volume.grid.single and len(target.index) == 1 and volume.is_embedded(target.index[0]):
                return volume
        return None

    def _forget_volumes(self, which: Callable[[Target], bool]) -> None:
        for key in [k for k in self.volumes if which(k[0])]:
            del self.volumes[key]
        for key in [k for k in self._volume_waiting if which(k[0])]:
            del self._volume_waiting[key]
        for key in [k for k in self._shown_masks if which(k)]:
            del self._shown_masks[key]
        if self._volume_object is not None and which(self._volume_object[0]):
            self._drop_volume_object()

    def _record_shown(self, target: Target, prompts: Prompts, decoded: Decoded) -> None:
        self._shown_masks[target] = (prompts, decoded)

    # ---- embedding every plane --------------------------------------------------------------------

    def embed_volume(self, then: Optional[Callable[[V.VolumeEmbeddings], None]] = None) -> Optional[Task]:
        """Embed every plane of the current stack in a worker (the bar counts planes; Cancel keeps
        the planes done); ``then(volume)`` runs once all are embedded. None when nothing to do."""
        try:
            key = self._volume_key()
            self._check_volume_action(EMBED)
        except PeftExportError as exc:
            self._fail(exc)
            return None
        return self._volume_ready(key, then, embed=True)

    def _volume_ready(self, key: Tuple[Target, Optional[str]], then: Optional[Callable[[V.VolumeEmbeddings], None]],
                      embed: bool) -> Optional[Task]:
        """``then(volume)`` once the volume of ``key`` is open (the stack read in a worker) and, with
        ``embed``, all its planes are embedded; the task doing what is missing, or None."""
        if then is not None:
            self._volume_waiting.setdefault(key, []).append(then)
        volume = self.volumes.get(key)
        target, store = key
        if volume is None:  # the stack's statistics (a sample of planes) and the store: read in a worker
            image, session, adapter = self.image_layer, self.session, self.adapter
            data = image.data[0] if image.multiscale else image.data
            return self._run("reading the stack", lambda task: V.VolumeEmbeddings(
                session, V.stack_from_array(data, name=image.name), store=store, adapter=adapter),
                then=lambda out: self._volume_opened(key, out["result"], embed), target=target, key=("volume", key))
        n = volume.stack.n_planes
        if not embed or volume.n_embedded == n:
            if embed:
                self._say(f"all {n} planes embedded" + (f" ({store})" if store else ""))
            for fn in self._volume_waiting.pop(key, []):
                fn(volume)
            return None
        return self._run(f"embedding {n} planes", lambda task: volume.compute(
            progress=task.step, cancel=lambda: task.cancelled), then=lambda out: self._volume_embedded(key, out),
            target=target, key=("volume", key))

    def _volume_opened(self, key: Tuple[Target, Optional[str]], volume: V.VolumeEmbeddings, embed: bool) -> None:
        self.volumes[key] = volume
        while len(self.volumes) > VOLUMES_KEPT:
            del self.volumes[next(iter(self.volumes))]
        self._volume_ready(key, None, embed)

    def _volume_embedded(self, key: Tuple[Target, Optional[str]], out: dict) -> None:
        volume = self.volumes.get(key)
        if volume is None:
            return
        self._say(f"{out['result']} planes embedded ({out['end'] - out['start']:.1f} s)")
        current = self._target()
        if current is not None and key[0] == replace(current, index=()):
            self._use_cached()
        for fn in self._volume_waiting.pop(key, []):
            fn(volume)

    # ---- Segment object in volume ----------------------------------------------------------------

    def _annotations(self, target: Target) -> Dict[int, Prompts]:
        """The current prompts of every slice that has any: {plane: Prompts}."""
        image = self.image_layer
        points, boxes = self._layer(L.POINTS), self._layer(L.BOXES)
        data = points.data if points is not None else np.zeros((0, 3))
        positive = points.features["positive"].to_numpy() if points is not None and len(data) else []
        rects = [d for d, t in zip(boxes.data, boxes.shape_type) if t == "rectangle"] if boxes is not None else []
        shape = L.image_shape(image)
        found = {}
        for (z,) in prompted_slices(data, rects, 1):
            if 0 <= z < shape[0]:
                prompts = clip_to_image(slice_prompts(data, positive, rects, (z,)), shape[-2:])
                if not prompts.empty:
                    found[z] = prompts
        return found

    def segment_object_in_volume(self) -> Optional[Task]:
        """Carry the prompted object through the stack (after embedding it; on a SAM 2 export with
        SAM 2's memory, nothing embedded first); the result goes to the "volume object" layer, and
        Commit adds it to "<image> objects"."""
        try:
            key = self._volume_key()
            if not self._annotations(key[0]):
                raise PeftExportError("Segment object in volume: place prompts on one or a few slices first")
            self._check_volume_action(PROPAGATE)
        except PeftExportError as exc:
            self._fail(exc)
            return None
        return self._volume_ready(key, lambda volume: self._propagate(key, volume), embed=not is_sam2(self.session))

    def _propagate(self, key: Tuple[Target, Optional[str]], volume: V.VolumeEmbeddings) -> None:
        target = key[0]
        prompts = self._annotations(target)
        if not prompts:
            self._say("Segment object in volume: no prompts left")
            return
        seen = {}
        for z, p in prompts.items():
            shown = self._shown_masks.get(replace(target, index=(z,)))
            if shown is not None and same_prompts(shown[0], p):
                seen[z] = placed(shown[1], volume.plane_shape)
        sam2 = is_sam2(volume.session)
        # SAM 2: the prompts are its conditioning frames and its memory carries the object (no projection options)
        options: Dict[str, Any] = {"method": "sam2"} if sam2 else dict(
            self.propagation_form.values(), projection=self.projection_box.currentText(), method="prompts")
        options.update(stop_lower=self.stop_lower_box.isChecked(), stop_upper=self.stop_upper_box.isChecked())

        def annotation(z: int, p: Prompts) -> Any:
            return seen[z] if z in seen else sam2_prompt(p) if sam2 else annotation_mask(volume, z, p)

        def work(task: Task) -> tuple:
            annotations = {z: annotation(z, p) for z, p in prompts.items()}
            return V.segment_object_in_volume(volume, annotations, **options, progress=task.step,
                                              cancel=lambda: task.cancelled)

        what = "segmenting the object in the volume" + (" (SAM 2)" if sam2 else "")
        self._run(what, work, then=lambda out: self._show_volume_object(target, *out["result"]), target=target,
                  key=("propagate", target), replace=True)

    def _show_volume_object(self, target: Target, mask: np.ndarray, span: Tuple[int, int]) -> None:
        image = self.image_layer
        if image is None or image.unique_id != target.layer:
            return
        layer = next((l for l in self.viewer.layers if l.name == VOLUME_OBJECT and isinstance(l, Labels)), None)
        if layer is not None and layer.data.shape != mask.shape:
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            layer = self.viewer.add_labels(mask, name=VOLUME_OBJECT, opacity=0.5, scale=image.scale,
                                           translate=image.translate)
        else:
            layer.data = mask
        self._volume_object = (target, mask, span)
        planes = int(mask.reshape(len(mask), -1).any(axis=1).sum())
        self._say(f"object on planes {span[0]}-{span[1]} ({planes} with pixels); Commit (Shift-C) adds it")

    def _drop_volume_object(self) -> None:
        self._volume_object = None
        layer = next((l for l in self.viewer.layers if l.name == VOLUME_OBJECT), None)
        if layer is not None and layer.data.any():
            layer.data = np.zeros_like(layer.data)

    def _commit_volume_object(self) -> Optional[int]:
        """Commit's part for a propagated object: one new id through its planes in "<image> objects"."""
        target, mask, span = self._volume_object
        image = self.image_layer
        if image is None or image.unique_id != target.layer or not self._valid(target):
            self._drop_volume_object()
            return self.commit()  # of another layer or export: Commit is the 2D one
        h, w = mask.shape[1:]
        new_id = self._paint_object(image, [((z,), (0, h, 0, w), mask[z].astype(bool))
                                            for z in range(span[0], span[1] + 1) if mask[z].any()])
        if new_id is None:
            return None
        self._drop_volume_object()
        self._say(f"committed object {new_id} (planes {span[0]}-{span[1]})")
        return new_id

    # ---- Segment all (3D) and Track ----------------------------------------------------------------

    def _plane_options(self) -> Tuple[bool, Dict[str, Any]]:
        form = self.ais_form if mode_params(self.session, self.adapter)[0] else self.everything_form
        return mode_params(self.session, self.adapter, form.values())

    def segment_all_3d(self) -> Optional[Task]:
        """Every plane's instances merged across z, into "<image> automatic 3D" (after embedding; on a SAM 2
        export each plane is encoded as it is segmented)."""
        try:
            key = self._volume_key()
            self._check_volume_action("Segment all (3D)")
            check_stack_size(L.image_shape(self.image_layer), "Segment all (3D)", "--3d")
        except PeftExportError as exc:
            self._fail(exc)
            return None
        return self._volume_ready(key, lambda volume: self._segment_3d(key[0], volume), embed=not is_sam2(self.session))

    def _segment_3d(self, target: Target, volume: V.VolumeEmbeddings) -> None:
        ais, params = self._plane_options()
        merge = {k: (int(v) or None) for k, v in self.merge_form.values().items()}
        session = self.session

        def work(task: Task) -> np.ndarray:
            return V.segment_volume(session, sam2_planes(volume), "ais" if ais else "everything",
                                    instance_options=params if ais else None,
                                    everything_options=None if ais else params, **merge,
                                    progress=task.step, cancel=lambda: task.cancelled)

        meta = {"mode": "instances" if ais else "everything", "params": params, "merge": merge}
        self._run("segmenting all objects in 3D", work, then=lambda out: self._write_stack(
            target, "automatic 3D", out["result"], meta, f"{int(out['result'].max())} objects in 3D"),
            target=target, key=("segment all 3d", target), replace=True)

    def track_objects(self) -> Optional[Task]:
        """Every frame's instances linked into tracks: "<image> tracked" and the Tracks layer
        "<image> tracks" (after embedding)."""
        try:
            key = self._volume_key()
            self._check_volume_action("Track")
            check_stack_size(L.image_shape(self.image_layer), "Track", "--track")
        except PeftExportError as exc:
            self._fail(exc)
            return None
        return self._volume_ready(key, lambda volume: self._track(key[0], volume), embed=not is_sam2(self.session))

    def _track(self, target: Target, volume: V.VolumeEmbeddings) -> None:
        ais, params = self._plane_options()
        values = self.track_form.values()
        linking = {"max_distance": float(values["max_distance"]) or None, "gap_frames": int(values["gap_frames"]),
                   "divisions": self.divisions_box.isChecked()}
        session = self.session

        def work(task: Task) -> V.TrackingResult:
            return V.track(session, sam2_planes(volume), "ais" if ais else "everything",
                           instance_options=params if ais else None,
                           everything_options=None if ais else params, **linking, progress=task.step,
                           cancel=lambda: task.cancelled)

        def tracked(out: dict) -> None:
            result = out["result"]
            meta = {"mode": "instances" if ais else "everything", "params": params, "tracking": linking}
            if self._write_stack(target, "tracked", result.labels, meta,
                                 f"{result.n_tracks} tracks, {result.n_divisions} divisions"):
                self._tracks_layer(result)

        self._run("tracking", work, then=tracked, target=target, key=("track", target), replace=True)

    def _write_stack(self, target: Target, kind: str, labels: np.ndarray, meta: dict, said: str) -> bool:
        image = next((l for l in self.viewer.layers if l.unique_id == target.layer), None)
        if image is None:
            return False
        record = {KEY: {**export_metadata(target.session, target.adapter), **meta}}
        layer = L.result_layer(self.viewer, image, kind, record)
        if self._saving(layer):
            self._say(f"{kind}: dropped, {layer.name} was being saved; run it again")
            return False
        L.write_stack(layer, labels)
        self._next_label.pop(layer.unique_id, None)
        self._say(said)
        return True

    def _tracks_layer(self, result: V.TrackingResult) -> None:
        image = self.image_layer
        name = f"{image.name} tracks"
        old = next((l for l in self.viewer.layers if l.name == name and isinstance(l, Tracks)), None)
        if old is not None:
            self.viewer.layers.remove(old)
        if len(result.tracks):
            self.viewer.add_tracks(result.tracks, graph=result.graph, name=name, scale=image.scale,
                                   translate=image.translate, tail_length=10)
