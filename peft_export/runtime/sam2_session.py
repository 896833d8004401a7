"""Sam2Session: torch-free SAM 2 image inference on an export (``SamSession(export)`` returns one when the
manifest's ``family`` is ``sam2``), with SamSession's API: ``set_image``, ``predict`` (points, boxes, mask
input), ``predict_batch``, ``segment_everything``, and ``segment_instances`` (micro-sam's AIS, shared with
SamSession: ``automatic.InstanceSegmentation``) on an export of a model trained with ``--instance-decoder``.

It follows ``SAM2ImagePredictor``: the image is resized to S x S without keeping its aspect ratio
(``sam2_preprocess``), the encoder's lowest level gets ``no_mem_embed`` (from the export's constants),
prompts are box corners first, points, then a padding point, in the S x S frame; the decoder's four
tokens are chosen as sam2's decoder does (``sam2_masks``), masks are the low-res logits resized once
to the image, and the returned low-res logits are clipped to [-32, 32] as the predictor returns them.
Segment-everything is ``SAM2AutomaticMaskGenerator`` (one crop) with its defaults, through the same
numpy steps as SAM's (``everything``).

Large images: ``set_image(image, tile=...)`` / ``tiled(image)`` give the ``TiledImage`` of ``runtime.tiled``,
SAM's tiling code as it is; the seam is ``encode_tile`` / ``encode_whole`` (SamSession has both): a tile is
its pixels through the whole image's ``IntensityRange``, resized to S x S as any SAM 2 image, and its
``Sam2Embedding`` holds the image embedding and the two high-res feature maps.

``propagate(frames or volume, prompts on some frames)`` is SAM 2's video propagation
(``SAM2VideoPredictor``), run by ``sam2_video.Sam2Propagator`` on the export's memory graphs (opened on
the first call, with this session's backend, device, threads and encoder precision); an export without
them (no ``merge-and-export --video``) is refused with one line.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from ..errors import PeftExportError
from ..fsutil import sha256_file
from .backends import check_backend, graph_kind, open_backend
from .automatic import InstanceSegmentation
from .everything import LowResDecoder, MaskRecords, segment_everything as _segment_everything
from .manifest import bf16_mode_graphs, check_bf16_backend, read_manifest
from .postprocess import resize_bilinear
from .prompts import check_boxes, check_points, mask_input_feed
from .sam2_masks import select_masks
from .sam2_preprocess import prepare_sam2_image, sam2_encoder_input, to_sam2_frame
from .sam2_video import Sam2Propagator, has_memory_graphs, no_memory_graphs_message
from .sam2_video_prompts import Prompts
from .tiled import TiledImage
from .tiling import tile_spec, whole_rgb

ENCODER_OUTPUTS = ("image_embeddings", "high_res_feats_0", "high_res_feats_1")
LOW_RES_CLAMP = 32.0  # SAM2ImagePredictor clamps the low-res logits it returns


@dataclass(frozen=True)
class Sam2Embedding:
    """One encoded image: the decoder's image inputs (``no_mem_embed`` added) and the original size."""

    embedding: np.ndarray  # (1, 256, g, g)
    high_res_feats: Tuple[np.ndarray, np.ndarray]  # (1, 32, 4g, 4g), (1, 64, 2g, 2g)
    original_size: Tuple[int, int]
    adapter: Optional[str] = None


