"""Each case in its own process: the parent only starts workers and collects their JSON.

Two spin-waiting thread pools in one process (torch's and ONNX Runtime's, or two ONNX
Runtime sessions) distort each other on a small machine, and a process that has loaded
torch carries its memory into the next case. So by default every case runs in a fresh
``python -m peft_export.bench.fresh JOB.json OUT.json``: it loads only what its case needs
(an ONNX Runtime / OpenVINO worker never imports torch), measures with ``measure.measure``,
and writes its one result. The parent records the machine's load around each worker
(``load.load_between``) and the worker's whole-process peak RSS (model load included).

A torch case gets its model as a weights-only state dict written by the parent
(``save_model``), so in-memory models (random adapters, API users) run unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .cases import CaseSpec, _spec_fields
from .load import describe_load, load_between, snapshot


@dataclass
class FreshCase:
    """One case for a worker: what it runs and where its model is."""

    spec: CaseSpec
    export_dir: str | None = None
    model_file: str | None = None  # torch state dict (save_model), for unmerged / merged cases
    model: dict = field(default_factory=dict)  # {"peft": config dict | None, "base": base dict}


def save_model(adapted, path: str | Path) -> dict:
    """Write an adapted model's full state dict for workers; returns the description they rebuild it from."""
    import torch

    torch.save(adapted.model.state_dict(), str(path))
    desc = {"peft": adapted.config.to_dict() if adapted.config is not None else None,
            "base": adapted.base.to_dict(), "intensity": dict(adapted.intensity)}
    decoder = getattr(adapted, "instance_decoder", None)
    if decoder is not None:  # micro-sam's AIS decoder, for the "ais" component
        desc["instance_decoder_file"] = str(Path(path).with_suffix(".ais.pth"))
        torch.save(decoder.state_dict(), desc["instance_decoder_file"])
    return desc


def _rebuild(case: dict):
    """The AdaptedModel of a job (base info only for a ``base`` case, which loads its own weights); either family."""
    from ..models import BaseModelInfo, build_architecture, load_state_strict
    from ..peft import PeftConfig, apply_peft
    from ..peft.adapters import AdaptedModel

    import torch

    desc = case["model"]
    base = BaseModelInfo(**desc["base"])
    config = PeftConfig.from_dict(desc["peft"]) if desc.get("peft") else None
    sam = None
    if case["spec"]["model"] != "base":
        sam = build_architecture(base.model_type, base.image_size)  # SAM or SAM 2 (models.family)
        if config is not None:
            apply_peft(sam, config)
        load_state_strict(sam, torch.load(case["model_file"], map_location="cpu", weights_only=True), case["model_file"])
        sam.eval()
    decoder = None
    if sam is not None and desc.get("instance_decoder_file"):
        from ..models.instance_decoder import decoder_from_state

        file = desc["instance_decoder_file"]
        decoder = decoder_from_state(torch.load(file, map_location="cpu", weights_only=True), file)
    return AdaptedModel(sam, config, base, intensity=desc.get("intensity") or {}, instance_decoder=decoder)


def _worker(job_path: str, out_path: str) -> int:
    """The worker: one case, measured, result written as JSON."""
    from .cases import BenchInputs
    from .measure import measure
    from .factory import make_runner
    from .stats import current_rss_mb, peak_rss_mb

    job = json.loads(Path(job_path).read_text())
    case = job["case"]
    spec = CaseSpec(**case["spec"])
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if job.get("verbose") else (lambda msg: None)
    rss_start = current_rss_mb()
    adapted = _rebuild(case) if spec.backend in ("torch", "torch-compile") else None
    inputs = BenchInputs(job["image_size"], tuple(job["batch_sizes"]), job["seed"])
    runner = make_runner(spec, adapted, case.get("export_dir"), inputs, job.get("threads"), job["components"])
    result = measure([runner], job["components"], job["warmup"], job["iterations"], False, log)[0]
    result["process"] = {"peak_rss_mb": round(peak_rss_mb(), 1), "rss_at_start_mb": round(rss_start, 1),
                         "rss_at_end_mb": round(current_rss_mb(), 1), "pid": os.getpid(),
                         "torch_imported": "torch" in sys.modules,
                         "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    Path(out_path).write_text(json.dumps(result, default=str))
    return 0


def _failed(spec: CaseSpec, reason: str) -> dict:
    return {**_spec_fields(spec), "status": "failed", "reason": reason, "failed_component": None, "components": {}}


def measure_fresh(
    cases: Sequence[FreshCase],
    components: Sequence[str],
    image_size: int,
    batch_sizes: Sequence[int] = (16,),
    seed: int = 0,
    warmup: int = 1,
    iterations: int = 10,
    intra_op_threads: int | None = None,
    log: Callable[[str], None] = lambda msg: None,
    timeout_s: float | None = None,
) -> list[dict]:
    """Run every case in its own worker process, one after the other; one result dict per case.

    Each result has ``load`` (the machine's load while its worker ran) and ``process``
    (the worker's peak RSS over its whole life: imports, model load and every call). A
    worker that dies (killed for memory, a crash) is recorded as failed with its last
    error line, and the others go on.
    """
    results = []
    with tempfile.TemporaryDirectory(prefix="peftexport-fresh-") as tmp:
        for i, case in enumerate(cases):
            job_path, out_path = Path(tmp) / f"job{i}.json", Path(tmp) / f"out{i}.json"
            job = {"case": {"spec": asdict(case.spec), "export_dir": case.export_dir, "model_file": case.model_file,
                            "model": case.model},
                   "components": list(components), "image_size": image_size, "batch_sizes": list(batch_sizes),
                   "seed": seed, "warmup": warmup, "iterations": iterations, "threads": intra_op_threads}
            job_path.write_text(json.dumps(job))
            log(f"case {i + 1}/{len(cases)} in a fresh process: {case.spec.name}")
            before = snapshot()
            try:
                proc = subprocess.run([sys.executable, "-m", "peft_export.bench.fresh", str(job_path), str(out_path)],
                                      capture_output=True, text=True, timeout=timeout_s, env=_worker_env(case.spec))
                code, err = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired as exc:
                code, err = None, f"timed out after {exc.timeout:.0f} s"
            load = load_between(before, snapshot())
            if code == 0 and out_path.is_file():
                result = json.loads(out_path.read_text())
            else:
                last = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
                why = err if code is None else f"worker exited with code {code}" + (f": {last[-1][:300]}" if last else "")
                result = _failed(case.spec, why)
            result["load"] = load
            if load.get("busy"):
                log(f"  warning: the machine was busy during this case ({describe_load(load)})")
            results.append(result)
    return results


def _worker_env(spec: CaseSpec | None = None) -> dict:
    """The parent's environment, with this package importable from wherever the parent found it (and,
    for a ``malloc="keep"`` case, glibc told to keep freed memory from the worker's start)."""
    env = dict(os.environ)
    if spec is not None and spec.malloc == "keep":
        from ..training.host_memory import GLIBC_TUNABLES_KEEP

        env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), GLIBC_TUNABLES_KEEP) if t)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2]))
