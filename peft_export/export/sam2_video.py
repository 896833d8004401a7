"""Export SAM 2's video path: the memory graphs, their settings and constants, verified against sam2.

``export_video_graphs(model, export_dir)`` adds to a SAM 2 export (``sam2_image.export_sam2`` calls it through
``video_graphs_hook()`` inside its temporary directory; ``merge-and-export --video``):

- ``memory_attention.onnx``, ``memory_encoder.onnx``, ``obj_ptr.onnx``, ``mask_downsample.onnx``
  (``sam2_video_graphs``), each checked on every CPU backend (ONNX Runtime, OpenVINO when installed)
  against its torch module, and the memory attention also against sam2's own ``MemoryAttention`` on a
  bank with padded slots (the padding must change nothing);
- ``sam2_video_constants.npz`` (``no_obj_ptr``; ``no_mem_embed`` is in the image export's constants);
- the manifest section ``video``: every ``SAM2Base`` / ``SAM2VideoPredictor`` setting the torch-free
  tracker (``runtime.sam2_video``) follows, and how ``SAM2VideoPredictor`` loads frames.

The memory bank has a fixed capacity: ``max_cond_frames`` conditioning slots plus ``num_maskmem - 1``
recent-frame slots, and ``max_cond_frames + max_obj_ptrs_in_encoder - 1`` object pointers. With more
prompted frames than ``max_cond_frames`` the tracker chooses them as SAM 2 does with
``max_cond_frames_in_attn = max_cond_frames`` (the temporally closest, one before and one after first).
Layout and names: /work/notes/sam2_interface.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch

from ..errors import PeftExportError
from .gates import graph_runner, verify_backends
from .manifest import file_entry, graph_entry
from .onnx_graphs import _export
from .sam2_video_graphs import (
    MaskDownsampleGraph,
    MemoryAttentionGraph,
    MemoryEncoderGraph,
    ObjPtrGraph,
    check_video_model,
)

CONSTANTS_FILE = "sam2_video_constants.npz"  # the image export's own constants are sam2_constants.npz
DEFAULT_MAX_COND_FRAMES = 2
# ONNX Runtime vs torch on the same module, max |difference| / max |reference|
PARITY_LIMIT = 1e-4
# SAM2VideoPredictor's inference settings (build_sam2_video_predictor's overrides), for a model built
# with build_sam2 (the image builder), which lacks them.
PREDICTOR_DEFAULTS = {
    "binarize_mask_from_pts_for_mem_enc": True,
    "fill_hole_area": 8,
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
    settings.update({
        "binarize_mask_from_pts_for_mem_enc": bool(getattr(model, "binarize_mask_from_pts_for_mem_enc", False))
        or PREDICTOR_DEFAULTS["binarize_mask_from_pts_for_mem_enc"],
        "fill_hole_area": int(getattr(model, "fill_hole_area", PREDICTOR_DEFAULTS["fill_hole_area"])),
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
        [_t("image_embeddings", [1, c, g, g]), _t("mask_logits", [1, 1, 4 * g, 4 * g]),
         _t("object_score_logits", [1, 1]),
         _t("binarize", [1])], [_t("maskmem_features", [1, m, g, g])], False)
    specs["obj_ptr"] = (ObjPtrGraph(model), [rand(1, c), torch.tensor([[1.0]])],
                        [_t("sam_output_token", [1, c]), _t("is_obj_appearing", [1, 1])],
                        [_t("obj_ptr", [1, c])], False)
    if model.use_obj_ptrs_in_encoder:
        specs["mask_downsample"] = (MaskDownsampleGraph(model), [(rand(1, 1, s, s) > 0).float()],
                                    [_t("mask", [1, 1, s, s])], [_t("mask_input", [1, 1, 4 * g, 4 * g])],
                                    False)
    return specs


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
    """Export one graph, check it on every CPU backend against torch (and sam2's own memory attention)."""
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
    feeds = {n: x.numpy() for n, x in zip(in_names, example)}
    parity: Dict[str, float] = {}
    for backend in verify_backends():
        got = graph_runner(export_dir / filename, backend)(feeds)
        got = [got[n] for n in out_names]
        suffix = "" if backend == "onnxruntime" else f"_{backend}"
        parity.update({f"{n}_rel_err{suffix}": _relative_error(a, b) for n, a, b in zip(out_names, got, want)})
        if name == "memory_attention":
            with torch.no_grad():
                ref = sam2_memory_attention_reference(model, example).numpy()
            parity[f"vs_sam2_memory_attention_rel_err{suffix}"] = _relative_error(got[0], ref)
    worst = max(parity.values())
    if not worst <= PARITY_LIMIT:  # also catches NaN
        raise PeftExportError(f"{filename}: exported graph disagrees with torch (rel err {worst:.2e} > "
                              f"{PARITY_LIMIT:g}); nothing written")
    parity.update(passed=True, failures=[], exporter=exporter)
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
    constants = {}
    no_obj_ptr = getattr(model, "no_obj_ptr", None)
    if no_obj_ptr is not None:
        constants["no_obj_ptr"] = no_obj_ptr.detach().float().reshape(-1).numpy()
    with open(export_dir / CONSTANTS_FILE, "wb") as f:
        np.savez(f, **constants)
    settings["constants"] = file_entry(export_dir, CONSTANTS_FILE)
    return {"graphs": graphs, "video": settings}


def video_graphs_hook(max_cond_frames: Optional[int] = None) -> Callable[..., dict]:
    """The image export's ``extra_graphs`` hook: ``hook(model, tmp_dir, opset, log) -> {"graphs", "video"}``."""

    def hook(model: torch.nn.Module, export_dir: Path, opset: int, log: Optional[Callable[[str], None]] = None) -> dict:
        return export_video_graphs(model, export_dir, max_cond_frames, opset, log)

    return hook
