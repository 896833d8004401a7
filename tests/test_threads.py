"""torch's CPU threads for the demo and finetune: the cores other processes leave free, unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="measures /proc/stat (Linux)")

_BURN = "import time\nend = time.time() + 15\nwhile time.time() < end: pass\n"


def _env(extra: dict | None = None) -> dict:
    """This environment without a thread setting of its own (CI may set one), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, **(extra or {})}


def _choose(env: dict | None = None, code: str = "") -> str:
    """choose_threads() in a fresh process (torch's start-up thread count is the default it compares with)."""
    script = ("import torch\n" + code + "\nfrom peft_export.training.threads import choose_threads\n"
              "print(choose_threads().line())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(env), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_busy_cores_leave_one_thread():
    # Real processes that keep every usable core busy (started after torch's import, which they would
    # slow down, and stopped right after the choice): torch must not start one thread per core.
    cpus = sorted(os.sched_getaffinity(0))
    script = ("import subprocess, sys, time\nimport torch\nfrom peft_export.training.threads import choose_threads\n"
              f"burners = [subprocess.Popen([sys.executable, '-c', {_BURN!r}]) for _ in range({len(cpus)})]\n"
              "time.sleep(1.0)\ntry:\n    print(choose_threads().line())\nfinally:\n"
              "    for p in burners:\n        p.kill()\n        p.wait()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith("torch threads: 1 (") and "oversubscribed" in line, line
    assert f"{len(cpus)} CPUs, others used" in line


def test_the_users_choice_is_kept():
    assert _choose({"OMP_NUM_THREADS": "1"}) == "torch threads: 1 (OMP_NUM_THREADS=1)"
    assert _choose(code="torch.set_num_threads(5)") == "torch threads: 5 (set by torch.set_num_threads)"
    from peft_export.training.threads import choose_threads

    assert choose_threads(7).line() == "torch threads: 7 (--threads)"


def test_finetune_says_and_applies_its_choice(tmp_path):
    # finetune --threads 1 on the CPU: the line is printed once and torch computes with one thread
    from peft_export.data import make_demo_data

    make_demo_data(tmp_path / "data", n_images=2, size=64, seed=0)
    script = ("import sys, torch\nfrom peft_export.training import TrainConfig, finetune\n"
              f"finetune(TrainConfig(out={str(tmp_path / 'run')!r}, data={str(tmp_path / 'data')!r}, model_type='tiny', "
              "image_size=64, patch_size=64, iterations=1, val_every=1, val_objects=1, objects_per_image=1, "
              "sub_iterations=0, device='cpu', progress=False, threads=int(sys.argv[1])))\n"
              "print('after:', torch.get_num_threads())\n")
    proc = subprocess.run([sys.executable, "-c", script, "1"], capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("torch threads: 1 (--threads)") == 1 and "after: 1" in proc.stdout, proc.stdout
