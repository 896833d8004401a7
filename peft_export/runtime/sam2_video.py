"""SAM 2 propagation without torch: ``SAM2VideoPredictor`` on an export's graphs (numpy + a backend).

``Sam2Propagator(export_dir).propagate(frames, prompts)`` yields ``(frame index, {object id: mask logits at
the frame's size})`` in the order SAM 2 visits the frames: forward from the first prompted frame to the
end, then backward from it to frame 0 (``direction`` picks one or both). It does what
``add_new_points_or_box`` / ``add_new_mask`` + ``propagate_in_video`` (twice, the second time with
``reverse=True``) do, per object:

- prompted frames are conditioning frames, segmented without memory (features + ``no_mem_embed``) from
  points / boxes (multimask for one click), or taken as they are from a mask; their memories are encoded
  from the (hole-filled) low-res masks, binarised;
- every other frame attends to the chosen memories (``sam2_video_memory``) through the memory attention
  graph, is decoded without prompts, and its memory is encoded from its own sigmoid mask;
- object pointers come from the decoder's output tokens; a frame whose object score is <= 0 predicts no
  object (masks at -1024) and stores the no-object pointer and spatial embedding.

Objects are tracked independently, sharing each frame's encoder pass. Memories that no later frame can
read are dropped, so a long video or volume keeps only a window of them in memory. Memory features are
stored as bfloat16 like SAM 2's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import PeftExportError
from ..fsutil import sha256_file
from .backends import check_backend, open_backend
from .intensity import normalize_intensity
from .manifest import bf16_mode_graphs, check_bf16_backend, read_manifest
from .postprocess import resize_bilinear
from .preprocess import resize_pil, to_uint8
from .sam2_masks import select_masks
from .sam2_video_memory import (
    FrameMemory,
    choose_memories,
    forget_unreachable,
    needed_window,
    pack_bank,
    to_bfloat16_bits,
)
from .sam2_video_prompts import (
    FramePrompt,
    Prompts,
    check_prompts,
    fill_holes,
    mask_input,
    point_inputs,
    resize_antialias,
    with_padding_point,
)

NO_OBJ_SCORE = -1024.0
DIRECTIONS = ("both", "forward", "backward")
VIDEO_GRAPHS = ("memory_attention", "memory_encoder", "obj_ptr", "mask_downsample")


def has_memory_graphs(manifest: Dict[str, Any]) -> bool:
    """Whether an export's manifest lists the memory graphs propagation needs (``merge-and-export --video``)."""
    return isinstance(manifest.get("video"), dict) and "memory_attention" in (manifest.get("graphs") or {})


def no_memory_graphs_message(export_dir: str | Path) -> str:
    return (f"{export_dir}: this export has no memory graphs, so it cannot propagate "
            "(export a SAM 2 model with its video graphs)")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))).astype(np.float32)


