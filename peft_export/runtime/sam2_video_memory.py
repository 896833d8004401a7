"""SAM 2's memory bank in numpy: which past frames a frame attends to, packed into the fixed slots of the
exported memory attention graph.

``choose_memories`` follows ``SAM2Base._prepare_memory_conditioned_features`` line by line (the
conditioning frames chosen by ``select_closest_cond_frames``, the ``num_maskmem - 1`` recent frames with
the temporal stride, the object pointers with their temporal distances), and ``pack_bank`` writes the
choice into the graph's inputs, marking unused slots invalid (the graph gives them attention weight 0).
Memory features are kept as bfloat16 bit patterns, as ``SAM2VideoPredictor`` stores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import PeftExportError


@dataclass
class FrameMemory:
    """What a frame leaves for later frames of one object (``SAM2VideoPredictor``'s compact output)."""

    maskmem: np.ndarray  # (mem, g, g) uint16: bfloat16 bits
    obj_ptr: np.ndarray  # (C,) float32
    object_score: float
    pred_masks: Optional[np.ndarray] = None  # (4g, 4g) low-res logits, kept for prompted frames


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even as torch's ``.to(torch.bfloat16)``."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def select_closest_cond_frames(frame_idx: int, cond: Dict[int, FrameMemory], max_cond: int
                               ) -> Tuple[Dict[int, FrameMemory], Dict[int, FrameMemory]]:
    """sam2's ``select_closest_cond_frames``: (selected, unselected) conditioning frames."""
    if max_cond == -1 or len(cond) <= max_cond:
        return dict(cond), {}
    selected: Dict[int, FrameMemory] = {}
    before = max((t for t in cond if t < frame_idx), default=None)
    if before is not None:
        selected[before] = cond[before]
    after = min((t for t in cond if t >= frame_idx), default=None)
    if after is not None:
        selected[after] = cond[after]
    remain = sorted((t for t in cond if t not in selected), key=lambda t: abs(t - frame_idx))
    for t in remain[: max_cond - len(selected)]:
        selected[t] = cond[t]
    return selected, {t: v for t, v in cond.items() if t not in selected}


@dataclass
class BankChoice:
    memories: List[Tuple[int, FrameMemory]]  # (t_pos, memory): t_pos 0 for conditioning frames
    pointers: List[Tuple[int, np.ndarray]]  # (temporal distance, obj_ptr)
    pointer_scale: int  # t_diff_max: distances are divided by it


def choose_memories(frame_idx: int, cond: Dict[int, FrameMemory], non_cond: Dict[int, FrameMemory],
                    num_frames: int, reverse: bool, settings: dict) -> BankChoice:
    """The memories and object pointers SAM 2 concatenates for ``frame_idx`` (not a prompted frame)."""
    if not cond:
        raise PeftExportError("propagate: an object has no prompted frame")
    limit = int(settings["max_cond_frames_in_attn"])
    limit = settings["max_cond_frames"] if limit <= 0 else min(limit, settings["max_cond_frames"])
    selected, unselected = select_closest_cond_frames(frame_idx, cond, limit)
    memories: List[Tuple[int, FrameMemory]] = [(0, m) for m in selected.values()]
    num_maskmem, stride = int(settings["num_maskmem"]), int(settings["memory_temporal_stride_for_eval"])
    for t_pos in range(1, num_maskmem):
        t_rel = num_maskmem - t_pos  # frames before (after, in reverse) the current one
        if t_rel == 1:
            prev = frame_idx + 1 if reverse else frame_idx - 1
        elif not reverse:
            prev = ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
        else:
            prev = -(-(frame_idx + 2) // stride) * stride + (t_rel - 2) * stride
        out = non_cond.get(prev, unselected.get(prev))
        if out is not None:
            memories.append((t_pos, out))

    pointers: List[Tuple[int, np.ndarray]] = []
    max_ptrs = min(num_frames, int(settings["max_obj_ptrs_in_encoder"]))
    if settings["use_obj_ptrs_in_encoder"]:
        ptr_cond = selected
        if settings["only_obj_ptrs_in_the_past_for_eval"]:
            ptr_cond = {t: m for t, m in selected.items() if (t >= frame_idx if reverse else t <= frame_idx)}
        sign = -1 if reverse else 1
        for t, m in ptr_cond.items():
            dist = (frame_idx - t) * sign if settings["use_signed_tpos_enc_to_obj_ptrs"] else abs(frame_idx - t)
            pointers.append((dist, m.obj_ptr))
        for t_diff in range(1, max_ptrs):
            t = frame_idx + t_diff if reverse else frame_idx - t_diff
            if t < 0 or t >= num_frames:
                break
            out = non_cond.get(t, unselected.get(t))
            if out is not None:
                pointers.append((t_diff, out.obj_ptr))
    return BankChoice(memories, pointers, max_ptrs - 1)


def pack_bank(choice: BankChoice, settings: dict, grid: int) -> Dict[str, np.ndarray]:
    """The memory attention graph's bank inputs: used slots first, the rest zero and invalid."""
    slots, ptr_slots = int(settings["memory_slots"]), int(settings["pointer_slots"])
    mem_dim, hidden = int(settings["mem_dim"]), int(settings["hidden_dim"])
    if len(choice.memories) > slots or len(choice.pointers) > ptr_slots:
        raise PeftExportError(f"propagate: {len(choice.memories)} memories / {len(choice.pointers)} pointers "
                              f"exceed the export's bank ({slots} / {ptr_slots})")
    memory = np.zeros((slots, mem_dim, grid, grid), np.float32)
    tpos = np.zeros(slots, np.int64)
    valid = np.zeros(slots, np.float32)
    for i, (t_pos, m) in enumerate(choice.memories):
        memory[i] = from_bfloat16_bits(m.maskmem)
        tpos[i], valid[i] = t_pos, 1.0
    feeds = {"memory": memory, "memory_tpos": tpos, "memory_valid": valid}
    if ptr_slots:
        ptrs = np.zeros((ptr_slots, hidden), np.float32)
        pos = np.zeros(ptr_slots, np.float32)
        pvalid = np.zeros(ptr_slots, np.float32)
        # torch: tensor(int distances) / t_diff_max, in float32
        scale = np.float32(max(choice.pointer_scale, 1))
        for i, (dist, ptr) in enumerate(choice.pointers):
            ptrs[i], pos[i], pvalid[i] = ptr, np.float32(dist) / scale, 1.0
        feeds.update({"obj_ptrs": ptrs, "obj_ptr_pos": pos, "obj_ptr_valid": pvalid})
    return feeds


def needed_window(settings: dict) -> int:
    """How far (in frames) a frame's memory can still be read by a later frame of the same pass."""
    stride = int(settings["memory_temporal_stride_for_eval"])
    recent = int(settings["num_maskmem"]) * stride + 1
    return max(recent, int(settings["max_obj_ptrs_in_encoder"]))


def forget_unreachable(memories: Dict[int, FrameMemory], frame_idx: int, reverse: bool, start: int,
                       window: int) -> None:
    """Drop the memories no later frame reads (``window``: ``needed_window``): those behind the current
    frame by more than ``window`` and, in the forward pass, not within ``window`` after ``start`` (the
    backward pass from ``start`` reads those)."""
    for t in list(memories):
        if reverse and t > frame_idx + window:
            del memories[t]
        elif not reverse and t < frame_idx - window and not (start <= t <= start + window):
            del memories[t]
