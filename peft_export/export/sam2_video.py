"""Export SAM 2's video path: the memory graphs, their settings and constants, verified against sam2.

``export_video_graphs(model, export_dir)`` adds to an export directory (the image export's, or a new one):

- ``memory_attention.onnx``, ``memory_encoder.onnx``, ``obj_ptr.onnx``, ``mask_downsample.onnx``
  (``sam2_video_graphs``), each checked with ONNX Runtime against its torch
  module, and the memory attention also against sam2's own ``MemoryAttention`` on a bank with padded
  slots (the padding must change nothing);
- ``sam2_video_constants.npz`` (``no_mem_embed``, ``no_obj_ptr``);
- the manifest section ``video``: every ``SAM2Base`` / ``SAM2VideoPredictor`` setting the
  torch-free tracker (``runtime.sam2_video``) follows.

The memory bank has a fixed capacity: ``max_cond_frames`` conditioning slots plus ``num_maskmem - 1``
recent-frame slots, and ``max_cond_frames + max_obj_ptrs_in_encoder - 1`` object pointers. With more
prompted frames than ``max_cond_frames`` the tracker chooses them as SAM 2 does with
``max_cond_frames_in_attn = max_cond_frames`` (the temporally closest, one before and one after first).

``export_sam2_video(model, out)`` writes a whole export (the image graphs of ``sam2_video_image`` plus the
above) in one atomic step; the image export (``export/sam2_image*``) runs ``video_graphs_hook()`` inside
its own temporary directory instead. Layout and names: /work/notes/sam2_interface.md (graphs ``encoder``,
``decoder``, ``memory_attention``, ``memory_encoder``, ``obj_ptr``, ``mask_downsample`` in ``graphs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

from ..errors import PeftExportError
from ..fsutil import atomic_dir
from .manifest import FORMAT, FORMAT_VERSION, file_entry, graph_entry, versions, write_manifest
from .onnx_graphs import _export
from .sam2_video_graphs import (
    MaskDownsampleGraph,
    MemoryAttentionGraph,
    MemoryEncoderGraph,
    ObjPtrGraph,
    check_video_model,
)
from .sam2_video_image import Sam2DecoderGraph, Sam2EncoderGraph

CONSTANTS_FILE = "sam2_video_constants.npz"  # the image export's own constants are sam2_constants.npz
DEFAULT_MAX_COND_FRAMES = 2
# ONNX Runtime vs torch on the same module, max |difference| / max |reference|
PARITY_LIMIT = 1e-4
# SAM2VideoPredictor's inference settings (build_sam2_video_predictor's overrides), for a model built
# with build_sam2 (the image builder), which lacks them.
PREDICTOR_DEFAULTS = {
    "binarize_mask_from_pts_for_mem_enc": True,
    "fill_hole_area": 8,
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}
MODEL_SETTINGS = (
    "num_maskmem", "image_size", "hidden_dim", "mem_dim", "memory_temporal_stride_for_eval",
    "use_obj_ptrs_in_encoder", "max_obj_ptrs_in_encoder", "add_tpos_enc_to_obj_ptrs", "use_signed_tpos_enc_to_obj_ptrs",
    "only_obj_ptrs_in_the_past_for_eval", "directly_add_no_mem_embed", "use_mask_input_as_output_without_sam",
    "multimask_output_in_sam", "multimask_output_for_tracking", "multimask_min_pt_num", "multimask_max_pt_num",
    "use_multimask_token_for_obj_ptr", "pred_obj_scores", "soft_no_obj_ptr", "fixed_no_obj_ptr",
    "max_cond_frames_in_attn",
)


def _t(name: str, shape: list, dtype: str = "float32") -> dict:
    return {"name": name, "shape": shape, "dtype": dtype}


def video_settings(model: torch.nn.Module, max_cond_frames: int) -> dict:
    """What the tracker follows: the model's flags, the predictor's settings and the bank's capacity."""
    settings = {k: getattr(model, k) for k in MODEL_SETTINGS}
    settings = {k: (v.item() if hasattr(v, "item") else v) for k, v in settings.items()}
    dec = model.sam_mask_decoder
    settings.update({
        "binarize_mask_from_pts_for_mem_enc": bool(getattr(model, "binarize_mask_from_pts_for_mem_enc", False))
        or PREDICTOR_DEFAULTS["binarize_mask_from_pts_for_mem_enc"],
        "fill_hole_area": int(getattr(model, "fill_hole_area", PREDICTOR_DEFAULTS["fill_hole_area"])),
        "dynamic_multimask_via_stability": bool(dec.dynamic_multimask_via_stability),
        "dynamic_multimask_stability_delta": float(dec.dynamic_multimask_stability_delta),
        "dynamic_multimask_stability_thresh": float(dec.dynamic_multimask_stability_thresh),
        "max_cond_frames": int(max_cond_frames),
        "memory_slots": int(max_cond_frames + model.num_maskmem - 1),
        "pointer_slots": (int(max_cond_frames + model.max_obj_ptrs_in_encoder - 1)
                          if model.use_obj_ptrs_in_encoder else 0),
        # SAM2VideoPredictor's frame loading (load_video_frames): PIL bicubic resize of the uint8 RGB frame
        # to SxS, /255 in float64 -> float32, then (x - mean) / std in float32
        "preprocessing": {"resize": "square", "interpolation": "bicubic", "input_scale": 255,
                          "pixel_mean": [0.485, 0.456, 0.406], "pixel_std": [0.229, 0.224, 0.225]},
    })
    return settings


