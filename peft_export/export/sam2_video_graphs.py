"""SAM 2's video (memory) path as graphs of fixed shapes: memory attention, memory encoder, object pointer.

Each module reads its weights from a ``sam2.modeling.sam2_base.SAM2Base`` (merged, eval) and computes what
``SAM2Base`` computes for one object on one frame, with shapes that never depend on the data, so any
runtime runs them:

- ``MemoryAttentionGraph``: ``_prepare_memory_conditioned_features`` after the memory bank has been chosen.
  The bank is a fixed number of slots: ``memory`` (S, mem_dim, g, g) with ``memory_tpos`` (the slot's
  temporal position t_pos, 0 for conditioning frames) and ``memory_valid``; and P object pointers with
  their normalised temporal distance ``obj_ptr_pos`` and ``obj_ptr_valid``. Invalid slots are keys whose
  attention score is -inf, so softmax gives them weight exactly 0: the result is SAM 2's attention over the
  valid keys only. RoPE is applied in real arithmetic (SAM 2 uses complex tensors, which ONNX lacks).
  The constant positional encodings (the image's lowest level, the memory encoder's) are buffers.
- ``MemoryEncoderGraph``: ``_encode_new_memory`` from the low-res mask logits (upsampled inside, as
  ``_forward_sam_heads`` and ``propagate_in_video_preflight`` do), binarised or sigmoid per ``binarize``.
- ``ObjPtrGraph``: ``obj_ptr_proj`` of the chosen SAM output token, mixed with ``no_obj_ptr`` by
  ``is_obj_appearing`` (0/1, or the sigmoid with ``soft_no_obj_ptr``; the runtime computes it).
- ``MaskDownsampleGraph``: ``mask_downsample`` (the mask prompt as decoder mask input, for its pointer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PeftExportError


def _sine_pe(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """sam2's ``get_1d_sine_pe`` (P,) -> (P, dim), written with ONNX-friendly ops."""
    half = dim // 2
    dim_t = torch.arange(half, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / half)
    pe = positions.unsqueeze(-1) / dim_t
    return torch.cat([pe.sin(), pe.cos()], dim=-1)


def check_video_model(model: nn.Module) -> None:
    """Refuse configurations the graphs do not reproduce (none of the SAM 2 / 2.1 configs uses them)."""
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.sam.transformer import RoPEAttention

    problems = []
    if model.num_maskmem < 1:
        problems.append("num_maskmem is 0 (no memory)")
    mem_attn = model.memory_attention
    if not isinstance(mem_attn, MemoryAttention):
        problems.append(f"memory_attention is a {type(mem_attn).__name__}")
    else:
        for layer in mem_attn.layers:
            if not isinstance(layer, MemoryAttentionLayer) or not isinstance(layer.self_attn, RoPEAttention) \
                    or not isinstance(layer.cross_attn_image, RoPEAttention):
                problems.append("memory attention layers are not RoPE MemoryAttentionLayers")
                break
            if not layer.cross_attn_image.rope_k_repeat:
                problems.append("cross-attention without rope_k_repeat")
                break
    if model.non_overlap_masks_for_mem_enc:
        problems.append("non_overlap_masks_for_mem_enc (objects encoded jointly)")
    if model.use_obj_ptrs_in_encoder and model.hidden_dim % model.mem_dim:
        problems.append(f"hidden_dim {model.hidden_dim} not a multiple of mem_dim {model.mem_dim}")
    if problems:
        raise PeftExportError("SAM 2 video export: unsupported model configuration: " + "; ".join(problems))