class Sam2Session(InstanceSegmentation):
    """Prompted and automatic SAM 2 segmentation from an export dir, without torch."""

    def __init__(self, export_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                 precision: str = "fp32", intra_op_threads: Optional[int] = None, verify_checksums: bool = False,
                 adapters: Optional[Any] = None) -> None:
        check_backend(backend)
        if graph_kind(backend) != "onnx":
            raise PeftExportError(f"backend {backend}: SAM 2 exports run their ONNX graphs (onnxruntime, openvino)")
        if adapters:
            raise PeftExportError(f"{export_dir}: a SAM 2 export has one model, no named adapters")
        check_bf16_backend(precision, backend)
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        if self.manifest.get("family") != "sam2":
            raise PeftExportError(f"{self.export_dir}: not a SAM 2 export (use SamSession)")
        self.backend_name, self.device, self.precision = backend, device, precision
        self._threads, self._verify = intra_op_threads, verify_checksums
        self._propagator: Optional[Sam2Propagator] = None
        self.image_size = int(self.manifest["image_size"])
        self.low_res_size = int(self.manifest["low_res_size"])
        pre = self.manifest["preprocessing"]
        self._intensity_rule = pre.get("intensity")
        self._pixel_mean, self._pixel_std = pre["pixel_mean"], pre["pixel_std"]
        self._selection = self.manifest.get("decoder_selection")
        graphs = self.manifest["graphs"]
        enc = graphs.get("encoder", {})
        if precision not in enc:
            from .manifest import missing_precision_message

            raise PeftExportError("precision: " + missing_precision_message(self.manifest, self.export_dir, precision, enc))
        self._chosen = {"encoder": (precision, self._file(enc[precision], "encoder", verify_checksums))}
        if "fp32" not in (graphs.get("decoder") or {}):
            raise PeftExportError(f"{self.export_dir}: manifest.json lists no fp32 decoder graph")
        self._chosen["decoder"] = ("fp32", self._file(graphs["decoder"]["fp32"], "decoder", verify_checksums))
        ais = graphs.get("ais_decoder") or {}  # micro-sam's instance decoder, when the model had one (fp32; bf16 runs it)
        prec = precision if precision in ais else "fp32"
        if prec in ais:
            self._chosen["ais_decoder"] = (prec, self._file(ais[prec], "ais_decoder", verify_checksums))
        constants = self._file(self.manifest.get("constants") or {"path": "sam2_constants.npz"}, "constants",
                               verify_checksums)
        with np.load(constants, allow_pickle=False) as c:
            self.no_mem_embed = np.asarray(c["no_mem_embed"], np.float32).reshape(1, -1, 1, 1)
        self._backend: Any = open_backend(backend, {k: p for k, (_, p) in self._chosen.items()}, device,
                                          intra_op_threads,
                                          *bf16_mode_graphs(graphs, {k: p for k, (p, _) in self._chosen.items()}))
        self.providers = list(self._backend.providers)
        self._lock = threading.Lock()
        self._embedding: Optional[Sam2Embedding] = None
        self._tiled: Optional[TiledImage] = None  # after set_image(..., tile=...)

    adapters: Tuple[str, ...] = ()
    NO_AIS_HINT = ("export a SAM 2 model trained with --instance-decoder (peftexport finetune --model sam2.1_hiera_t "
                   "... --instance-decoder), or use segment_everything")

    def _file(self, entry: Dict[str, Any], what: str, verify: bool) -> Path:
        path = self.export_dir / entry["path"]
        if not path.is_file():
            raise PeftExportError(f"{path}: {what} file listed in manifest.json is missing")
        if verify and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            raise PeftExportError(f"{path}: sha256 does not match manifest.json (file changed or truncated)")
        return path

    def describe(self) -> Dict[str, Any]:
        return {"export_dir": str(self.export_dir), "family": "sam2", "model_type": self.manifest.get("model_type"),
                "image_size": self.image_size, "backend": self.backend_name, "device": self.device,
                "providers": self.providers, "precision_asked": self.precision,
                "graphs": {k: {"precision": p, "path": path.name,
                           # OpenVINO's bf16 inference precision (bf16; int8 verified that way, native bf16 CPUs)
                           "bf16_mode": k in getattr(self._backend, "bf16_graphs", ())}
                       for k, (p, path) in self._chosen.items()},
                "decoder_used": "decoder", "adapters": [], "intensity": self._intensity_rule,
                "interpolation": "bilinear_antialias"}

    # ---- image -----------------------------------------------------------------------------

    def _run_encoder(self, x: np.ndarray) -> Dict[str, np.ndarray]:
        out = self._backend.run("encoder", {"image": x})
        feats = {n: np.asarray(out[n], np.float32) for n in ENCODER_OUTPUTS}
        g = self.image_size // 16
        if feats["image_embeddings"].shape != (1, 256, g, g):
            raise PeftExportError(f"encoder: output shape {feats['image_embeddings'].shape} does not match image size "
                                  f"{self.image_size}")
        return feats

    def encode_features(self, image: np.ndarray) -> Tuple[Dict[str, np.ndarray], Tuple[int, int]]:
        """The encoder graph's three outputs (``image_embeddings`` without ``no_mem_embed``) and the original size."""
        x, original_size = prepare_sam2_image(image, self._intensity_rule, self.image_size, self._pixel_mean,
                                              self._pixel_std)
        return self._run_encoder(x), original_size

    def encode_prepared(self, x: np.ndarray, original_size: Tuple[int, int]) -> Sam2Embedding:
        """``encode`` of an encoder input already prepared (1 x 3 x S x S)."""
        feats = self._run_encoder(x)
        emb = feats["image_embeddings"] + self.no_mem_embed  # SAM2ImagePredictor: directly_add_no_mem_embed
        for a in (emb, feats["high_res_feats_0"], feats["high_res_feats_1"]):
            a.setflags(write=False)
        return Sam2Embedding(emb, (feats["high_res_feats_0"], feats["high_res_feats_1"]),
                             (int(original_size[0]), int(original_size[1])))

    def encode(self, image: np.ndarray, adapters: Optional[Any] = None) -> Sam2Embedding:
        """Preprocess and encode one image (2D gray or HxWx3/4, any dtype); no session state."""
        x, original_size = prepare_sam2_image(image, self._intensity_rule, self.image_size, self._pixel_mean,
                                              self._pixel_std)
        return self.encode_prepared(x, original_size)

    # ---- large images: tiles (``runtime.tiled``, the same code as SAM's) --------------------------

    def encode_tile(self, pixels: np.ndarray, intensity: Any, spec: Any) -> Sam2Embedding:
        """One tile (``SamSession.encode_tile``'s call): its pixels through the whole image's ``IntensityRange``,
        then SAM 2's own resize to S x S, so a full-size tile is encoded exactly as ``encode`` encodes that crop
        (where the crop normalises alike). A tile narrower than ``spec.tile`` occurs only where the image is
        narrower than a tile; SAM 2 stretches it to S x S, as it does any non-square image."""
        rgb = intensity.to_uint8(pixels)
        return self.encode_prepared(sam2_encoder_input(rgb, self.image_size, self._pixel_mean, self._pixel_std),
                                    rgb.shape[:2])

    def encode_whole(self, image: Any, intensity: Any, image_size: int) -> Sam2Embedding:
        """A large image whole at S x S (segment-everything's coarse layer); masks come back at full size."""
        rgb, size = whole_rgb(image, intensity, image_size)
        return self.encode_prepared(sam2_encoder_input(rgb, self.image_size, self._pixel_mean, self._pixel_std), size)

    def tiled(self, image: Any, tile: Optional[int] = None, halo: Optional[int] = None,
              scale: Optional[float] = None, adapter: Optional[str] = None) -> TiledImage:
        """A ``TiledImage`` of ``image`` (``SamSession.tiled``): tiles of ``tile`` native pixels resized to the model
        input (default: the export's training scale), ``halo`` pixels of context per side (default tile / 4)."""
        if adapter is not None:
            raise PeftExportError(f"{self.export_dir}: a SAM 2 export has one model, no named adapters")
        return TiledImage(self, image, tile_spec(self.manifest, tile, halo, scale))

    def set_image(self, image: np.ndarray, adapters: Optional[Any] = None, tile: Optional[int] = None,
                  halo: Optional[int] = None, scale: Optional[float] = None) -> None:
        """Encode ``image`` once; with ``tile``/``halo``/``scale`` (any of them) a large image at full resolution,
        tile by tile (``tiled``): ``predict`` and ``segment_everything`` then work on the whole image."""
        if tile is None and halo is None and scale is None:
            emb = self.encode(image)
            with self._lock:
                self._embedding, self._tiled = emb, None
            return
        tiled = self.tiled(image, tile=tile, halo=halo, scale=scale)
        with self._lock:
            self._embedding, self._tiled = None, tiled

    def reset_image(self) -> None:
        with self._lock:
            self._embedding, self._tiled = None, None

    def get_image_embedding(self, adapter: Optional[str] = None) -> np.ndarray:
        return self._snapshot(None).embedding

    def _snapshot(self, embedding: Optional[Sam2Embedding]) -> Sam2Embedding:
        emb = embedding if embedding is not None else self._embedding
        if emb is None:
            raise PeftExportError("predict: no image set; call set_image(image) first or pass embedding=")
        return emb

    # ---- decoding --------------------------------------------------------------------------

    def _prompts(self, points: Optional[np.ndarray], labels: Optional[np.ndarray], boxes: Optional[np.ndarray],
                 original_size: Tuple[int, int], dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
        """(K,N,2)/(K,N)/(K,4) image-frame prompts -> SAM 2's layout: box corners, points, padding point."""
        if points is None and boxes is None:
            raise PeftExportError("predict: give point_coords or box (a mask_input alone is not a prompt)")
        k = len(points) if points is not None else len(boxes)
        if boxes is not None and len(boxes) != k:
            raise PeftExportError(f"box: {len(boxes)} boxes for {k} point sets")
        coords, labs = [], []
        if boxes is not None:
            coords.append(to_sam2_frame(np.asarray(boxes, dtype).reshape(k, 2, 2), original_size, self.image_size))
            labs.append(np.tile(np.array([[2, 3]], np.float32), (k, 1)))
        if points is not None:
            coords.append(to_sam2_frame(np.asarray(points, dtype), original_size, self.image_size))
            labs.append(np.asarray(labels, np.float32))
        coords.append(np.zeros((k, 1, 2), dtype))
        labs.append(np.full((k, 1), -1, np.float32))
        return np.concatenate(coords, 1).astype(np.float32), np.concatenate(labs, 1)

    def _decode(self, emb: Sam2Embedding, coords: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                has_mask: np.ndarray) -> Dict[str, np.ndarray]:
        """All four tokens' outputs (``sam2_image_graphs.DECODER_OUTPUTS``) of K prompts on one image."""
        return self._backend.run("decoder", {
            "image_embeddings": emb.embedding, "high_res_feats_0": emb.high_res_feats[0],
            "high_res_feats_1": emb.high_res_feats[1], "point_coords": coords, "point_labels": labels,
            "mask_input": mask, "has_mask_input": has_mask})

    def _mask_input(self, mask_input: Optional[np.ndarray], k: int) -> Tuple[np.ndarray, np.ndarray]:
        return mask_input_feed(mask_input, k, self.low_res_size)

    def upsample_masks(self, low_res: np.ndarray, embedding: Optional[Sam2Embedding] = None,
                       adapter: Optional[str] = None) -> np.ndarray:
        """Low-res logits (..., 4g, 4g) -> logits (..., H, W) of the image (one bilinear resize, as sam2)."""
        return resize_bilinear(low_res, self._snapshot(embedding).original_size)

    def predict(self, point_coords: Optional[np.ndarray] = None, point_labels: Optional[np.ndarray] = None,
                box: Optional[np.ndarray] = None, mask_input: Optional[np.ndarray] = None, multimask_output: bool = True,
                return_logits: bool = False, embedding: Optional[Sam2Embedding] = None, adapter: Optional[str] = None,
                masks: bool = True) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
        """SAM2ImagePredictor.predict: (masks (C,H,W) bool or logits, iou (C,), low-res logits (C,4g,4g)).
        After ``set_image(..., tile=...)`` the prompt goes to one tile (``runtime.tiled``)."""
        if embedding is None and self._tiled is not None:
            return self._tiled.predict(point_coords, point_labels, box, mask_input=mask_input,
                                       multimask_output=multimask_output, return_logits=return_logits)
        emb = self._snapshot(embedding)
        pts = lbl = boxes = None
        if point_coords is not None or point_labels is not None:
            pts, lbl = check_points(point_coords, point_labels, emb.original_size)
            pts, lbl = pts[None], lbl[None]
        if box is not None:
            boxes = check_boxes(box, emb.original_size)
        coords, labels = self._prompts(pts, lbl, boxes, emb.original_size)
        out = self._decode(emb, coords, labels, *self._mask_input(mask_input, 1))
        low, iou = select_masks(out["low_res_masks"], out["iou_predictions"], multimask_output, self._selection)
        low, iou = low[0], iou[0]
        full = resize_bilinear(low, emb.original_size) if masks else None
        low = np.clip(low, -LOW_RES_CLAMP, LOW_RES_CLAMP)
        if full is None:
            return None, iou, low
        return (full if return_logits else full > 0.0), iou, low

    def predict_batch(self, boxes: Optional[np.ndarray] = None, points: Optional[np.ndarray] = None,
                      point_labels: Optional[np.ndarray] = None, multimask_output: bool = False,
                      return_logits: bool = False, embedding: Optional[Sam2Embedding] = None,
                      adapter: Optional[str] = None, masks: bool = True
                      ) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
        """K objects in one decoder call: boxes (K,4) and/or points (K,N,2) + labels (K,N)."""
        emb = self._snapshot(embedding)
        pts = lbl = bxs = None
        if points is not None or point_labels is not None:
            pts, lbl = check_points(points, point_labels, emb.original_size, batched=True)
        if boxes is not None:
            bxs = check_boxes(boxes, emb.original_size, batched=True)
        coords, labels = self._prompts(pts, lbl, bxs, emb.original_size)
        out = self._decode(emb, coords, labels, *self._mask_input(None, len(coords)))
        low, iou = select_masks(out["low_res_masks"], out["iou_predictions"], multimask_output, self._selection)
        if not masks:
            return None, iou, np.clip(low, -LOW_RES_CLAMP, LOW_RES_CLAMP)
        full = np.stack([resize_bilinear(m, emb.original_size) for m in low])
        return (full if return_logits else full > 0.0), iou, np.clip(low, -LOW_RES_CLAMP, LOW_RES_CLAMP)

    def segment_everything(self, points_per_side: int = 32, points_per_batch: int = 64, pred_iou_thresh: float = 0.8,
                           stability_score_thresh: float = 0.95, box_nms_thresh: float = 0.7,
                           min_mask_region_area: int = 0, embedding: Optional[Sam2Embedding] = None,
                           adapter: Optional[str] = None, return_masks: bool = False, decoder: str = "auto"
                           ) -> Tuple[np.ndarray, MaskRecords]:
        """SAM2AutomaticMaskGenerator (one crop, its defaults) -> (int32 labels HxW, records). After
        ``set_image(..., tile=...)``: per tile and on the whole image, merged as SAM's crop layers (``runtime.tiled``)."""
        if embedding is None and self._tiled is not None:
            return self._tiled.segment_everything(
                points_per_side=points_per_side, points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
                stability_score_thresh=stability_score_thresh, box_nms_thresh=box_nms_thresh,
                min_mask_region_area=min_mask_region_area, return_masks=return_masks)
        emb = self._snapshot(embedding)
        size, low = emb.original_size, self.low_res_size

        def decode(coords: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
            b = len(coords)
            c = np.concatenate([coords, np.zeros((b, 1, 2))], 1).astype(np.float32)
            lab = np.concatenate([labels, -np.ones((b, 1), np.float32)], 1)
            out = self._decode(emb, c, lab, *self._mask_input(None, b))
            return np.asarray(out["low_res_masks"], np.float32), np.asarray(out["iou_predictions"], np.float32)

        return _segment_everything(
            LowResDecoder(decode), size, (low, low), low, points_per_side=points_per_side,
            points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh, box_nms_thresh=box_nms_thresh,
            min_mask_region_area=min_mask_region_area, return_masks=return_masks,
            to_model_frame=lambda xy: to_sam2_frame(xy, size, self.image_size, np.float64))

    # ---- propagation (video, volumes) ------------------------------------------------------

    @property
    def has_memory_graphs(self) -> bool:
        """Whether this export can ``propagate`` (it was exported with its memory graphs)."""
        return has_memory_graphs(self.manifest)

    def propagator(self) -> Sam2Propagator:
        """The export's memory graphs, opened once (the one-line error where the export has none)."""
        with self._lock:
            if self._propagator is None:
                if not self.has_memory_graphs:
                    raise PeftExportError(no_memory_graphs_message(self.export_dir))
                self._propagator = Sam2Propagator(self.export_dir, self.backend_name, self.device, self._threads,
                                                  self._verify, precision=self.precision)
            return self._propagator

    def propagate(self, frames: Sequence[np.ndarray] | np.ndarray, prompts: Prompts, direction: str = "both",
                  fill_hole_area: Optional[int] = None, progress: Optional[Callable[[int], None]] = None
                  ) -> Iterator[Tuple[int, Dict[Any, np.ndarray]]]:
        """SAM 2's propagation of prompts on some frames through a movie or a volume's slices.

        Yields ``(frame index, {object id: logits (H, W) float32})``, > 0 inside the object, in SAM 2's
        order (forward from the first prompted frame, then backward from it; ``direction`` "forward" /
        "backward" runs one pass). ``frames``: HxW / HxWxC images, a (T, H, W[, C]) array, or a sequence
        with a ``plane_shape``. ``prompts``: {object id: {frame index: dict(points=, labels=, box=, mask=)}}
        in the frames' pixels (``Sam2Propagator.propagate``). The error for an export without memory
        graphs comes at this call, not at the first frame.
        """
        return self.propagator().propagate(frames, prompts, direction, fill_hole_area, progress)

    # ---- automatic instance segmentation (AIS): InstanceSegmentation.segment_instances / instance_maps --------

    def _ais_embedding(self, embedding: Optional[Sam2Embedding], adapter: Optional[str] = None
                       ) -> Tuple[np.ndarray, Tuple[int, int], Tuple[int, int]]:
        """The still-image embedding (``no_mem_embed`` added) the decoder was trained on; its maps cover the
        whole S x S frame (no padding in SAM 2), resized to the image as the mask logits are."""
        emb = self._snapshot(embedding)
        return emb.embedding, (self.image_size, self.image_size), emb.original_size

    def __repr__(self) -> str:
        return f"Sam2Session({str(self.export_dir)!r}, {self.backend_name}, {self.device})"
