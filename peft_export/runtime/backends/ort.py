"""ONNX Runtime backend: one InferenceSession per graph, CPU or CUDA provider, never a silent fallback."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ...errors import PeftExportError

ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


_ENV_ARENA_LOCK = threading.Lock()
_env_arena_registered = False


def _register_env_arena(ort) -> None:
    """One CPU arena in ONNX Runtime's process-wide environment, shared by every session that opts in."""
    global _env_arena_registered
    with _ENV_ARENA_LOCK:
        if not _env_arena_registered:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, None)
            _env_arena_registered = True


_SPINNING = {"allow": True}

# Graphs that run back to back within one call (the decoder family: split_prompts then split_masks):
# their pools stop spinning at the end of each run (they still spin within it), or the spinning pool
# of one takes a core from the next. One click with a mask on vit_b's decoder at 1024, 2 cores:
# 38 ms with spinning after the run, 23 ms without any spinning, 20 ms stopping at the end of a run
# (decoder_lowres in one graph: 20 ms).
CHAINED_GRAPHS = ("split_image", "split_prompts", "split_masks")


def set_thread_spinning(allow: bool) -> bool:
    """Whether the intra-op threads of sessions made from now on spin-wait after a run (ONNX Runtime's
    default, kept everywhere else); returns the previous setting.

    Off where other work shares the process between runs: the spinning threads keep the cores busy
    for a while after each run, and whatever runs next is slowed. ``bench --interleave`` (the demo's
    bench) timed every torch case right after an ONNX Runtime case: base torch, next in turn after the
    int8 case, measured 55 ms for an encoder that takes 6.4 ms (tiny, 256 px, 2 cores).
    """
    before = _SPINNING["allow"]
    _SPINNING["allow"] = bool(allow)
    return before


def session_options(device: str = "cpu", intra_op_threads: Optional[int] = None, graph: str = ""):
    """ONNX Runtime options used everywhere (runtime, export checks, bench); ``graph``: the export's
    name of the graph the session runs (the decoder family's pools stop spinning at the end of each
    run: ``CHAINED_GRAPHS``).

    On CPU every session allocates from one arena shared by the whole process, with ONNX
    Runtime's buffer reuse and memory patterns off: a freed intermediate goes back to the
    arena at once, and the next node, graph or session takes it from there. ORT's defaults
    (an arena per session, buffers reused by plan) kept every intermediate of a run alive:
    vit_b at 1024 peaked at 3.6 GB in one session (plain attention) and each further graph
    (a shared-trunk head, a second export) added its own. Measured with
    ``python benchmarks/bench_shared_trunk.py`` (README, "One trunk, many adapters").
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if device == "cpu":
        _register_env_arena(ort)
        opts.add_session_config_entry("session.use_env_allocators", "1")
        opts.enable_mem_pattern = False
        opts.enable_mem_reuse = False
    if intra_op_threads:
        opts.intra_op_num_threads = int(intra_op_threads)
    if not _SPINNING["allow"]:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif graph.startswith(CHAINED_GRAPHS):
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


class OrtBackend:
    """ONNX Runtime sessions for the encoder and decoder graphs."""

    def __init__(self, paths: Dict[str, Path], device: str, intra_op_threads: Optional[int]) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise PeftExportError(
                "backend onnxruntime: the onnxruntime package is not installed "
                "(pip install 'peftexport[cpu]' or 'peftexport[gpu]')"
            ) from None
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise PeftExportError(
                    "device cuda: this onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu "
                    "(and uninstall onnxruntime, they share one module), or use device='cpu'"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.sessions = {}
        for name, path in paths.items():
            opts = session_options(device, intra_op_threads, graph=name)
            opts.log_severity_level = 4  # a failing run is reported once, by run()'s one line, not also by ORT's log
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:  # ORT raises its own exception types
                raise PeftExportError(f"{path}: onnxruntime cannot load this graph ({e})") from None
            if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
                raise PeftExportError(
                    f"{path}: onnxruntime could not start the CUDA provider (check CUDA/cuDNN libraries)"
                )
            self.sessions[name] = sess
        self.providers = list(next(iter(self.sessions.values())).get_providers())

    def run(self, name: str, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        sess = self.sessions[name]
        cast = {}
        for inp in sess.get_inputs():
            if inp.name not in feeds:
                raise PeftExportError(f"{name}: graph input '{inp.name}' not provided")
            cast[inp.name] = np.ascontiguousarray(feeds[inp.name], dtype=ORT_DTYPES.get(inp.type, np.float32))
        names = [o.name for o in sess.get_outputs()]
        try:
            outputs = sess.run(names, cast)
        except Exception as e:  # ORT's own types (Fail, RuntimeException, ...): out of memory, bad shapes
            raise PeftExportError(f"{name}: onnxruntime failed running this graph ({ort_error_line(e)})") from None
        return dict(zip(names, outputs))


def ort_error_line(exc: Exception) -> str:
    """ONNX Runtime's message without its ``[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION :`` prefix, one line."""
    text = " ".join(str(exc).split())
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text if len(text) <= 400 else text[:397] + "..."
