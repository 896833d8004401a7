"""Data-parallel training: process group from torchrun's environment, manual gradient averaging.

Only the trainable tensors are synchronised: after backward every rank all-reduces
their gradients (sum / world size), so the optimizer steps stay identical on all
ranks without wrapping the model in DistributedDataParallel. Every collective goes
through this module, which puts its tensors on ``DistInfo.device`` (NCCL rejects
CPU tensors; gloo takes them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the group, so we tear it down
    active: bool = False  # a process group is up (torchrun, also with one process): collectives run
    # Where every tensor handed to a collective lives: NCCL takes only tensors on this rank's GPU.
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.active

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def collective_device(backend: str, local_rank: int) -> torch.device:
    """The device of the tensors a backend reduces: this rank's GPU for NCCL, the CPU for gloo."""
    return torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group torchrun describes in the environment; no-op outside torchrun.

    torchrun sets WORLD_SIZE and MASTER_ADDR; with them a group starts even for one process,
    so a one-GPU torchrun runs the same NCCL collectives as many GPUs do.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not ("WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ):
        return DistInfo()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if use_cuda:
        torch.cuda.set_device(local_rank)  # object collectives use the current device under NCCL
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", rank=rank, world_size=world)
        owns = True
    device = collective_device(dist.get_backend(), local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, owns, True, device)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def average_gradients(params: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of ``params`` over all ranks (unused ones count as zero)."""
    if not info.enabled:
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    # One flat buffer: a single collective instead of one per tensor.
    flat = torch.cat([g.reshape(-1).float().to(info.device) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``values`` over all ranks, on ``values``' device (reduced on the collective device)."""
    if not info.enabled:
        return values
    buf = values.detach().to(info.device, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    buf /= info.world_size
    return buf.to(values.device)


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any (a stop request, for instance)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value on every rank (validation results, stop decisions)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=info.device)
    return box[0]


def gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)  # uses the current CUDA device under NCCL (set in init_distributed)
    return out