class Sam2Propagator:
    """Torch-free SAM 2 video / volume propagation on an export with memory graphs."""

    def __init__(self, export_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                 intra_op_threads: Optional[int] = None, verify_checksums: bool = False,
                 precision: str = "fp32") -> None:
        check_backend(backend)
        check_bf16_backend(precision, backend)
        self.export_dir = Path(export_dir)
        manifest = read_manifest(self.export_dir)
        video, graphs = manifest.get("video"), manifest.get("graphs") or {}
        if not has_memory_graphs(manifest):
            raise PeftExportError(no_memory_graphs_message(self.export_dir))
        self.settings = video
        self.image_size = int(manifest["image_size"])
        self.grid = self.image_size // 16
        pre = video.get("preprocessing") or {}
        self._mean = np.asarray(pre.get("pixel_mean", [0.485, 0.456, 0.406]), np.float32)
        self._std = np.asarray(pre.get("pixel_std", [0.229, 0.224, 0.225]), np.float32)
        self._scale = float(pre.get("input_scale", 255))
        self._interpolation = pre.get("interpolation", "bicubic")
        self._intensity = (manifest.get("preprocessing") or {}).get("intensity")
        if precision not in (graphs.get("encoder") or {}):
            raise PeftExportError(f"{self.export_dir}: no {precision} encoder (available: "
                                  f"{', '.join(sorted(graphs.get('encoder') or {})) or 'none'})")
        names = ["decoder", *VIDEO_GRAPHS]
        if not video.get("use_obj_ptrs_in_encoder"):
            names.remove("mask_downsample")
        paths = {"encoder": self._graph_path(graphs, "encoder", verify_checksums, precision)}
        paths.update({name: self._graph_path(graphs, name, verify_checksums) for name in names})
        self._selection = manifest.get("decoder_selection")  # sam2's dynamic multimask fallback (sam2_masks)
        image_constants = self._load_constants(manifest.get("constants"), verify_checksums)
        video_constants = self._load_constants(video.get("constants"), verify_checksums)
        self._no_mem_embed = image_constants["no_mem_embed"].astype(np.float32).reshape(1, -1, 1, 1)
        self._no_obj_ptr = video_constants["no_obj_ptr"].astype(np.float32) if "no_obj_ptr" in video_constants else None
        self._backend = open_backend(backend, paths, device, intra_op_threads,
                                     *bf16_mode_graphs(graphs, {"encoder": precision}))
        self.providers = list(self._backend.providers)

    @property
    def intensity_rule(self) -> Optional[dict]:
        """The export's intensity rule (manifest preprocessing), applied to each frame."""
        return self._intensity

    def _graph_path(self, graphs: Dict[str, Any], name: str, verify: bool, precision: str = "fp32") -> Path:
        entry = (graphs.get(name) or {}).get(precision)
        if not isinstance(entry, dict) or "path" not in entry:
            raise PeftExportError(f"{self.export_dir}: manifest.json lists no {precision} {name} graph")
        path = self.export_dir / entry["path"]
        if not path.is_file():
            raise PeftExportError(f"{path}: {name} graph listed in manifest.json is missing")
        if verify and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            raise PeftExportError(f"{path}: sha256 does not match manifest.json (file changed or truncated)")
        return path

    def _load_constants(self, entry: Any, verify: bool) -> Dict[str, np.ndarray]:
        path = self.export_dir / str((entry or {}).get("path", ""))
        if not isinstance(entry, dict) or not entry.get("path") or not path.is_file():
            raise PeftExportError(f"{path}: SAM 2 constants listed in manifest.json are missing")
        if verify and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
            raise PeftExportError(f"{path}: sha256 does not match manifest.json (file changed or truncated)")
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    # ---- one frame ---------------------------------------------------------------------

    def frame_input(self, frame: np.ndarray) -> np.ndarray:
        """One frame -> (1,3,S,S) float32 as SAM2VideoPredictor loads it (resize SxS, /255, normalise)."""
        rgb = to_uint8(normalize_intensity(frame, self._intensity))
        resized = resize_pil(rgb, (self.image_size, self.image_size), self._interpolation)
        x = (resized.astype(np.float64) / self._scale).astype(np.float32)
        return ((x - self._mean) / self._std).transpose(2, 0, 1)[None].astype(np.float32)

    def encode(self, frame: np.ndarray) -> Dict[str, np.ndarray]:
        return self._backend.run("encoder", {"image": self.frame_input(frame)})

    def _decode(self, feats: Dict[str, np.ndarray], embed: np.ndarray, coords: np.ndarray, labels: np.ndarray,
                mask: Optional[np.ndarray], multimask: bool) -> Tuple[np.ndarray, np.ndarray, float]:
        """``_forward_sam_heads``: (chosen low-res logits (4g,4g), chosen output token (C,), object score)."""
        s = self.settings
        low = 4 * self.grid
        coords, labels = with_padding_point(coords, labels)
        out = self._backend.run("decoder", {
            "image_embeddings": embed, "high_res_feats_0": feats["high_res_feats_0"],
            "high_res_feats_1": feats["high_res_feats_1"], "point_coords": coords, "point_labels": labels,
            "mask_input": mask if mask is not None else np.zeros((1, 1, low, low), np.float32),
            "has_mask_input": np.array([1.0 if mask is not None else 0.0], np.float32)})
        masks, ious = select_masks(out["low_res_masks"], out["iou_predictions"], multimask, self._selection)
        masks, ious, tokens = masks[0], ious[0], out["sam_output_tokens"][0]
        score = float(out["object_score_logits"].reshape(-1)[0])
        tokens = tokens[1:] if multimask and s["use_multimask_token_for_obj_ptr"] else tokens[:1]
        # SAM2Base._forward_sam_heads
        if s["pred_obj_scores"] and not score > 0:
            masks = np.full_like(masks, NO_OBJ_SCORE)
        token = tokens[0]
        if multimask:
            best = int(np.argmax(ious))
            masks = masks[best:best + 1]
            if len(tokens) > 1:
                token = tokens[best]
        return masks[0], token, score

    def _obj_ptr(self, token: np.ndarray, appearing: float) -> np.ndarray:
        out = self._backend.run("obj_ptr", {"sam_output_token": token.reshape(1, -1).astype(np.float32),
                                            "is_obj_appearing": np.array([[appearing]], np.float32)})
        return out["obj_ptr"][0]

    def _appearing(self, score: float) -> float:
        if self.settings["soft_no_obj_ptr"]:
            return float(_sigmoid(np.float32(score)))
        return 1.0 if score > 0 else 0.0

    def _memory(self, feats: Dict[str, np.ndarray], low_res: np.ndarray, score: float, binarize: bool) -> np.ndarray:
        out = self._backend.run("memory_encoder", {
            "image_embeddings": feats["image_embeddings"], "mask_logits": low_res[None, None].astype(np.float32),
            "object_score_logits": np.array([[score]], np.float32),
            "binarize": np.array([1.0 if binarize else 0.0], np.float32)})
        return to_bfloat16_bits(out["maskmem_features"][0])

    def _multimask(self, is_init_cond_frame: bool, num_points: int) -> bool:
        s = self.settings
        return bool(s["multimask_output_in_sam"] and (is_init_cond_frame or s["multimask_output_for_tracking"])
                    and s["multimask_min_pt_num"] <= num_points <= s["multimask_max_pt_num"])

    def prompted_frame(self, feats: Dict[str, np.ndarray], prompt: FramePrompt, frame_hw: Tuple[int, int],
                       fill_hole_area: int) -> FrameMemory:
        """A conditioning frame: segment from its prompt, then encode its memory (propagate_in_video_preflight)."""
        s = self.settings
        if prompt.mask is not None and s["use_mask_input_as_output_without_sam"]:
            mask = mask_input(prompt.mask, self.image_size)
            appearing = 1.0 if mask.any() else 0.0
            high = mask * np.float32(20.0) - np.float32(10.0)
            low = resize_antialias(high, (self.image_size // 4, self.image_size // 4))
            if s["use_obj_ptrs_in_encoder"]:
                down = self._backend.run("mask_downsample", {"mask": mask[None, None]})["mask_input"]
                coords, labels = np.zeros((1, 1, 2), np.float32), -np.ones((1, 1), np.float32)
                _, token, dec_score = self._decode(feats, feats["image_embeddings"], coords, labels, down, False)
                ptr = self._obj_ptr(token, self._appearing(dec_score))
                if s["pred_obj_scores"]:  # _use_mask_as_output mixes again, by the mask's presence
                    no_obj = self._no_obj_ptr if self._no_obj_ptr is not None else np.zeros_like(ptr)
                    ptr = (ptr * np.float32(appearing) if s["fixed_no_obj_ptr"] else ptr) \
                        + np.float32(1.0 - appearing) * no_obj
            else:
                ptr = np.zeros(int(s["hidden_dim"]), np.float32)
            score = 20.0 * appearing - 10.0
        else:
            if prompt.mask is not None:
                raise PeftExportError("propagate: this SAM 2 model takes masks only as outputs "
                                      "(use_mask_input_as_output_without_sam is off); give points or a box")
            coords, labels = point_inputs(prompt, frame_hw, self.image_size)
            embed = feats["image_embeddings"] + self._no_mem_embed if s["directly_add_no_mem_embed"] else None
            if embed is None:
                raise PeftExportError("propagate: models without directly_add_no_mem_embed are not supported")
            low, token, score = self._decode(feats, embed.astype(np.float32), coords, labels, None,
                                             self._multimask(True, coords.shape[1]))
            ptr = self._obj_ptr(token, self._appearing(score))
        low = fill_holes(low, fill_hole_area)
        maskmem = self._memory(feats, low, score, bool(s["binarize_mask_from_pts_for_mem_enc"]))
        return FrameMemory(maskmem, ptr, score, low)

    def tracked_frame(self, feats: Dict[str, np.ndarray], frame_idx: int, cond: Dict[int, FrameMemory],
                      non_cond: Dict[int, FrameMemory], num_frames: int, reverse: bool
                      ) -> Tuple[FrameMemory, np.ndarray]:
        """A frame without prompt: memory attention, decoder, memory encoder; (its memory, its low-res logits)."""
        choice = choose_memories(frame_idx, cond, non_cond, num_frames, reverse, self.settings)
        feeds = pack_bank(choice, self.settings, self.grid)
        feeds["image_embeddings"] = feats["image_embeddings"]
        embed = self._backend.run("memory_attention", feeds)["pix_feat_with_mem"]
        coords, labels = np.zeros((1, 1, 2), np.float32), -np.ones((1, 1), np.float32)
        low, token, score = self._decode(feats, embed, coords, labels, None, self._multimask(False, 0))
        ptr = self._obj_ptr(token, self._appearing(score))
        maskmem = self._memory(feats, low, score, False)
        return FrameMemory(maskmem, ptr, score), low

    # ---- a whole clip ---------------------------------------------------------------------

    def propagate(self, frames: Sequence[np.ndarray] | np.ndarray, prompts: Prompts, direction: str = "both",
                  fill_hole_area: Optional[int] = None,
                  progress: Optional[Callable[[int], None]] = None) -> Iterator[Tuple[int, Dict[Any, np.ndarray]]]:
        """Yield (frame index, {object id: logits (H, W) float32}) over the clip; > 0 is the object.

        ``frames``: a sequence of HxW / HxWxC images or a (T, H, W[, C]) array (a volume: slices are
        frames); a sequence with a ``plane_shape`` (a stack's planes, read when encoded) gives every frame
        that size. ``prompts``: {object id: {frame index: FramePrompt or dict(points=, labels=, box=, mask=)}}.
        ``fill_hole_area``: SAM2VideoPredictor's hole filling of low-res masks (default: the export's, 8).
        ``progress`` is called with each frame index done.
        """
        if direction not in DIRECTIONS:
            raise PeftExportError(f"propagate: direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
        num_frames = len(frames)
        if num_frames == 0:
            raise PeftExportError("propagate: no frames")
        prompts = check_prompts(prompts, num_frames)
        fill = int(self.settings["fill_hole_area"] if fill_hole_area is None else fill_hole_area)
        plane_shape = getattr(frames, "plane_shape", None)  # a stack's planes share one shape: none is read for it
        sizes = ([tuple(plane_shape)] * num_frames if plane_shape is not None
                 else [tuple(np.shape(frames[i])[:2]) for i in range(num_frames)])
        cache: Dict[str, Any] = {"index": None}

        def features(i: int) -> Dict[str, np.ndarray]:
            if cache["index"] != i:  # SAM 2 keeps the most recent frame's features
                cache.update(index=i, feats=self.encode(np.asarray(frames[i])))
            return cache["feats"]

        cond: Dict[Any, Dict[int, FrameMemory]] = {obj: {} for obj in prompts}
        non_cond: Dict[Any, Dict[int, FrameMemory]] = {obj: {} for obj in prompts}
        for frame_idx in sorted({f for p in prompts.values() for f in p}):
            for obj, per_frame in prompts.items():
                if frame_idx in per_frame:
                    cond[obj][frame_idx] = self.prompted_frame(features(frame_idx), per_frame[frame_idx],
                                                               sizes[frame_idx], fill)
        start = min(f for p in prompts.values() for f in p)
        passes: List[Tuple[bool, range]] = []
        if direction in ("both", "forward"):
            passes.append((False, range(start, num_frames)))
        if direction in ("both", "backward") and start > 0:
            passes.append((True, range(start, -1, -1)))
        window = needed_window(self.settings)
        for reverse, order in passes:
            for frame_idx in order:
                logits = {}
                for obj in prompts:
                    if frame_idx in cond[obj]:
                        low = cond[obj][frame_idx].pred_masks
                    else:
                        memory, low = self.tracked_frame(features(frame_idx), frame_idx, cond[obj], non_cond[obj],
                                                         num_frames, reverse)
                        non_cond[obj][frame_idx] = memory
                        low = fill_holes(low, fill)
                    logits[obj] = resize_bilinear(low, sizes[frame_idx])
                    forget_unreachable(non_cond[obj], frame_idx, reverse, start, window)
                if progress:
                    progress(frame_idx)
                yield frame_idx, logits


def propagate_labels(session: Sam2Propagator, frames: Sequence[np.ndarray] | np.ndarray, prompts: Prompts,
                     direction: str = "both", fill_hole_area: Optional[int] = None,
                     progress: Optional[Callable[[int], None]] = None) -> Tuple[np.ndarray, Dict[Any, int]]:
    """Propagate and combine the objects into one label stack (T, H, W) uint16.

    Returns (labels, {object id: label}): integer ids >= 1 are their own labels, other ids are numbered
    1.. in order. A pixel belongs to the object with the highest logit among those > 0 (sam2's
    non-overlap rule); frames the passes did not reach stay 0.
    """
    objects = list(prompts)
    numeric = all(isinstance(o, (int, np.integer)) and 0 < int(o) < 65536 for o in objects)
    ids = {obj: (int(obj) if numeric else i + 1) for i, obj in enumerate(objects)}
    if len(ids) > 65535:
        raise PeftExportError("propagate: more than 65535 objects")
    first = np.asarray(frames[0])
    labels = np.zeros((len(frames), *first.shape[:2]), np.uint16)
    lut = np.array([0] + [ids[o] for o in objects], np.uint16)
    for frame_idx, logits in session.propagate(frames, prompts, direction, fill_hole_area, progress):
        stack = np.stack([logits[o] for o in objects])
        best = np.argmax(stack, axis=0)
        inside = np.take_along_axis(stack, best[None], 0)[0] > 0
        labels[frame_idx] = np.where(inside, lut[best + 1], 0)
    return labels, ids