def graph_specs(model: torch.nn.Module, settings: dict) -> Dict[str, tuple]:
    """name -> (module, example inputs, input specs, output specs, external data)."""
    s, c, m = model.image_size, model.hidden_dim, model.mem_dim
    g = s // model.backbone_stride
    slots, ptrs = settings["memory_slots"], settings["pointer_slots"]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    specs: Dict[str, tuple] = {}
    valid = torch.ones(slots)
    valid[1:slots:2] = 0  # padding in the example: the checks see masked slots
    attn_in = [rand(1, c, g, g), rand(slots, m, g, g), torch.arange(slots) % model.num_maskmem, valid]
    attn_specs = [_t("image_embeddings", [1, c, g, g]), _t("memory", [slots, m, g, g]),
                  _t("memory_tpos", [slots], "int64"), _t("memory_valid", [slots])]
    if ptrs:
        pvalid = (torch.arange(ptrs) % 3 != 1).float()
        attn_in += [rand(ptrs, c), torch.rand(ptrs, generator=gen) * 2 - 1, pvalid]
        attn_specs += [_t("obj_ptrs", [ptrs, c]), _t("obj_ptr_pos", [ptrs]), _t("obj_ptr_valid", [ptrs])]
    specs["memory_attention"] = (MemoryAttentionGraph(model, g, slots, ptrs), attn_in, attn_specs,
                                 [_t("pix_feat_with_mem", [1, c, g, g])], False)
    specs["memory_encoder"] = (
        MemoryEncoderGraph(model), [rand(1, c, g, g), rand(1, 1, 4 * g, 4 * g) * 8, torch.tensor([[1.5]]),
                                    torch.tensor([0.0])],
        [_t("image_embeddings", [1, c, g, g]), _t("mask_logits", [1, 1, 4 * g, 4 * g]), _t("object_score_logits", [1, 1]),
         _t("binarize", [1])], [_t("maskmem_features", [1, m, g, g])], False)
    specs["obj_ptr"] = (ObjPtrGraph(model), [rand(1, c), torch.tensor([[1.0]])],
                        [_t("sam_output_token", [1, c]), _t("is_obj_appearing", [1, 1])],
                        [_t("obj_ptr", [1, c])], False)
    if model.use_obj_ptrs_in_encoder:
        specs["mask_downsample"] = (MaskDownsampleGraph(model), [(rand(1, 1, s, s) > 0).float()],
                                    [_t("mask", [1, 1, s, s])], [_t("mask_input", [1, 1, 4 * g, 4 * g])],
                                    False)
    return specs


