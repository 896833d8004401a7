"""Data-parallel training: two CPU processes (gloo) train the tiny model (identical weights on both ranks,
files only from rank 0), and every collective runs through the helpers on the group's device (NCCL takes
only tensors on the rank's GPU)."""

from __future__ import annotations

import json
import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import peft_export.training.distributed

from peft_export.data import make_demo_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str, result_dir: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from peft_export.peft import trainable_state
    from peft_export.training import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(out=out, data=data, model_type="tiny", image_size=96, patch_size=96, lr=1e-3,
                                  objects_per_image=2, sub_iterations=1, val_objects=2, val_fraction=0.25,
                                  iterations=2, val_every=2, validate_at_start=False, peft="lora", blocks="late",
                                  rank=2, progress=False, device="cpu", min_object_size=10))
    summary = trainer.run()
    torch.save(trainable_state(trainer.adapted.model), os.path.join(result_dir, f"rank{rank}.pt"))
    with open(os.path.join(result_dir, f"summary{rank}.json"), "w") as f:
        json.dump(summary, f)


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path):
    data = tmp_path / "data"
    make_demo_data(data, n_images=4, size=96, seed=5)
    out, res = tmp_path / "run", tmp_path / "res"
    res.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(out), str(res)), nprocs=2, join=True)
    a = torch.load(res / "rank0.pt", weights_only=True)
    b = torch.load(res / "rank1.pt", weights_only=True)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    s0 = json.loads((res / "summary0.json").read_text())
    assert s0["world_size"] == 2 and s0["effective_batch_size"] == 2 and s0["steps"] == 2
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert files == ["adapter.json", "adapter.safetensors", "last", "last/checkpoint.pt", "train_config.json",
                     "train_log.jsonl", "training.png"]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["type"] == "step"] == [1, 2]  # one writer
    assert len(load_rngs := torch.load(out / "last" / "checkpoint.pt", weights_only=True)["rng"]) == 2
    assert not torch.equal(load_rngs[0]["torch"], load_rngs[1]["torch"])  # per-rank seeds


# ---- every collective on the process's device (NCCL rejects CPU tensors) -----------------------

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "barrier", "broadcast_object_list", "all_gather_object",
               "reduce", "gather", "scatter", "all_gather_into_tensor", "reduce_scatter_tensor")


class _Stop(Exception):
    pass