class RopeTables(nn.Module):
    """cos / sin of ``RoPEAttention``'s axial frequencies for a g x g map: (g*g, head_dim/2) each."""

    def __init__(self, attention: nn.Module, grid: int) -> None:
        super().__init__()
        cis = attention.compute_cis(end_x=grid, end_y=grid)  # complex (g*g, head_dim/2)
        # persistent buffers: the exporter writes them once as initializers (non-persistent ones are inlined
        # as a constant at every use)
        self.register_buffer("cos", cis.real.float().contiguous())
        self.register_buffer("sin", cis.imag.float().contiguous())

    def rotate(self, x: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """x (B, heads, N, D), N = repeat * g*g: pairs (x0, x1) times (cos + i sin), as apply_rotary_enc.
        Key slot s, token l uses the frequencies of token l (apply_rotary_enc's expand): the slots become
        a dimension the tables broadcast over (a repeated table would be a large constant in the graph)."""
        shape = x.shape
        if repeat > 1:
            x = x.reshape(shape[0], shape[1], repeat, -1, shape[-1])
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack([x0 * self.cos - x1 * self.sin, x0 * self.sin + x1 * self.cos], dim=-1)
        return out.reshape(shape)


QUERY_BLOCK = 512  # queries per attention block (see rope_attention)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def rope_attention(attn: nn.Module, rope: RopeTables, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   num_k_rope: int, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``RoPEAttention.forward`` with an optional key validity mask (N_k,) bool."""
    q = _heads(attn.q_proj(q), attn.num_heads)
    k = _heads(attn.k_proj(k), attn.num_heads)
    v = _heads(attn.v_proj(v), attn.num_heads)
    q = rope.rotate(q)
    repeat = num_k_rope // q.shape[-2]
    if num_k_rope == k.shape[-2]:
        k = rope.rotate(k, repeat)
    else:  # the object pointer tokens at the end have no RoPE
        k = torch.cat([rope.rotate(k[:, :, :num_k_rope], repeat), k[:, :, num_k_rope:]], dim=2)
    # an additive (1,1,1,K) bias of 0 / -inf: a mask the size of the scores would be folded into a
    # constant by the exporter (4 x 538 MB at 1024)
    bias = None if key_valid is None else torch.where(key_valid, torch.tensor(0.0), torch.tensor(float("-inf")))
    kt, scale = k.transpose(-2, -1), 1.0 / math.sqrt(q.shape[-1])
    chunks = []
    # queries in blocks: each row's softmax is its own, so the result is the same, and a block's
    # (QUERY_BLOCK x keys) scores are all that is alive at once (the whole 4096 x 32836 matrix is 538 MB)
    for q_block in q.split(QUERY_BLOCK, dim=2):
        scores = (q_block @ kt) * scale
        if bias is not None:
            scores = scores + bias
        chunks.append(torch.softmax(scores, dim=-1) @ v)
    out = torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0]
    b, h, n, d = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class MemoryAttentionGraph(nn.Module):
    """Features of the current frame conditioned on a fixed-capacity memory bank (one object).

    inputs  ``image_embeddings`` (1,C,g,g) (raw, no ``no_mem_embed``), ``memory`` (S,mem,g,g),
            ``memory_tpos`` (S,) int64, ``memory_valid`` (S,) float 0/1,
            [``obj_ptrs`` (P,C), ``obj_ptr_pos`` (P,) float, ``obj_ptr_valid`` (P,) float 0/1]
    output  ``pix_feat_with_mem`` (1,C,g,g)
    """

    def __init__(self, model: nn.Module, grid: int, memory_slots: int, pointer_slots: int) -> None:
        super().__init__()
        check_video_model(model)
        self.layers = model.memory_attention.layers
        self.norm = model.memory_attention.norm
        self.pos_enc_at_input = model.memory_attention.pos_enc_at_input
        self.hidden_dim, self.mem_dim, self.grid = model.hidden_dim, model.mem_dim, grid
        self.memory_slots, self.num_maskmem = memory_slots, model.num_maskmem
        self.pointer_slots = pointer_slots if model.use_obj_ptrs_in_encoder else 0
        self.add_tpos_enc_to_obj_ptrs = model.add_tpos_enc_to_obj_ptrs
        self.tpos_dim = model.hidden_dim if model.proj_tpos_enc_in_obj_ptrs else model.mem_dim
        self.obj_ptr_tpos_proj = model.obj_ptr_tpos_proj
        self.maskmem_tpos_enc = model.maskmem_tpos_enc  # (num_maskmem, 1, 1, mem)
        with torch.no_grad():
            curr_pos = model.image_encoder.neck.position_encoding(torch.zeros(1, model.hidden_dim, grid, grid))
            mem_pos = model.memory_encoder.position_encoding(torch.zeros(1, model.mem_dim, grid, grid))
        # (HW, C) and (HW, mem): sam2's (HW)BC layout with B = 1 dropped
        self.register_buffer("curr_pos", curr_pos.flatten(2)[0].t().contiguous().float())
        self.register_buffer("memory_pos", mem_pos.flatten(2)[0].t().contiguous().float())
        # one table per distinct (head dim, theta): the graph holds each once
        tables: dict = {}

        def rope(attn: nn.Module) -> RopeTables:
            key = tuple(sorted(attn.compute_cis.keywords.items()))
            if key not in tables:
                tables[key] = RopeTables(attn, grid)
            return tables[key]

        self.self_rope = [rope(layer.self_attn) for layer in self.layers]
        self.cross_rope = [rope(layer.cross_attn_image) for layer in self.layers]
        self.rope_tables = nn.ModuleList(tables.values())  # registered once, for .to() / export

    def forward(self, image_embeddings: torch.Tensor, memory: torch.Tensor, memory_tpos: torch.Tensor,
                memory_valid: torch.Tensor, obj_ptrs: torch.Tensor | None = None,
                obj_ptr_pos: torch.Tensor | None = None, obj_ptr_valid: torch.Tensor | None = None) -> torch.Tensor:
        c, hw = self.hidden_dim, self.grid * self.grid
        curr = image_embeddings.flatten(2).transpose(1, 2)  # (1, HW, C), batch first
        curr_pos = self.curr_pos.unsqueeze(0)
        # spatial memories: slot-major tokens (S*HW, mem) and their encodings (spatial + temporal)
        mem = memory.flatten(2).transpose(1, 2).reshape(1, -1, self.mem_dim)
        tpos = self.maskmem_tpos_enc.reshape(self.num_maskmem, self.mem_dim)[self.num_maskmem - 1 - memory_tpos]
        mem_pos = (self.memory_pos.unsqueeze(0) + tpos.unsqueeze(1)).reshape(1, -1, self.mem_dim)
        key_valid = (memory_valid > 0.5).reshape(-1, 1).expand(-1, hw).reshape(-1)
        num_k_rope = self.memory_slots * hw
        if self.pointer_slots:
            split = c // self.mem_dim  # a pointer is split into C/mem tokens
            ptr_tokens = obj_ptrs.reshape(-1, split, self.mem_dim).reshape(1, -1, self.mem_dim)
            if self.add_tpos_enc_to_obj_ptrs:
                ptr_pos = self.obj_ptr_tpos_proj(_sine_pe(obj_ptr_pos, self.tpos_dim))
            else:
                ptr_pos = torch.zeros_like(obj_ptrs[:, : self.mem_dim])
            ptr_pos = ptr_pos.repeat_interleave(split, dim=0).unsqueeze(0)
            mem = torch.cat([mem, ptr_tokens], dim=1)
            mem_pos = torch.cat([mem_pos, ptr_pos], dim=1)
            key_valid = torch.cat([key_valid, (obj_ptr_valid > 0.5).reshape(-1, 1).expand(-1, split).reshape(-1)])
        key_valid = key_valid.reshape(1, 1, 1, -1)

        out = curr + 0.1 * curr_pos if self.pos_enc_at_input else curr
        for layer, self_rope, cross_rope in zip(self.layers, self.self_rope, self.cross_rope):
            # MemoryAttentionLayer.forward: self-attention, cross-attention, MLP (dropout off in eval)
            tgt2 = layer.norm1(out)
            q = tgt2 + curr_pos if layer.pos_enc_at_attn else tgt2
            out = out + rope_attention(layer.self_attn, self_rope, q, q, tgt2, hw)
            tgt2 = layer.norm2(out)
            q = tgt2 + curr_pos if layer.pos_enc_at_cross_attn_queries else tgt2
            k = mem + mem_pos if layer.pos_enc_at_cross_attn_keys else mem
            out = out + rope_attention(layer.cross_attn_image, cross_rope, q, k, mem, num_k_rope, key_valid)
            tgt2 = layer.norm3(out)
            out = out + layer.linear2(layer.activation(layer.linear1(tgt2)))
        out = self.norm(out)
        return out.transpose(1, 2).reshape(1, c, self.grid, self.grid)