def image_graph_specs(model: torch.nn.Module) -> Dict[str, tuple]:
    """The image graphs the tracker needs (``sam2_video_image``), for a standalone video export."""
    s, c = model.image_size, model.hidden_dim
    g = s // model.backbone_stride
    gen = torch.Generator().manual_seed(1)
    feats = [_t("high_res_feats_0", [1, c // 8, 4 * g, 4 * g]), _t("high_res_feats_1", [1, c // 4, 2 * g, 2 * g]),
             _t("image_embeddings", [1, c, g, g])]
    dec_in = [torch.randn(1, c, g, g, generator=gen), torch.randn(1, c // 8, 4 * g, 4 * g, generator=gen),
              torch.randn(1, c // 4, 2 * g, 2 * g, generator=gen), torch.rand(1, 3, 2, generator=gen) * s,
              torch.tensor([[1.0, 0.0, -1.0]]), torch.randn(1, 1, 4 * g, 4 * g, generator=gen), torch.tensor([1.0])]
    return {
        "encoder": (Sam2EncoderGraph(model), [torch.randn(1, 3, s, s, generator=gen)], [_t("image", [1, 3, s, s])],
                    feats, False),
        "decoder": (Sam2DecoderGraph(model), dec_in,
                    [feats[2], feats[0], feats[1], _t("point_coords", [1, "num_points", 2]),
                     _t("point_labels", [1, "num_points"]), _t("mask_input", [1, 1, 4 * g, 4 * g]),
                     _t("has_mask_input", [1])],
                    [_t("low_res_masks", [1, 4, 4 * g, 4 * g]), _t("iou_predictions", [1, 4]),
                     _t("sam_output_tokens", [1, 4, c]), _t("object_score_logits", [1, 1])], False),
    }


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))


def sam2_memory_attention_reference(model: torch.nn.Module, inputs: list) -> torch.Tensor:
    """sam2's own ``MemoryAttention`` on the VALID slots and pointers only (what SAM2Base concatenates)."""
    from sam2.modeling.sam2_utils import get_1d_sine_pe

    feat, memory, tpos, valid = inputs[:4]
    g = feat.shape[-1]
    enc = model.memory_encoder.position_encoding(memory[:1]).flatten(2).permute(2, 0, 1)
    mem, mem_pos = [], []
    for i in torch.nonzero(valid > 0.5).flatten().tolist():
        mem.append(memory[i:i + 1].flatten(2).permute(2, 0, 1))
        mem_pos.append(enc + model.maskmem_tpos_enc[model.num_maskmem - int(tpos[i]) - 1])
    num_ptr_tokens = 0
    if len(inputs) > 4:
        ptrs, pos, pvalid = inputs[4:]
        keep = pvalid > 0.5
        if keep.any():
            split = model.hidden_dim // model.mem_dim
            obj = ptrs[keep][:, None].reshape(-1, 1, split, model.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
            tpos_dim = model.hidden_dim if model.proj_tpos_enc_in_obj_ptrs else model.mem_dim
            if model.add_tpos_enc_to_obj_ptrs:
                opos = model.obj_ptr_tpos_proj(get_1d_sine_pe(pos[keep], dim=tpos_dim)).unsqueeze(1)
            else:
                opos = obj.new_zeros(int(keep.sum()), 1, model.mem_dim)
            mem.append(obj)
            mem_pos.append(opos.repeat_interleave(split, dim=0))
            num_ptr_tokens = obj.shape[0]
    curr = feat.flatten(2).permute(2, 0, 1)
    curr_pos = model.image_encoder.neck.position_encoding(feat).flatten(2).permute(2, 0, 1)
    out = model.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=torch.cat(mem), memory_pos=torch.cat(mem_pos),
                                 num_obj_ptr_tokens=num_ptr_tokens)
    return out.permute(1, 2, 0).reshape(1, model.hidden_dim, g, g)


def _write_graph(name: str, spec: tuple, export_dir: Path, opset: int, model: torch.nn.Module) -> dict:
    """Export one graph, check it in ONNX Runtime against torch (and sam2's own memory attention); its entry."""
    from .gates import ort_session

    module, example, in_specs, out_specs, external = spec
    filename = f"{name}.onnx"
    in_names, out_names = [t["name"] for t in in_specs], [t["name"] for t in out_specs]
    dynamic = {t["name"]: {i: d for i, d in enumerate(t["shape"]) if isinstance(d, str)} for t in in_specs}
    dynamic = {k: v for k, v in dynamic.items() if v} or None
    exporter = _export(module.eval(), tuple(example), export_dir / filename, opset, in_names, out_names, dynamic,
                       "torchscript", external)
    with torch.no_grad():
        want = module(*example)
        want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
    sess = ort_session(export_dir / filename)
    got = sess.run(out_names, {n: x.numpy() for n, x in zip(in_names, example)})
    parity = {f"{n}_rel_err": _relative_error(a, b) for n, a, b in zip(out_names, got, want)}
    if name == "memory_attention":
        with torch.no_grad():
            ref = sam2_memory_attention_reference(model, example).numpy()
        parity["vs_sam2_memory_attention_rel_err"] = _relative_error(got[0], ref)
    worst = max(parity.values())
    if not worst <= PARITY_LIMIT:  # also catches NaN
        raise PeftExportError(f"{filename}: exported graph disagrees with torch (rel err {worst:.2e} > "
                              f"{PARITY_LIMIT:g}); nothing written")
    parity["exporter"] = exporter
    g = model.image_size // model.backbone_stride
    return graph_entry(export_dir, name, filename, g * 16, parity, io=(in_specs, out_specs))


def export_video_graphs(model: torch.nn.Module, export_dir: str | Path, max_cond_frames: Optional[int] = None,
                        opset: int = 17, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write the memory graphs + constants into ``export_dir``.

    Returns ``{"graphs": {name: {"fp32": entry}}, "video": settings}``: the entries go into the manifest's
    ``graphs``, the settings become its ``video`` section. ``model``: a SAM2Base (merged adapters, eval).
    ``max_cond_frames``: conditioning slots of the bank (default: the model's ``max_cond_frames_in_attn``
    when set, else 2; at least 2, as SAM 2 requires).
    """
    check_video_model(model)
    if max_cond_frames is None:
        limit = int(model.max_cond_frames_in_attn)
        max_cond_frames = limit if limit > 0 else DEFAULT_MAX_COND_FRAMES
    if max_cond_frames < 2:
        raise PeftExportError(f"max_cond_frames: {max_cond_frames} < 2 (SAM 2 attends to 2+ conditioning frames)")
    export_dir = Path(export_dir)
    model = model.eval()
    settings = video_settings(model, max_cond_frames)
    graphs = {}
    for name, spec in graph_specs(model, settings).items():
        if progress:
            progress(f"export + check {name}.onnx")
        graphs[name] = {"fp32": _write_graph(name, spec, export_dir, opset, model)}
    constants = {"no_mem_embed": model.no_mem_embed.detach().float().reshape(-1).numpy()}
    if getattr(model, "no_obj_ptr", None) is not None:
        constants["no_obj_ptr"] = model.no_obj_ptr.detach().float().reshape(-1).numpy()
    with open(export_dir / CONSTANTS_FILE, "wb") as f:
        np.savez(f, **constants)
    settings["constants"] = file_entry(export_dir, CONSTANTS_FILE)
    return {"graphs": graphs, "video": settings}


def video_graphs_hook(max_cond_frames: Optional[int] = None) -> Callable[..., dict]:
    """The image export's ``extra_graphs`` hook: ``hook(model, tmp_dir, opset, log) -> {"graphs", "video"}``."""

    def hook(model: torch.nn.Module, export_dir: Path, opset: int, log: Optional[Callable[[str], None]] = None) -> dict:
        return export_video_graphs(model, export_dir, max_cond_frames, opset, log)

    return hook


def export_sam2_video(model: torch.nn.Module, out: str | Path, max_cond_frames: Optional[int] = None,
                      opset: int = 17, overwrite: bool = False, model_type: str = "sam2",
                      progress: Optional[Callable[[str], None]] = None) -> Path:
    """A whole SAM 2 export for propagation (image graphs + memory graphs + manifest), written atomically."""
    model = model.eval()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        graphs = {}
        for name, spec in image_graph_specs(model).items():
            if progress:
                progress(f"export + check {name}.onnx")
            graphs[name] = {"fp32": _write_graph(name, spec, tmp, opset, model)}
        video = export_video_graphs(model, tmp, max_cond_frames, opset, progress)
        graphs.update(video["graphs"])
        g = model.image_size // model.backbone_stride
        with torch.no_grad():  # the image export's constants (interface notes)
            pos = model.image_encoder.neck.position_encoding(torch.zeros(1, model.hidden_dim, g, g))
        with open(tmp / "sam2_constants.npz", "wb") as f:
            np.savez(f, no_mem_embed=model.no_mem_embed.detach().float().reshape(1, -1).numpy(),
                     vision_pos_enc=pos.float().numpy())
        manifest = sam2_manifest(model, model_type, graphs, video["video"], opset)
        manifest["constants"] = file_entry(tmp, "sam2_constants.npz")
        write_manifest(tmp, manifest)
    return Path(out)


def sam2_manifest(model: torch.nn.Module, model_type: str, graphs: dict, video: Optional[dict], opset: int) -> dict:
    import datetime as _dt

    from .. import __version__

    s = model.image_size
    g = s // model.backbone_stride
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftexport_version": __version__,
        "family": "sam2",
        "model_type": model_type,
        "image_size": s,
        "embedding_shape": [model.hidden_dim, g, g],
        "low_res_size": 4 * g,
        "preprocessing": dict(video["preprocessing"], intensity=None) if video else {},
        "opset": opset,
        "graphs": graphs,
        "video": video,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


