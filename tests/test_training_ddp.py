"""Two CPU processes (gloo) train the tiny model: identical weights on both ranks, files only from rank 0."""

from __future__ import annotations

import json
import os
import socket
import warnings

import pytest
import torch
import torch.multiprocessing as mp

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
