"""SamSession: torch-free SAM inference on an export dir (manifest.json + ONNX graphs).

Automatic instance segmentation (``segment_instances``) runs micro-sam's instance decoder
(``ais_decoder.onnx``, when the export has one) and a seeded watershed (``runtime.instances``).

Thread-safety: ``set_image`` holds a lock and then swaps in one immutable
``ImageEmbedding``; ``predict`` reads that snapshot once, so a concurrent
``set_image`` never mixes two images in one prediction. Threads that serve different
images at the same time call ``encode(image)`` and pass ``embedding=`` to
``predict``/``predict_batch``/``segment_everything``. ONNX Runtime's ``run`` is
thread-safe, so one session can be shared.

Exports of several adapters (``session.adapters``): ``set_image`` runs the shared trunk once
and each adapter's head on first use (``runtime.adapters.EncodedImage``); ``predict``,
``predict_batch`` and ``segment_everything`` take ``adapter=NAME`` (optional when there is one).

Longer than 400 lines because it is the one public entry of the runtime: graph selection, images,
prompts and the adapter / tile routing of every call meet here; the work itself lives in the modules
it imports.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import PeftExportError
from ..fsutil import sha256_file
from .adapters import EncodedImage, adapter_routes, choose_adapter_graphs, pick_adapter, resolve_embedding
from .adapters import select_routes
from .backends import check_backend, graph_kind, open_backend
from .automatic import AutomaticSegmentation
from .embedding import MAX_BATCH_MASK_BYTES, ImageEmbedding
from .manifest import PRECISIONS, bf16_mode_graphs, check_bf16_backend, read_manifest
from .postprocess import postprocess_masks
from .preprocess import prepare_image
from .prompts import check_boxes, check_points, encode_prompts, mask_input_feed
from .split_decoder import SPLIT_GRAPHS, FamilyDecoder, takes_mask_input


class SamSession(AutomaticSegmentation):
    """Prompted and automatic SAM segmentation from an export dir, without torch.

    On a SAM 2 export (manifest ``family`` "sam2") ``SamSession(...)`` returns a ``Sam2Session``
    (``runtime.sam2_session``): the same calls, SAM 2's graphs and conventions."""

    def __new__(cls, export_dir: str | Path, *args: Any, **kwargs: Any):
        if cls is SamSession and Path(export_dir).is_dir() and read_manifest(export_dir).get("family") == "sam2":
            from .sam2_session import Sam2Session

            return Sam2Session(export_dir, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        export_dir: str | Path,
        backend: str = "onnxruntime",
        device: str = "cpu",
        precision: str = "fp32",
        intra_op_threads: Optional[int] = None,
        verify_checksums: bool = False,
        adapters: Optional[Sequence[str]] = None,
    ) -> None:
        """``adapters``: with an export of several, load only these (default: all); a session of
        one adapter needs no ``adapter=`` in its calls."""
        check_backend(backend)
        if device not in ("cpu", "cuda"):
            raise PeftExportError(f"device: unknown '{device}' (use cpu or cuda)")
        if precision not in PRECISIONS:
            raise PeftExportError(f"precision: unknown '{precision}' (use {', '.join(PRECISIONS)})")
        check_bf16_backend(precision, backend)
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        self.backend_name, self.device, self.precision = backend, device, precision
        self.image_size = int(self.manifest["image_size"])
        self.low_res_size = int(self.manifest.get("low_res_size", 4 * (self.image_size // 16)))
        pre = self.manifest["preprocessing"]
        self._intensity_rule = pre.get("intensity")
        self._pixel_mean = pre.get("pixel_mean", [123.675, 116.28, 103.53])
        self._pixel_std = pre.get("pixel_std", [58.395, 57.12, 57.375])
        self._interpolation = pre.get("interpolation", "bilinear")

        self._chosen: Dict[str, Tuple[str, Path]] = {}
        self._routes = select_routes(adapter_routes(self.manifest), adapters)
        if self._routes:
            if graph_kind(backend) != "onnx":
                raise PeftExportError(f"backend {backend}: exports of several adapters run ONNX graphs only")
            self._chosen = choose_adapter_graphs(self.manifest, self._routes, precision,
                                                 lambda entry, key: self._graph_file(entry, key, verify_checksums))
            paths = {k: p for k, (_, p) in self._chosen.items()}
        elif graph_kind(backend) == "onnx":
            self._choose_onnx(verify_checksums)
            paths = {k: p for k, (_, p) in self._chosen.items()}
        else:
            paths = self._choose_engines()
        self._backend: Any = open_backend(backend, paths, device, intra_op_threads,
                                          *bf16_mode_graphs(self.manifest["graphs"],
                                                            {k: p for k, (p, _) in self._chosen.items()}))
        self.providers: List[str] = list(self._backend.providers)
        self._lock = threading.Lock()
        self._embedding: Optional[Union[ImageEmbedding, EncodedImage]] = None
        self._tiled: Any = None  # a TiledImage after set_image(..., tile=...)
        self._intra_op_threads = intra_op_threads
        self._families: Dict[Tuple[str, ...], FamilyDecoder] = {}  # per adapter (its split_image context)

    @property
    def adapters(self) -> Tuple[str, ...]:
        """Names of the adapters of an export of several; () for a single-model export."""
        return tuple(self._routes)

    # ---- graph selection -------------------------------------------------------------

    def _graph_file(self, entry: Dict[str, Any], what: str, verify: bool) -> Path:
        path = self.export_dir / entry["path"]
        if not path.is_file():
            raise PeftExportError(f"{path}: {what} graph listed in manifest.json is missing")
        if verify and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            raise PeftExportError(f"{path}: sha256 does not match manifest.json (file changed or truncated)")
        return path

    def _choose_onnx(self, verify: bool) -> None:
        graphs = self.manifest["graphs"]
        enc = graphs.get("encoder", {})
        if self.precision not in enc:
            from .manifest import missing_precision_message  # refused at export: says why

            raise PeftExportError("precision: " + missing_precision_message(self.manifest, self.export_dir,
                                                                            self.precision, enc))
        self._chosen["encoder"] = (self.precision, self._graph_file(enc[self.precision], "encoder", verify))
        for name in ("decoder_lowres", "decoder", *SPLIT_GRAPHS):
            variants = graphs.get(name) or {}
            prec = self.precision if self.precision in variants else "fp32"
            if prec in variants:
                self._chosen[name] = (prec, self._graph_file(variants[prec], name, verify))
        if not {"decoder_lowres", "decoder"} & set(self._chosen) and self._family_keys(None) is None:
            raise PeftExportError(f"{self.export_dir}: manifest.json lists no fp32 decoder graph")
        ais = graphs.get("ais_decoder") or {}  # micro-sam's instance decoder, when the model had one
        prec = self.precision if self.precision in ais else "fp32"
        if prec in ais:
            self._chosen["ais_decoder"] = (prec, self._graph_file(ais[prec], "ais_decoder", verify))

    def _choose_engines(self) -> Dict[str, Path]:
        engines = (self.manifest.get("tensorrt") or {}).get("engines") or {}
        if not engines:
            raise PeftExportError(f"{self.export_dir}: this export has no TensorRT engines (export with --tensorrt)")
        paths = {}
        for name in ("encoder", "decoder_lowres", "decoder"):
            entry = engines.get(name)
            if entry is None:
                continue
            if isinstance(entry, dict) and "path" not in entry:  # per precision
                prec = self.precision if self.precision in entry else "fp32"
                if name == "encoder" and self.precision not in entry:
                    raise PeftExportError(f"precision: no {self.precision} TensorRT encoder engine in this export")
                if prec not in entry:
                    continue
                entry = entry[prec]
            else:
                prec = self.precision
            rel = entry["path"] if isinstance(entry, dict) else entry
            path = self.export_dir / rel
            if not path.is_file():
                raise PeftExportError(f"{path}: TensorRT engine listed in manifest.json is missing")
            self._chosen[name] = (prec, path)
            paths[name] = path
        if "encoder" not in paths or not ({"decoder_lowres", "decoder"} & set(paths)):
            raise PeftExportError(f"{self.export_dir}: TensorRT engines need an encoder and a decoder")
        return paths

    def describe(self) -> Dict[str, Any]:
        """What runs: backend, device, providers, and the graph file and precision of each part."""
        return {
            "export_dir": str(self.export_dir),
            "model_type": self.manifest.get("model_type"),
            "image_size": self.image_size,
            "backend": self.backend_name,
            "device": self.device,
            "providers": self.providers,
            "precision_asked": self.precision,
            "graphs": {k: {"precision": p, "path": path.name,
                           # OpenVINO's bf16 inference precision (bf16; int8 verified that way, native bf16 CPUs)
                           "bf16_mode": k in getattr(self._backend, "bf16_graphs", ())}
                       for k, (p, path) in self._chosen.items()},
            # what predict / predict_batch decode prompts with
            "decoder_used": ("family" if any(k.startswith("split_prompts") and takes_mask_input(self.manifest["graphs"][k])
                                             for k in self._chosen)
                             else "decoder_lowres" if any(k.startswith("decoder_lowres") for k in self._chosen)
                             else "decoder"),
            "adapters": list(self.adapters),
            "split_block": (self.manifest.get("shared_trunk") or {}).get("split_block"),
            "intensity": self._intensity_rule,
            "interpolation": self._interpolation,
        }

    # ---- image ---------------------------------------------------------------------------

    def encode(self, image: np.ndarray, adapters: Optional[Sequence[str]] = None) -> Union[ImageEmbedding, EncodedImage]:
        """Normalise, resize and encode one image (2D gray or HxWx3/4, any dtype); no session state.

        Exports of several adapters give an ``EncodedImage``: the trunk has run, each head runs
        on first use (now for the names in ``adapters``); pass it as ``embedding=``.
        """
        x, original_size, input_size = prepare_image(
            image, self._intensity_rule, self.image_size, self._pixel_mean, self._pixel_std, self._interpolation
        )
        return self.encode_prepared(x, original_size, input_size, adapters)

    def encode_prepared(self, x: np.ndarray, original_size: Tuple[int, int], input_size: Tuple[int, int],
                        adapters: Optional[Sequence[str]] = None) -> Union[ImageEmbedding, EncodedImage]:
        """``encode`` of an encoder input already prepared (1x3xSxS; a tile of ``runtime.tiling``)."""
        if self._routes:
            encoded = EncodedImage(x, original_size, input_size, self._routes, self._run_graph, self._checked_embedding)
            encoded.run_trunk()
            encoded.prefetch(pick_adapter(a, self.adapters) for a in (adapters or ()))
            return encoded
        if adapters:
            pick_adapter(adapters[0], ())  # raises: a single-model export has no named adapters
        out = self._backend.run("encoder", {"image": x})
        emb = np.asarray(out.get("image_embeddings", next(iter(out.values()))), dtype=np.float32)
        return self._checked_embedding(emb, original_size, input_size, None)

    def encode_tile(self, pixels: np.ndarray, intensity: Any, spec: Any) -> Union[ImageEmbedding, EncodedImage]:
        """One tile of a large image or a volume's plane (``runtime.tiled``): its native pixels normalised
        with the whole image's ``IntensityRange``, at the tile's scale (``TileSpec``). ``Sam2Session`` has
        the same call: the tiled and volume code encode through it whatever the model family."""
        from .tiling import prepare_tile

        return self.encode_prepared(*prepare_tile(pixels, intensity, spec, self._pixel_mean, self._pixel_std,
                                                  self._interpolation))

    def encode_whole(self, image: Any, intensity: Any, image_size: int) -> Union[ImageEmbedding, EncodedImage]:
        """A large image whole at the model input (segment-everything's coarse layer; ``tiling.prepare_whole``)."""
        from .tiling import prepare_whole

        return self.encode_prepared(*prepare_whole(image, intensity, image_size, self._pixel_mean, self._pixel_std,
                                                   self._interpolation))

    def _checked_embedding(self, emb: np.ndarray, original_size, input_size, adapter: Optional[str]) -> ImageEmbedding:
        g = self.image_size // 16
        if emb.shape[0] != 1 or emb.shape[-2:] != (g, g):
            raise PeftExportError(f"encoder: output shape {emb.shape} does not match image size {self.image_size}")
        emb.setflags(write=False)
        return ImageEmbedding(emb, original_size, input_size, adapter)

    def _run_graph(self, key: str, x: np.ndarray) -> np.ndarray:
        """One graph of an adapter's encoder chain: its only input in, its only output out."""
        inputs = (self.manifest["graphs"][key][self._chosen[key][0]].get("inputs") or [{"name": "image"}])
        return next(iter(self._backend.run(key, {inputs[0]["name"]: x}).values()))

    def set_image(self, image: np.ndarray, adapters: Optional[Sequence[str]] = None, tile: Optional[int] = None,
                  halo: Optional[int] = None, scale: Optional[float] = None) -> None:
        """Encode ``image`` once; later ``predict`` calls use it (several adapters: the trunk runs
        now, each head on first use, or now for the names in ``adapters``).

        ``tile``/``halo``/``scale`` (any of them): a large image at full resolution, tile by tile
        (``tiled``); ``predict``, ``segment_instances`` and ``segment_everything`` then work on the
        whole image through its tiles. An image that fits in one tile is encoded as without them.
        """
        if tile is None and halo is None and scale is None:
            with self._lock:
                self._embedding, self._tiled = self.encode(image, adapters), None
            return
        tiled = self.tiled(image, tile=tile, halo=halo, scale=scale,
                           adapter=adapters[0] if adapters else None)
        with self._lock:
            self._embedding, self._tiled = None, tiled

    def tiled(self, image: Any, tile: Optional[int] = None, halo: Optional[int] = None,
              scale: Optional[float] = None, adapter: Optional[str] = None) -> Any:
        """A ``TiledImage`` of ``image`` (numpy, memmap or zarr array, HxW or HxWxC): tiles of ``tile``
        native pixels resized to the model input (default: the export's training scale), ``halo``
        pixels of context per side (default tile / 4); see ``runtime.tiled``."""
        from .tiled import TiledImage
        from .tiling import tile_spec

        return TiledImage(self, image, tile_spec(self.manifest, tile, halo, scale, adapter), adapter)

    def reset_image(self) -> None:
        with self._lock:
            self._embedding, self._tiled = None, None

    def get_image_embedding(self, adapter: Optional[str] = None) -> np.ndarray:
        """The (1,256,g,g) embedding of the image given to ``set_image`` (of ``adapter``, if several)."""
        return self._snapshot(None, adapter).embedding

    def _snapshot(self, embedding: Optional[Union[ImageEmbedding, EncodedImage]], adapter: Optional[str] = None
                  ) -> ImageEmbedding:
        emb = embedding if embedding is not None else self._embedding
        if emb is None:
            raise PeftExportError("predict: no image set; call set_image(image) first or pass embedding=")
        return resolve_embedding(emb, adapter, self.adapters)

    def _decoder_graphs(self, emb: ImageEmbedding) -> Tuple[Optional[str], Optional[str]]:
        """(batched low-res decoder, Meta decoder) graph keys for ``emb``'s adapter; None where absent."""
        if emb.adapter is None:
            names = ("decoder_lowres", "decoder")
        else:
            route = self._routes[emb.adapter]
            names = (route.decoder_lowres, route.decoder)
        return tuple(n if n in self._chosen else None for n in names)  # type: ignore[return-value]

    def _family_keys(self, adapter: Optional[str]) -> Optional[Tuple[str, ...]]:  # its family, if loaded
        keys = self._routes[adapter].family if adapter is not None else SPLIT_GRAPHS
        return tuple(keys) if keys and all(k in self._chosen for k in keys) else None

    def _family(self, emb: ImageEmbedding) -> Optional[FamilyDecoder]:
        """The decoder family of ``emb``'s adapter when its split_prompts takes mask input (exports
        from before that run ``decoder_lowres``/``decoder`` for prompts, as they always did)."""
        keys = self._family_keys(emb.adapter)
        if keys is None or not takes_mask_input(self.manifest["graphs"].get(keys[1])):
            return None
        return self._families.setdefault(keys, FamilyDecoder(self._backend.run, keys))  # type: ignore[arg-type]

    # ---- decoding --------------------------------------------------------------------------

    def _check_mask_input(self, mask_input: Optional[np.ndarray], k: int) -> Tuple[np.ndarray, np.ndarray]:
        return mask_input_feed(mask_input, k, self.low_res_size)

    def _decode_lowres(self, emb: ImageEmbedding, coords: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                       has_mask: np.ndarray, prefer_lowres: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """(K,M,2),(K,M) prompts -> low-res logits (K,4,4g,4g), iou (K,4): the family where the export
        has it, else ``decoder_lowres`` (TensorRT engines, older exports), else Meta's ``decoder``;
        ``prefer_lowres``: ``decoder_lowres`` first where the export has it (segment-everything's "lowres")."""
        family = self._family(emb)
        lowres, _ = self._decoder_graphs(emb)
        if family is not None and not (prefer_lowres and lowres is not None):
            return family.decode(emb.embedding, coords, labels, mask, has_mask)
        if lowres is not None:
            out = self._backend.run(lowres, {"image_embeddings": emb.embedding, "point_coords": coords,
                                             "point_labels": labels, "mask_input": mask, "has_mask_input": has_mask})
            return (np.asarray(out["low_res_masks"], np.float32), np.asarray(out["iou_predictions"], np.float32))
        lows, ious = [], []
        for i in range(len(coords)):  # the Meta graph takes one prompt set per call
            out = self._run_meta(emb, coords[i : i + 1], labels[i : i + 1], mask[i : i + 1], has_mask[i : i + 1])
            lows.append(out["low_res_masks"])
            ious.append(out["iou_predictions"])
        return np.concatenate(lows).astype(np.float32), np.concatenate(ious).astype(np.float32)

    def _run_meta(self, emb, coords, labels, mask, has_mask) -> Dict[str, np.ndarray]:
        return self._backend.run(self._decoder_graphs(emb)[1], {
            "image_embeddings": emb.embedding, "point_coords": coords, "point_labels": labels, "mask_input": mask,
            "has_mask_input": has_mask, "orig_im_size": np.asarray(emb.original_size, np.float32)})

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        embedding: Optional[Union[ImageEmbedding, EncodedImage]] = None,
        adapter: Optional[str] = None,
        masks: bool = True,
    ) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
        """SamPredictor.predict: (masks (C,H,W) bool or logits, iou (C,), low-res logits (C,4g,4g)).

        Coordinates are x,y pixels of the original image; box is XYXY; mask_input is the
        (1,4g,4g) low-res logits of an earlier call. C = 3 with multimask_output else 1.
        ``adapter`` names the adapter of an export of several (optional when it has one).
        ``masks=False`` returns None for the masks: ``upsample_masks`` then makes only the ones
        wanted (e.g. the best of three). After ``set_image(..., tile=...)`` the prompt goes to one
        tile (``runtime.tiled``), which always returns its masks.
        """
        if embedding is None and self._tiled is not None:
            return self._tiled.predict(point_coords, point_labels, box, mask_input=mask_input,
                                       multimask_output=multimask_output, return_logits=return_logits)
        emb = self._snapshot(embedding, adapter)
        pts = lbl = boxes = None
        if point_coords is not None or point_labels is not None:
            pts, lbl = check_points(point_coords, point_labels, emb.original_size)
            pts, lbl = pts[None], lbl[None]
        if box is not None:
            boxes = check_boxes(box, emb.original_size)
        coords, labels = encode_prompts(pts, lbl, boxes, emb.original_size, self.image_size)
        mask, has_mask = self._check_mask_input(mask_input, 1)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        # Every decoder gives low-res logits and the upsampling is done here (postprocess_masks,
        # bit for bit SamPredictor's); the Meta graph's "masks" output (crop in-graph) is not used.
        low, iou = self._decode_lowres(emb, coords, labels, mask, has_mask)
        low, iou = low[0, sel], iou[0, sel]
        if not masks:
            return None, iou, low
        out = postprocess_masks(low, emb.input_size, emb.original_size, self.image_size)
        return (out if return_logits else out > 0.0), iou, low

    def upsample_masks(self, low_res: np.ndarray, embedding: Optional[Union[ImageEmbedding, EncodedImage]] = None,
                       adapter: Optional[str] = None) -> np.ndarray:
        """Low-res logits (..., 4g, 4g) of ``predict``/``predict_batch`` -> logits (..., H, W) of the
        image (SamPredictor's ``postprocess_masks``); ``> 0`` gives the masks."""
        emb = self._snapshot(embedding, adapter)
        return postprocess_masks(low_res, emb.input_size, emb.original_size, self.image_size)

    def predict_batch(
        self,
        boxes: Optional[np.ndarray] = None,
        points: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        multimask_output: bool = False,
        return_logits: bool = False,
        embedding: Optional[Union[ImageEmbedding, EncodedImage]] = None,
        adapter: Optional[str] = None,
        masks: bool = True,
    ) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
        """K objects in one decoder call: boxes (K,4) and/or points (K,N,2) + labels (K,N).

        Returns masks (K,C,H,W), iou (K,C), low-res logits (K,C,4g,4g). ``masks=False`` returns
        None for the masks (the low-res logits are what a big image's caller upsamples itself);
        a mask stack over ``MAX_BATCH_MASK_BYTES`` is refused with its size before any decoding.
        """
        emb = self._snapshot(embedding, adapter)
        pts = lbl = bxs = None
        if points is not None or point_labels is not None:
            pts, lbl = check_points(points, point_labels, emb.original_size, batched=True)
        if boxes is not None:
            bxs = check_boxes(boxes, emb.original_size, batched=True)
        coords, labels = encode_prompts(pts, lbl, bxs, emb.original_size, self.image_size)
        k = len(coords)
        h, w = emb.original_size
        c = 3 if multimask_output else 1
        need = k * c * h * w * (4 if return_logits else 1)
        if masks and need > MAX_BATCH_MASK_BYTES:
            raise PeftExportError(
                f"predict_batch: {k} prompts x {c} masks x {h}x{w} {'float32' if return_logits else 'bool'} would take "
                f"{need / 2**30:.1f} GiB (limit {MAX_BATCH_MASK_BYTES / 2**30:.0f} GiB); pass fewer prompts per call, "
                "or masks=False for the low-res logits only")
        mask, has_mask = np.zeros((k, 1, self.low_res_size, self.low_res_size), np.float32), np.zeros((k,), np.float32)
        low, iou = self._decode_lowres(emb, coords, labels, mask, has_mask)
        sel = slice(1, None) if multimask_output else slice(0, 1)
        low, iou = low[:, sel], iou[:, sel]
        if not masks:
            return None, iou, low
        out = np.empty((k, low.shape[1], h, w), dtype=np.float32 if return_logits else bool)
        for i in range(k):  # one object at a time keeps the float peak at one object's size
            m = postprocess_masks(low[i], emb.input_size, emb.original_size, self.image_size)
            out[i] = m if return_logits else m > 0.0
        return out, iou, low

    def __repr__(self) -> str:
        d = self.describe()
        return f"SamSession({d['export_dir']!r}, {d['backend']}, {d['device']}, graphs={d['graphs']})"
