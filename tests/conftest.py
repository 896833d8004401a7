"""Shared fixtures."""

from __future__ import annotations

import os

# torch's threads (libgomp's OpenMP) wait passively at the barrier that ends each parallel op, in this
# process (set before the first torch import, below: libgomp reads it when it loads) and in every process a
# test starts. By default a thread that arrives first spins; when another process holds one of this
# machine's 2 cores, torch's two threads then wait on each other at every op. Measured 2026-12-07 under load
# 3-5: tests/test_vit_t_peft.py 118 and 256 s spinning, 47 s passive; 30 training steps of the demo's tiny
# model (2 threads) 51 and 96 s spinning, 10 s passive, with a bit-identical adapter (the same threads split
# the same work: no number changes). On a quiet machine it costs a little (test_vit_t_peft 28.7 s passive vs
# 27.0 s default, 2026-12-07 18:00 UTC, load 1.2-1.6). A policy set in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import signal  # noqa: E402

# A suite started in the background by a non-interactive shell (`pytest ... &`, nohup) inherits SIGINT
# ignored, and so does every process it starts (an ignored signal stays ignored across exec): the Ctrl-C
# tests' runs then finish instead of stopping (seen 2026-12-07: three failures, and the demo's stopped run
# cost 78 s instead of 5). A handled SIGINT here is reset to the default in each child, which then stops.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402

from helpers import MERGEABLE_CONFIGS, make_adapted  # noqa: E402
from peft_export.peft.adapters import AdaptedModel


@pytest.fixture(scope="module")
def elsewhere_cluster(tmp_path_factory):
    """One LocalCluster (one worker process) kept for the module, its worker started in another
    working directory than the tests' client runs in (as a worker on another host would be)."""
    from peft_export.distributed.cluster import close_local_cluster, local_cluster

    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("worker_cwd"))
    try:
        cluster = local_cluster(1)  # keeps this process's environment (no OMP_NUM_THREADS=1 for later tests)
    finally:
        os.chdir(before)
    yield cluster
    close_local_cluster(cluster)


@pytest.fixture
def tiny_lora() -> AdaptedModel:
    return make_adapted(MERGEABLE_CONFIGS["lora"])


@pytest.fixture(scope="session")
def tiny_lora_128_export(tmp_path_factory):
    """(folder, manifest) of ``merge_and_export(make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128),
    precisions=["fp32", "int8"])``: the tiny LoRA model's default export (int8 recipe search and gate,
    OpenVINO verification where installed), made once per session for test_int8, test_openvino and
    test_bench, which each made this same export themselves. They only read the folder and the manifest;
    a test that changes an export copies it first."""
    from peft_export.export import merge_and_export

    out = tmp_path_factory.mktemp("tiny_lora_128") / "export"
    manifest = merge_and_export(make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128), out,
                                precisions=["fp32", "int8"], progress=False)
    return out, manifest


# A test that skips because something it needs "is not installed" (torch-em, napari, chromium, npm
# packages...) hides a gap in the install: under CI (`.ci/run` exports CI) that skip is a failure.
# Skips for what these machines cannot have (CUDA, TensorRT) say so in other words and stay skips.
MISSING_DEPENDENCY = "is not installed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and os.environ.get("CI") and not hasattr(report, "wasxfail")):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if MISSING_DEPENDENCY in reason:
        report.outcome = "failed"
        report.longrepr = f"CI installs every test dependency, but: {reason}"
