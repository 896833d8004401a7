"""OpenVINO backend: the export's ONNX graphs compiled by OpenVINO's CPU plugin (Intel, AMD and ARM CPUs).

OpenVINO reads the same ``encoder.onnx`` (+ external data) and decoder graphs that ONNX
Runtime runs, so an export needs no separate files for it; ``merge-and-export`` verifies every
graph on it when the package is installed. On the vit_b encoder it uses a fraction of ONNX
Runtime's peak memory (README, CPU benchmark).

The inference precision is pinned to f32: on CPUs with AMX (and some with AVX-512 BF16)
OpenVINO's default runs fp32 graphs in bf16, which is a different model than the one the
export verified. fp16 and int8 graphs carry their own precision in the graph. The one
exception is the ``bf16`` precision of an export: the fp32 graphs run with OpenVINO's bf16
inference precision, which ``merge-and-export --precision bf16`` verified like an int8 graph
(``bf16_graphs`` names them). Only CPUs with native bfloat16 arithmetic do this
(``native_bf16``); elsewhere OpenVINO would silently run f32. int8 graphs that the export also
verified in bf16 mode (``verified_on`` names ``openvino-bf16``) run their int8 layers as int8 and
the rest (attention, norms, activations) in bf16 where the CPU has native bfloat16, f32 elsewhere
(``bf16_if_native``): on hiera_t at 1024 that is the fastest verified graph on such CPUs.

Thread-safety: one infer request per graph, used under that graph's lock, so concurrent
``run`` calls on one graph are serialised (the encoder and decoder can still overlap).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from pathlib import Path
from typing import Collection, Dict, Optional

import numpy as np

from ...errors import PeftExportError

OV_DTYPES = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "i64": np.int64, "i32": np.int32}


def compile_options(intra_op_threads: Optional[int] = None, inference_precision: str = "f32") -> dict:
    """OpenVINO CPU properties used everywhere (runtime, export checks, bench)."""
    opts = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY"}
    if intra_op_threads:
        opts["INFERENCE_NUM_THREADS"] = int(intra_op_threads)
    return opts


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def keep_signal_stack():
    """Give the calling thread back its own alternate signal stack after an OpenVINO compile.

    Each compile (OpenVINO 2026.4 CPU plugin) installs a ~10 kB alternate signal stack on the
    calling thread, and its core puts back the stack it found when the core goes. Two sessions
    released in the order they were made (an export verified on OpenVINO, then anything else)
    left the thread on a freed stack; Python's handlers run on the alternate stack, so the next
    signal (Ctrl-C during ``finetune``) killed the process with SIGSEGV. No handler of
    OpenVINO's needs that stack.
    """
    if sys.platform == "win32":  # no sigaltstack
        yield
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        saved = _SignalStack()
        ok = libc.sigaltstack(None, ctypes.byref(saved)) == 0
    except (OSError, AttributeError):
        ok = False
    try:
        yield
    finally:
        if ok:
            libc.sigaltstack(ctypes.byref(saved), None)


def native_bf16() -> Optional[str]:
    """None when OpenVINO runs bf16 natively on this CPU (AVX512_BF16 or AMX), else why not (one phrase)."""
    try:
        import openvino as ov
    except ImportError:
        return "the openvino package is not installed (pip install 'peftexport[openvino]')"
    with keep_signal_stack():
        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
        return "this CPU has no native bfloat16 arithmetic (AVX512_BF16 or AMX), so OpenVINO runs f32 here"
    return None


class OpenVinoBackend:
    """One compiled model per graph on OpenVINO's CPU device."""

    def __init__(self, paths: Dict[str, Path], device: str, intra_op_threads: Optional[int] = None,
                 bf16_graphs: Collection[str] = (), bf16_if_native: Collection[str] = ()) -> None:
        if device != "cpu":
            raise PeftExportError("backend openvino: runs on device='cpu' only here (use onnxruntime or tensorrt on CUDA)")
        try:
            import openvino as ov
        except ImportError:
            raise PeftExportError("backend openvino: the openvino package is not installed (pip install 'peftexport[openvino]')") from None
        why = native_bf16() if bf16_graphs or bf16_if_native else None  # asked once: it opens an OpenVINO core
        if bf16_graphs and why:
            raise PeftExportError(f"precision bf16: {why}")
        # graphs compiled in bf16 mode here (what ran, for the caller's record)
        self.bf16_graphs = sorted(set(bf16_graphs) | (set() if why else set(bf16_if_native)))
        core = ov.Core()
        self._compiled, self._requests, self._locks, self._inputs = {}, {}, {}, {}
        for name, path in paths.items():
            try:
                with keep_signal_stack():
                    compiled = core.compile_model(core.read_model(str(path)), "CPU",
                                                  compile_options(intra_op_threads, "bf16" if name in self.bf16_graphs else "f32"))
            except Exception as e:  # OpenVINO raises RuntimeError with multi-line messages
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PeftExportError(f"{path}: openvino cannot compile this graph ({first})") from None
            self._compiled[name] = compiled
            self._requests[name] = compiled.create_infer_request()
            self._locks[name] = threading.Lock()
            # A port may carry several tensor names (OpenVINO merges tensors); the graph input's is among them.
            self._inputs[name] = [(p.get_names(), OV_DTYPES.get(p.get_element_type().get_type_name(), np.float32))
                                  for p in compiled.inputs]
        self.providers = [f"OpenVINO {ov.get_version().split('-')[0]} CPU"]

    def run(self, name: str, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        cast = {}
        for names, dtype in self._inputs[name]:
            given = [n for n in names if n in feeds]
            if not given:
                raise PeftExportError(f"{name}: graph input '{sorted(names)[0]}' not provided")
            cast[given[0]] = np.ascontiguousarray(feeds[given[0]], dtype=dtype)
        with self._locks[name]:
            result = self._requests[name].infer(cast)
            out = {}
            for port, value in result.items():
                # A copy: the request reuses its output buffers. The port carries the ONNX output
                # name among the names of the tensors it merged, so every name maps to the array.
                array = np.array(value)
                for tensor_name in port.get_names():
                    out[tensor_name] = array
            return out
