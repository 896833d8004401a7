"""Automatic segmentation on a SamSession: segment-everything (SAM's point grid) and automatic
instance segmentation (micro-sam's instance decoder + seeded watershed).

Mixins of ``SamSession`` (they use the session's backend, lock, embeddings and decoders), kept
apart so that the prompt path in ``session.py`` stays readable; ``Sam2Session`` shares the AIS one
(``InstanceSegmentation``).

May import: errors (numpy + onnxruntime only; other backends' packages lazily; tests enforce it).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..errors import PeftExportError
from .adapters import EncodedImage, pick_adapter
from .embedding import ImageEmbedding
from .everything import LowResDecoder, MaskRecords
from .everything import segment_everything as _segment_everything
from .instances import AIS_DEFAULTS, check_ais_params, maps_to_image, require_ais_packages, segment_from_maps
from .split_decoder import SPLIT_GRAPHS, SplitDecoder


class InstanceSegmentation:
    """``segment_instances``, ``instance_maps`` and ``has_instance_decoder``: SamSession's and Sam2Session's.

    The host session gives ``_chosen`` (graph key -> (precision, path)), ``_backend``, ``export_dir``,
    ``image_size``, ``encode(image)``, and ``_ais_embedding(embedding, adapter)``: (the embedding the
    AIS decoder reads, the resized image's area in the model frame, the original size). SamSession adds
    exports of several adapters (``_ais_graph``, ``ais_adapters``) and tiled images (``_tiled``).
    """

    NO_AIS_HINT = "export a model trained with --instance-decoder, or a micro-sam checkpoint with a decoder_state"

    @property
    def has_instance_decoder(self) -> bool:
        """Whether this export has micro-sam's instance decoder (for an export of several
        adapters: whether any adapter has one; ``ais_adapters`` names them)."""
        return "ais_decoder" in self._chosen or bool(self.ais_adapters)

    @property
    def ais_adapters(self) -> Tuple[str, ...]:
        """The adapters (of an export of several) that have an instance decoder."""
        return ()

    def _ais_graph(self, adapter: Optional[str]) -> str:
        """The graph key of the instance decoder to run (checked before the encoder runs)."""
        if "ais_decoder" not in self._chosen:
            raise PeftExportError(f"{self.export_dir}: this export has no instance decoder (ais_decoder.onnx); "
                                  + self.NO_AIS_HINT)
        return "ais_decoder"

    def instance_maps(self, embedding: Optional[Any] = None, adapter: Optional[str] = None) -> np.ndarray:
        """The instance decoder's maps (3, H, W) float32 in [0, 1] at the original image size:
        foreground, centre distance, boundary distance (see ``runtime.instances``)."""
        key = self._ais_graph(adapter)
        emb, input_size, original_size = self._ais_embedding(embedding, adapter)
        out = self._backend.run(key, {"image_embeddings": emb})
        return maps_to_image(out["instance_maps"], input_size, original_size, self.image_size)

    def segment_instances(
        self,
        image: Optional[np.ndarray] = None,
        center_distance_threshold: float = AIS_DEFAULTS["center_distance_threshold"],
        boundary_distance_threshold: float = AIS_DEFAULTS["boundary_distance_threshold"],
        foreground_threshold: float = AIS_DEFAULTS["foreground_threshold"],
        foreground_smoothing: float = AIS_DEFAULTS["foreground_smoothing"],
        distance_smoothing: float = AIS_DEFAULTS["distance_smoothing"],
        min_size: int = int(AIS_DEFAULTS["min_size"]),
        embedding: Optional[Any] = None,
        adapter: Optional[str] = None,
    ) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
        """Automatic instance segmentation (AIS) -> (int32 labels HxW, one record per object).

        One encoder pass (skipped for ``embedding=`` or, without ``image``, the image of
        ``set_image``), the instance decoder, then micro-sam's post-processing with its
        defaults: seeds where the smoothed centre distance < ``center_distance_threshold`` and
        the boundary distance < ``boundary_distance_threshold`` inside the foreground
        (smoothed foreground > ``foreground_threshold``), a seeded watershed of the boundary
        distances, objects under ``min_size`` pixels removed. ``foreground_smoothing`` and
        ``distance_smoothing`` are Gaussian sigmas in pixels (0: off). Records: "id", "area",
        "bbox" (XYWH), "centroid" (x, y). Needs scipy + scikit-image (``peftexport[ais]``).
        Exports of several adapters: ``adapter`` picks whose encoder head and decoder run.
        """
        params = check_ais_params({
            "center_distance_threshold": center_distance_threshold,
            "boundary_distance_threshold": boundary_distance_threshold,
            "foreground_threshold": foreground_threshold, "foreground_smoothing": foreground_smoothing,
            "distance_smoothing": distance_smoothing, "min_size": min_size,
        })
        self._ais_graph(adapter)  # both before the encoder runs
        require_ais_packages()
        if image is None and embedding is None and getattr(self, "_tiled", None) is not None:
            return self._tiled.segment_instances(**params)  # the image of set_image(..., tile=...)
        if image is not None:
            if embedding is not None:
                raise PeftExportError("segment_instances: give an image or embedding=, not both")
            embedding = self.encode(image)
        return segment_from_maps(self.instance_maps(embedding, adapter), params)


class AutomaticSegmentation(InstanceSegmentation):
    """``segment_everything`` of ``SamSession``, and AIS for its exports of several adapters."""

    def segment_everything(
        self,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        box_nms_thresh: float = 0.7,
        min_mask_region_area: int = 0,
        embedding: Optional[Union[ImageEmbedding, EncodedImage]] = None,
        adapter: Optional[str] = None,
        return_masks: bool = False,
        decoder: str = "auto",
    ) -> Tuple[np.ndarray, MaskRecords]:
        """Automatic mask generation (SamAutomaticMaskGenerator, one crop) -> (int32 labels HxW, records).

        ``records.summary["removed"]`` counts the candidates each filter removed.
        ``decoder``: "split" (the export's decoder family: masks only for prompts that pass the
        IoU filter), "lowres" (every candidate's mask decoded: ``decoder_lowres`` where the export
        has it (``--meta-decoder``, TensorRT), else the family's whole chain), or "auto" (split when
        the export has it, as every adapter of a current export does).
        """
        if embedding is None and getattr(self, "_tiled", None) is not None:
            return self._tiled.segment_everything(
                points_per_side=points_per_side, points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh, box_nms_thresh=box_nms_thresh,
                min_mask_region_area=min_mask_region_area, return_masks=return_masks, decoder=decoder)
        emb = self._snapshot(embedding, adapter)
        return _segment_everything(
            self._everything_decoder(emb, decoder),
            emb.original_size,
            emb.input_size,
            self.image_size,
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            box_nms_thresh=box_nms_thresh,
            min_mask_region_area=min_mask_region_area,
            return_masks=return_masks,
        )

    def _everything_decoder(self, emb: ImageEmbedding, decoder: str):
        if decoder not in ("auto", "split", "lowres"):
            raise PeftExportError(f"decoder: unknown '{decoder}' (use auto, split or lowres)")
        keys = self._family_keys(emb.adapter)  # single exports and (since the family) every adapter
        if decoder == "split" and keys is None:
            raise PeftExportError(f"{self.export_dir}: this export has no split decoder graphs (an export made "
                                  "before them, or a TensorRT backend; this version writes them)")
        if keys is not None and decoder != "lowres":
            family = self._family(emb)  # shares split_image's context with predict
            names = dict(zip(SPLIT_GRAPHS, keys))
            return SplitDecoder(lambda graph, feeds: self._backend.run(names[graph], feeds), emb.embedding,
                                mask_input=family is not None,
                                context=family.context(emb.embedding) if family is not None else None)
        s = self.low_res_size

        def decode(points_xy: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
            b = len(points_xy)
            coords = np.concatenate([points_xy, np.zeros((b, 1, 2), np.float32)], axis=1)
            lbl = np.concatenate([labels, -np.ones((b, 1), np.float32)], axis=1)
            return self._decode_lowres(emb, coords, lbl, np.zeros((b, 1, s, s), np.float32), np.zeros((b,), np.float32),
                                       prefer_lowres=True)

        return LowResDecoder(decode)

    # ---- automatic instance segmentation (micro-sam's AIS) of exports of several adapters ------

    @property
    def ais_adapters(self) -> Tuple[str, ...]:
        """The adapters (of an export of several) that have an instance decoder."""
        return tuple(n for n, r in self._routes.items() if r.ais_decoder)

    def _ais_graph(self, adapter: Optional[str]) -> str:
        """The graph key of the instance decoder to run (checked before the encoder runs)."""
        if not self._routes:
            return super()._ais_graph(adapter)
        name = pick_adapter(adapter, tuple(self._routes))
        key = self._routes[name].ais_decoder
        if key is None:
            raise PeftExportError(f"{self.export_dir}: adapter {name} has no instance decoder; {self.NO_AIS_HINT}")
        return key

    def _ais_embedding(self, embedding: Optional[Union[ImageEmbedding, EncodedImage]], adapter: Optional[str]
                       ) -> Tuple[np.ndarray, Tuple[int, int], Tuple[int, int]]:
        emb = self._snapshot(embedding, adapter)
        return emb.embedding, emb.input_size, emb.original_size
