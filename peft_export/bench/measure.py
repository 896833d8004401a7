"""Timing and memory of runners: warm-up, timed iterations (one case at a time or interleaved), results."""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import PeftExportError
from ..runtime.backends.ort import set_thread_spinning
from .cases import _spec_fields, component_batch
from .runners import Runner, TorchRunner
from .stats import RssSampler, current_rss_mb, summarize_timings


# ---- timing and memory ------------------------------------------------------------------------


def _torch_cuda():
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch


def _device_used_mb() -> float | None:
    torch = _torch_cuda()
    if torch is None:
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 1024**2


class _Memory:
    """Working memory of one call, measured the way that fits the case's device and backend."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.kind = ("rss" if runner.spec.device == "cpu"
                     else "cuda_allocated" if isinstance(runner, TorchRunner) else "cuda_device_used")

    def resident_start(self) -> float | None:
        if self.kind == "rss":
            gc.collect()
            return current_rss_mb()
        torch = _torch_cuda()
        if torch is None:
            return None
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 1024**2 if self.kind == "cuda_allocated" else _device_used_mb()

    @contextlib.contextmanager
    def call(self, out: list):
        if self.kind == "rss":
            with RssSampler() as s:
                yield
            out.append(s.delta_mb)
            return
        torch = _torch_cuda()
        if torch is None:
            yield
            return
        torch.cuda.synchronize()
        if self.kind == "cuda_allocated":
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            out.append(max(0.0, (torch.cuda.max_memory_allocated() - before) / 1024**2))
        else:
            before = _device_used_mb()
            yield
            torch.cuda.synchronize()
            out.append(max(0.0, _device_used_mb() - before))


def time_call(runner: Runner, component: str) -> float:
    """Seconds of one synchronised call; CUDA events for torch on CUDA."""
    if runner.uses_cuda_events:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        runner.run(component)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    runner.run(component)
    return time.perf_counter() - t0


@dataclass
class _CaseState:
    runner: Runner
    memory: _Memory
    resident_mb: float | None = None
    times: dict = field(default_factory=dict)
    working: dict = field(default_factory=dict)
    error: str | None = None
    failed_component: str | None = None


def _prepare(state: _CaseState, log: Callable[[str], None]) -> None:
    log(f"loading {state.runner.spec.name}")
    before = state.memory.resident_start()
    state.runner.prepare()
    after = state.memory.resident_start()
    if before is not None and after is not None:
        state.resident_mb = max(0.0, after - before)


def _warm(state: _CaseState, component: str, warmup: int) -> None:
    state.runner.ready(component)
    mem = state.working.setdefault(component, [])
    for _ in range(warmup):
        with state.memory.call(mem):
            state.runner.run(component)


def _timed(state: _CaseState, component: str, warmup: int) -> None:
    times = state.times.setdefault(component, [])
    if warmup == 0 and not times:  # no warm-up: memory comes from the first timed call
        mem = state.working.setdefault(component, [])
        with state.memory.call(mem):
            times.append(time_call(state.runner, component))
    else:
        times.append(time_call(state.runner, component))


def _fail(state: _CaseState, component: str | None, exc: BaseException) -> None:
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc
    state.error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    state.failed_component = component


def measure(
    runners: Sequence[Runner],
    components: Sequence[str],
    warmup: int = 1,
    iterations: int = 10,
    interleave: bool = False,
    log: Callable[[str], None] = lambda msg: None,
) -> list[dict]:
    """Time every runner on every component; one result dict per runner.

    ``interleave=False``: one case at a time, loaded and released in turn (clean
    memory figures). ``interleave=True``: every case is loaded, then each timed
    iteration runs the cases in turn (A B C A B C ...), so slow drift of the machine
    (thermal, other load) hits all cases alike; needs memory for all cases at once.
    A case that raises is recorded as failed with the error, and the others go on.
    """
    if warmup < 0 or iterations < 1:
        raise PeftExportError("--warmup must be >= 0 and --iterations >= 1")
    states = [_CaseState(r, _Memory(r)) for r in runners]
    if not interleave:
        for st in states:
            comp = None
            try:
                _prepare(st, log)
                for comp in components:
                    log(f"timing {st.runner.spec.name}: {comp}")
                    _warm(st, comp, warmup)
                    for _ in range(iterations):
                        _timed(st, comp, warmup)
            except BaseException as exc:  # noqa: BLE001 - recorded, the run goes on
                _fail(st, comp, exc)
            finally:
                st.runner.close()
                gc.collect()
    else:
        # Cases take turns in one process: ONNX Runtime's threads must not spin after a run, or they slow
        # the case timed next (see set_thread_spinning); its sessions are made in _prepare.
        spinning = set_thread_spinning(False)
        try:
            _interleaved(states, components, warmup, iterations, log)
        finally:
            set_thread_spinning(spinning)
    return [_result(st) for st in states]


def _interleaved(states: list, components: Sequence[str], warmup: int, iterations: int,
                 log: Callable[[str], None]) -> None:
    """Load every case, then time each component in turns (A B C A B C ...)."""
    for st in states:
        try:
            _prepare(st, log)
        except BaseException as exc:  # noqa: BLE001
            _fail(st, None, exc)
    for comp in components:
        live = [st for st in states if st.error is None]
        log(f"timing {comp}: {len(live)} cases interleaved")
        for st in live:
            try:
                _warm(st, comp, warmup)
            except BaseException as exc:  # noqa: BLE001
                _fail(st, comp, exc)
        for it in range(iterations):
            live = [st for st in states if st.error is None]
            for st in live:
                try:
                    _timed(st, comp, warmup)
                except BaseException as exc:  # noqa: BLE001
                    _fail(st, comp, exc)
    for st in states:
        st.runner.close()
    gc.collect()


def _result(st: _CaseState) -> dict:
    spec = st.runner.spec
    entry = {**_spec_fields(spec), "status": "ok" if st.error is None else "failed",
             "reason": st.error, "failed_component": st.failed_component,
             "memory_kind": st.memory.kind, "resident_mb": _round(st.resident_mb), "components": {}}
    try:
        entry["details"] = st.runner.describe()
    except Exception:  # describe is informative only
        entry["details"] = {}
    for comp, times in st.times.items():
        if not times or (st.error is not None and comp == st.failed_component):
            continue
        stats = summarize_timings(times, batch_size=component_batch(comp))
        stats["throughput_unit"] = "prompts/s" if comp.startswith("decoder") else "images/s"
        stats["times_ms"] = [round(t * 1000.0, 4) for t in times]
        work = st.working.get(comp) or []
        stats["working_mb"] = _round(max(work)) if work else None
        parts = [v for v in (st.resident_mb, stats["working_mb"]) if v is not None]
        stats["peak_mb"] = _round(sum(parts)) if parts else None
        entry["components"][comp] = stats
    return entry


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


