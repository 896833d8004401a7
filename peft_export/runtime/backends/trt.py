"""Native TensorRT backend: deserialised engines, one execution context and one CUDA stream each.

Buffers are torch CUDA tensors (torch is imported lazily, like tensorrt): host-to-device
copies, the engine and device-to-host copies are all queued on the engine's own stream, so
no copy can race the execution. Every TensorRT call that reports a status is checked.

An engine accepts the shapes of its optimisation profile only (our decoder engines: 1-64
prompts of 1-16 points, ``export.tensorrt``). More prompts than the profile's maximum run
in chunks of that maximum; more points per prompt than it are refused with a message that
says what the engine takes. Written against the TensorRT 10 Python API and not run on this
project's machines (no TensorRT there); the shape planning and chunking run in its tests.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

from ...errors import PeftExportError

Shape = Tuple[int, ...]
Profile = Dict[str, Tuple[Shape, Shape, Shape]]  # input -> (min, opt, max) of optimisation profile 0


def batched_inputs(profile: Profile) -> List[str]:
    """Inputs whose first dimension the profile lets vary: the prompt batch."""
    return [name for name, (lo, _, hi) in profile.items() if len(lo) and lo[0] != hi[0]]


def plan_chunks(graph: str, shapes: Dict[str, Shape], profile: Profile) -> List[Tuple[int, int]]:
    """Split the prompt batch into runs the engine accepts; raise for anything else it cannot take.

    ``shapes``: the feed shapes. Returns ``[(start, stop), ...]`` over the batch dimension of
    ``batched_inputs(profile)`` (one run ``[(0, B)]`` when it fits or nothing is batched).
    """
    for name, (lo, _, hi) in profile.items():
        if name not in shapes:
            raise PeftExportError(f"{graph}: input {name} is missing (the engine needs {', '.join(profile)})")
        shape = tuple(shapes[name])
        if len(shape) != len(lo):
            raise PeftExportError(f"{graph}: input {name} has shape {shape}; the engine takes {len(lo)} dimensions")
    batched = batched_inputs(profile)
    sizes = {shapes[n][0] for n in batched}
    if len(sizes) > 1:
        raise PeftExportError(f"{graph}: inputs {', '.join(batched)} disagree on the prompt batch size ({sorted(sizes)})")
    batch = sizes.pop() if sizes else 1
    for name, (lo, _, hi) in profile.items():
        for axis, (v, a, b) in enumerate(zip(shapes[name], lo, hi)):
            if name in batched and axis == 0:
                continue
            if not a <= v <= b:
                raise PeftExportError(_outside_profile(graph, name, axis, v, a, b))
    if not batched:
        return [(0, batch)]
    lo_b, hi_b = profile[batched[0]][0][0], profile[batched[0]][2][0]
    if batch < lo_b:
        raise PeftExportError(f"{graph}: {batch} prompts; the engine takes at least {lo_b}")
    return [(start, min(start + hi_b, batch)) for start in range(0, batch, hi_b)]


def _outside_profile(graph: str, name: str, axis: int, value: int, lo: int, hi: int) -> str:
    if name in ("point_coords", "point_labels") and axis == 1:
        return (f"{graph}: {value} points per prompt (box corners and the padding point count), but this TensorRT "
                f"engine was built for {lo} to {hi}; send fewer points, or use the onnxruntime backend, which "
                "takes any number")
    if name == "image" and axis >= 2:
        return (f"{graph}: image of {value} pixels along axis {axis}; this TensorRT engine was built for {lo} "
                "(the export's image size)")
    return f"{graph}: input {name} is {value} along axis {axis}; this TensorRT engine takes {lo} to {hi}"


def run_in_chunks(
    run_once: Callable[[Dict[str, np.ndarray]], Dict[str, np.ndarray]],
    feeds: Dict[str, np.ndarray],
    batched: Sequence[str],
    chunks: Sequence[Tuple[int, int]],
) -> Dict[str, np.ndarray]:
    """Run ``run_once`` per chunk of the batched inputs (others whole) and join outputs along axis 0."""
    if len(chunks) == 1:
        return run_once(feeds)
    parts: Dict[str, List[np.ndarray]] = {}
    for start, stop in chunks:
        piece = {k: (v[start:stop] if k in batched else v) for k, v in feeds.items()}
        for k, v in run_once(piece).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


def check_status(ok: object, what: str) -> None:
    """TensorRT reports most failures as a False/None result instead of raising."""
    if ok is None or ok is False:
        raise PeftExportError(f"TensorRT: {what} failed (see TensorRT's log above)")


def _torch_dtype(np_dtype):
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
            np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64, np.dtype(np.int8): torch.int8,
            np.dtype(np.bool_): torch.bool, np.dtype(np.uint8): torch.uint8}[np.dtype(np_dtype)]


class TensorRTEngine:
    """One deserialised engine, its execution context and its CUDA stream."""

    def __init__(self, trt, runtime, path: Path, graph: str) -> None:
        import torch

        self._trt, self._torch, self.graph, self.path = trt, torch, graph, Path(path)
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise PeftExportError(f"{path}: TensorRT cannot load this engine (built for another GPU/TensorRT?)")
        self.context = self.engine.create_execution_context()
        check_status(self.context, f"{self.path.name}: creating an execution context")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.profile: Profile = {
            n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, 0))  # type: ignore[misc]
            for n in self.inputs
        }
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()  # one execution context: serialise calls

    def _dtype(self, name: str):
        return np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Host arrays in, host arrays out; prompt batches beyond the profile run in chunks."""
        chunks = plan_chunks(self.graph, {n: np.shape(v) for n, v in feeds.items()}, self.profile)
        return run_in_chunks(self._run_once, {n: feeds[n] for n in self.inputs}, batched_inputs(self.profile), chunks)

    def _run_once(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        torch, ctx = self._torch, self.context
        with self._lock, torch.cuda.stream(self.stream):
            buffers = {}
            for name in self.inputs:
                host = np.ascontiguousarray(feeds[name], dtype=self._dtype(name))
                # Queued on self.stream (the current stream), so it is ordered before the execution.
                buffers[name] = torch.from_numpy(host).to(self.device)
                check_status(ctx.set_input_shape(name, tuple(host.shape)),
                             f"{self.path.name}: set_input_shape({name}, {tuple(host.shape)})")
            for name in self.outputs:
                shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise PeftExportError(f"{self.path.name}: output {name} has no shape for these inputs ({shape})")
                # Allocated under self.stream: the caching allocator ties the block to it.
                buffers[name] = torch.empty(shape, dtype=_torch_dtype(self._dtype(name)), device=self.device)
            for name, buf in buffers.items():
                check_status(ctx.set_tensor_address(name, buf.data_ptr()), f"{self.path.name}: set_tensor_address({name})")
            check_status(ctx.execute_async_v3(self.stream.cuda_stream), f"{self.path.name}: execution")
            out = {name: buffers[name].cpu().numpy() for name in self.outputs}  # copies on self.stream
            self.stream.synchronize()
        return out


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
            import torch
        except ImportError:
            raise PeftExportError("backend tensorrt: needs torch with CUDA for its GPU buffers") from None
        if not torch.cuda.is_available():
            raise PeftExportError("backend tensorrt: torch sees no CUDA GPU")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        check_status(runtime, "creating the runtime")
        self._engines = {name: TensorRTEngine(trt, runtime, path, name) for name, path in paths.items()}
        self.providers = ["TensorrtEngine"]

    def profile(self, name: str) -> Profile:
        """The (min, opt, max) input shapes engine ``name`` accepts."""
        return self._engines[name].profile

    def run(self, name: str, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return self._engines[name].run(feeds)