def _tensors(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


def test_collective_helpers_put_tensors_on_the_collective_device(monkeypatch):
    # A fake collective device ("meta") on a CPU machine: the helpers must move every tensor there
    # before torch.distributed sees it, as NCCL needs the rank's GPU. The fake collective records the
    # device and stops the call.
    from peft_export.training.distributed import DistInfo, all_reduce_mean, any_rank, average_gradients

    seen = []

    def fake_all_reduce(tensor, op=None, group=None, async_op=False):
        seen.append(tensor.device)
        raise _Stop

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    info = DistInfo(rank=0, world_size=2, active=True, device=torch.device("meta"))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    for call in (lambda: all_reduce_mean(torch.zeros(3, dtype=torch.float64), info), lambda: any_rank(True, info),
                 lambda: average_gradients([p], info)):
        with pytest.raises(_Stop):
            call()
    assert seen == [torch.device("meta")] * 3


def test_collective_device_is_the_rank_gpu_under_nccl():
    from peft_export.training.distributed import collective_device

    assert collective_device("nccl", 3) == torch.device("cuda", 3)
    assert collective_device("gloo", 3) == torch.device("cpu")


def _record_collectives(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    depth = [0]
    for name in COLLECTIVES:
        original = getattr(torch.distributed, name)

        def wrapper(*args, __original=original, __name=name, **kwargs):
            if depth[0] == 0:  # the call our code made, not torch's own nested ones
                caller = sys._getframe(1).f_code.co_filename
                calls.append({"name": __name, "caller": caller, "devices": [t.device for t in _tensors(args)],
                              "device_kw": kwargs.get("device")})
            depth[0] += 1
            try:
                return __original(*args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(torch.distributed, name, wrapper)
    return calls


def _one_process_env(monkeypatch) -> None:
    # What torchrun --nproc_per_node=1 sets.
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))


def _run_one_process(tmp_path, monkeypatch, device: str):
    from peft_export.training import TrainConfig, Trainer

    data = tmp_path / "data"
    make_demo_data(data, n_images=3, size=64, seed=5)
    _one_process_env(monkeypatch)
    calls = _record_collectives(monkeypatch)
    trainer = Trainer(TrainConfig(out=str(tmp_path / "run"), data=str(data), model_type="tiny", image_size=64,
                                  patch_size=64, objects_per_image=2, sub_iterations=1, val_objects=2,
                                  val_fraction=0.34, iterations=2, val_every=2, validate_at_start=False, peft="lora",
                                  blocks="late", rank=2, progress=False, device=device, min_object_size=10))
    summary = trainer.run()
    return trainer, summary, calls


def test_torchrun_one_process_runs_all_collectives_through_the_helpers_on_the_group_device(tmp_path, monkeypatch):
    trainer, summary, calls = _run_one_process(tmp_path, monkeypatch, "cpu")
    assert summary["status"] == "completed" and summary["world_size"] == 1
    assert not torch.distributed.is_initialized()  # the trainer tore down the group it made
    names = {c["name"] for c in calls}
    assert {"all_reduce", "barrier", "broadcast_object_list", "all_gather_object"} <= names, names
    helpers = str(Path(peft_export.training.distributed.__file__))
    assert all(c["caller"] == helpers for c in calls), {c["caller"] for c in calls}
    assert trainer.dist.device == torch.device("cpu")
    for c in calls:
        assert all(d == trainer.dist.device for d in c["devices"]), c
        if c["name"] == "broadcast_object_list":
            assert c["device_kw"] == trainer.dist.device


@pytest.mark.gpu
def test_torchrun_one_gpu_trains_with_nccl(tmp_path, monkeypatch):
    if not torch.cuda.is_available() or not torch.distributed.is_nccl_available():
        pytest.skip("needs a CUDA GPU and NCCL")
    trainer, summary, calls = _run_one_process(tmp_path, monkeypatch, "cuda")
    assert summary["status"] == "completed"
    assert trainer.dist.device == torch.device("cuda", 0)
    tensor_devices = {d for c in calls for d in c["devices"]}
    assert tensor_devices == {torch.device("cuda", 0)}, tensor_devices


def _nccl_worker(rank: int, world: int, port: int, data: str, out: str, result_dir: str) -> None:
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    from peft_export.peft import trainable_state
    from peft_export.training import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(out=out, data=data, model_type="tiny", image_size=96, patch_size=96, lr=1e-3,
                                  objects_per_image=2, sub_iterations=1, val_objects=2, val_fraction=0.25,
                                  iterations=2, val_every=2, validate_at_start=False, peft="lora", blocks="late",
                                  rank=2, progress=False, device="cuda", precision="bf16", min_object_size=10))
    trainer.run()
    torch.save(trainable_state(trainer.adapted.model), os.path.join(result_dir, f"rank{rank}.pt"))


@pytest.mark.gpu
def test_two_gpu_nccl_training(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs (NCCL refuses two ranks on one GPU); {torch.cuda.device_count()} visible")
    data = tmp_path / "data"
    make_demo_data(data, n_images=4, size=96, seed=5)
    res = tmp_path / "res"
    res.mkdir()
    mp.spawn(_nccl_worker, args=(2, _free_port(), str(data), str(tmp_path / "run"), str(res)), nprocs=2, join=True)
    a = torch.load(res / "rank0.pt", weights_only=True)
    b = torch.load(res / "rank1.pt", weights_only=True)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
