"""Native TensorRT backend: deserialised engines, one execution context each."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict

import numpy as np

from ...errors import PeftExportError


class TensorRTBackend:
    """TensorRT engines (written against the TensorRT 10 Python API; not run on this project's machines)."""

    def __init__(self, paths: Dict[str, Path], device: str) -> None:
        if device != "cuda":
            raise PeftExportError("backend tensorrt: needs device='cuda'")
        try:
            import tensorrt as trt  # type: ignore
        except ImportError:
            raise PeftExportError("backend tensorrt: the tensorrt package is not installed (pip install 'peftexport[tensorrt]')") from None
        try:
            import cupy as cp  # type: ignore
        except ImportError:
            raise PeftExportError("backend tensorrt: needs cupy for GPU buffers (pip install cupy-cuda12x)") from None
        self._trt, self._cp = trt, cp
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        self._engines, self._contexts = {}, {}
        for name, path in paths.items():
            engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
            if engine is None:
                raise PeftExportError(f"{path}: TensorRT cannot load this engine (built for another GPU/TensorRT?)")
            self._engines[name] = engine
            self._contexts[name] = engine.create_execution_context()
        self._lock = threading.Lock()  # one execution context per engine: serialise calls
        self.providers = ["TensorrtEngine"]

    def run(self, name: str, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        trt, cp = self._trt, self._cp
        engine, ctx = self._engines[name], self._contexts[name]
        with self._lock:
            buffers, outputs = {}, {}
            for i in range(engine.num_io_tensors):
                tname = engine.get_tensor_name(i)
                dtype = trt.nptype(engine.get_tensor_dtype(tname))
                if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT:
                    arr = cp.asarray(np.ascontiguousarray(feeds[tname], dtype=dtype))
                    ctx.set_input_shape(tname, arr.shape)
                    buffers[tname] = arr
            for i in range(engine.num_io_tensors):
                tname = engine.get_tensor_name(i)
                if engine.get_tensor_mode(tname) == trt.TensorIOMode.OUTPUT:
                    dtype = trt.nptype(engine.get_tensor_dtype(tname))
                    buffers[tname] = outputs[tname] = cp.empty(tuple(ctx.get_tensor_shape(tname)), dtype=dtype)
            for tname, arr in buffers.items():
                ctx.set_tensor_address(tname, arr.data.ptr)
            stream = cp.cuda.Stream(non_blocking=True)
            if not ctx.execute_async_v3(stream.ptr):
                raise PeftExportError(f"{name}: TensorRT execution failed")
            stream.synchronize()
            return {k: cp.asnumpy(v) for k, v in outputs.items()}