class MemoryEncoderGraph(nn.Module):
    """``_encode_new_memory`` for one object.

    inputs  ``image_embeddings`` (1,C,g,g) raw, ``mask_logits`` (1,1,4g,4g) low-res, ``object_score_logits`` (1,1),
            ``binarize`` (1,) float (1: masks from clicks with binarize_mask_from_pts_for_mem_enc)
    output  ``maskmem_features`` (1,mem,g,g)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        check_video_model(model)
        self.memory_encoder = model.memory_encoder
        self.image_size = model.image_size
        self.scale, self.bias = model.sigmoid_scale_for_mem_enc, model.sigmoid_bias_for_mem_enc
        self.no_obj_embed_spatial = model.no_obj_embed_spatial

    def forward(self, image_embeddings: torch.Tensor, mask_logits: torch.Tensor, object_score_logits: torch.Tensor,
                binarize: torch.Tensor) -> torch.Tensor:
        high_res = F.interpolate(mask_logits, size=(self.image_size, self.image_size), mode="bilinear",
                                 align_corners=False)
        mask = torch.where(binarize.reshape(1, 1, 1, 1) > 0.5, (high_res > 0).float(), torch.sigmoid(high_res))
        if self.scale != 1.0:
            mask = mask * self.scale
        if self.bias != 0.0:
            mask = mask + self.bias
        features = self.memory_encoder(image_embeddings, mask, skip_mask_sigmoid=True)["vision_features"]
        if self.no_obj_embed_spatial is not None:
            appearing = (object_score_logits > 0).float()
            features = features + (1 - appearing[..., None, None]) * self.no_obj_embed_spatial[..., None, None]
        return features


class ObjPtrGraph(nn.Module):
    """``sam_output_token`` (B,C), ``is_obj_appearing`` (B,1) -> ``obj_ptr`` (B,C): ``_forward_sam_heads``' end."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.obj_ptr_proj = model.obj_ptr_proj
        self.pred_obj_scores, self.fixed_no_obj_ptr = model.pred_obj_scores, model.fixed_no_obj_ptr
        self.no_obj_ptr = getattr(model, "no_obj_ptr", None) if model.pred_obj_scores else None

    def forward(self, sam_output_token: torch.Tensor, is_obj_appearing: torch.Tensor) -> torch.Tensor:
        obj_ptr = self.obj_ptr_proj(sam_output_token)
        if self.pred_obj_scores:
            if self.fixed_no_obj_ptr:
                obj_ptr = is_obj_appearing * obj_ptr
            obj_ptr = obj_ptr + (1 - is_obj_appearing) * self.no_obj_ptr
        return obj_ptr


class MaskDownsampleGraph(nn.Module):
    """input ``mask`` (1,1,S,S) 0/1 -> ``mask_input`` (1,1,4g,4g): a mask prompt as the decoder's mask input."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.mask_downsample = model.mask_downsample

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.mask_downsample(mask)
