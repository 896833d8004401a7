"""TensorRT engines from the exported ONNX graphs, checked against ONNX Runtime.

Written against the documented TensorRT Python API (10 and 11); TensorRT cannot be
installed on the machines this project was developed on, so this module has NOT been run
here (its tests skip without ``tensorrt``). Differences handled:

* TensorRT 10: precision from builder flags (``BuilderFlag.FP16``).
* TensorRT 11: strongly typed networks only; the precision comes from the ONNX graph, so
  fp16 engines are built from ``encoder.fp16.onnx``.
* int8: TensorRT takes INT8 from Q/DQ nodes (or calibration on 10); ONNX Runtime's
  dynamic int8 graph (MatMulInteger/DynamicQuantizeLinear) is not TensorRT input, so
  int8 engines are refused up front.
* Meta's ``decoder`` has output shapes that depend on an input value (``orig_im_size``);
  only ``encoder`` and ``decoder_lowres`` become engines.

Engines are tied to GPU, CUDA and TensorRT versions, so their names carry them:
``encoder.fp16.NVIDIA-H100.sm90.trt10.3.engine``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import PeftExportError
from ..runtime.backends.trt import TensorRTEngine, check_status
from .refusals import refusal_record

TRT_GRAPHS = ("encoder", "decoder_lowres")
TRT_PRECISIONS = ("fp32", "fp16")
WORKSPACE_BYTES = 4 << 30
TIMING_CACHE = "timing.cache"
# Prompt profile: (min, opt, max) for num_points and prompt batch.
NUM_POINTS = (1, 4, 16)
BATCH = (1, 8, 64)
# Engine vs ONNX Runtime on the same inputs (TF32 is on by default for fp32 engines).
TRT_THRESHOLDS = {"fp32": {"cosine": 0.9999, "mask_iou": 0.99}, "fp16": {"cosine": 0.99, "mask_iou": 0.95}}


@dataclass
class TrtTarget:
    trt: Any  # the tensorrt module
    version: str
    major: int
    gpu_name: str
    capability: tuple[int, int]

    def engine_name(self, graph: str, precision: str) -> str:
        minor = ".".join(self.version.split(".")[:2])
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-")
        return f"{graph}.{precision}.{gpu}.sm{self.capability[0]}{self.capability[1]}.trt{minor}.engine"


def check_tensorrt(precisions: tuple[str, ...] | list[str]) -> TrtTarget:
    """Fail before any work when tensorrt, a CUDA GPU or a buildable precision is missing."""
    bad = [p for p in precisions if p not in TRT_PRECISIONS]
    if bad:
        raise PeftExportError(
            f"--precision: TensorRT engines are built for {', '.join(TRT_PRECISIONS)}, not {bad[0]} "
            "(ONNX Runtime's dynamic int8 graph has no TensorRT equivalent; it needs Q/DQ nodes)"
        )
    try:
        import tensorrt as trt
    except ImportError:
        raise PeftExportError(
            "--format tensorrt: the tensorrt Python package is not installed (pip install 'peftexport[tensorrt]' "
            "on a machine with an NVIDIA GPU)"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise PeftExportError("--format tensorrt: no CUDA GPU is visible; TensorRT engines are built on the target GPU")
    version = str(trt.__version__)
    return TrtTarget(trt, version, int(version.split(".")[0]), torch.cuda.get_device_name(0),
                     tuple(torch.cuda.get_device_capability(0)))


def _profile_shapes(graph: str, image_size: int) -> dict[str, tuple[tuple, tuple, tuple]]:
    g = image_size // 16
    if graph == "encoder":
        shape = (1, 3, image_size, image_size)
        return {"image": (shape, shape, shape)}
    b, n = BATCH, NUM_POINTS
    return {
        "image_embeddings": ((1, 256, g, g),) * 3,
        "point_coords": tuple((b[i], n[i], 2) for i in range(3)),
        "point_labels": tuple((b[i], n[i]) for i in range(3)),
        "mask_input": tuple((b[i], 1, 4 * g, 4 * g) for i in range(3)),
        "has_mask_input": tuple((b[i],) for i in range(3)),
    }


def build_engine(target: TrtTarget, onnx_path: Path, engine_path: Path, graph: str, precision: str,
                 image_size: int, cache_path: Path) -> float:
    """Parse the ONNX graph, build and write the serialized engine; returns build seconds.

    Every TensorRT call that reports failure by its result (None, False, -1) is checked.
    """
    trt = target.trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    check_status(builder, "creating a builder (is the GPU usable?)")
    if target.major >= 11:
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    else:
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    check_status(network, "creating a network definition")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # also reads external data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PeftExportError(f"{onnx_path.name}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    check_status(config, "creating a builder config")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp16" and target.major < 11:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in _profile_shapes(graph, image_size).items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise PeftExportError(f"{onnx_path.name}: TensorRT rejected the optimisation profile {_profile_shapes(graph, image_size)}")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    check_status(cache, f"creating the timing cache {cache_path.name}")
    if not config.set_timing_cache(cache, False):  # False: refuse a cache from another GPU/TensorRT
        raise PeftExportError(f"{cache_path}: TensorRT refused this timing cache (made by another GPU or TensorRT "
                              "version?); delete it and build again")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise PeftExportError(f"{onnx_path.name}: TensorRT failed to build a {precision} engine")
    engine_path.write_bytes(bytes(serialized))
    timing = config.get_timing_cache()
    check_status(timing, "reading the timing cache back")
    cache_path.write_bytes(bytes(timing.serialize()))
    return seconds


def run_engine(target: TrtTarget, engine_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized engine once on the GPU, exactly as the runtime's TensorRT backend does."""
    trt = target.trt
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    check_status(runtime, "creating the runtime")
    outputs = TensorRTEngine(trt, runtime, engine_path, engine_path.name).run(feeds)
    return {name: np.asarray(v, dtype=np.float32) for name, v in outputs.items()}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def verify_engine(target: TrtTarget, engine_path: Path, onnx_path: Path, graph: str, precision: str,
                  feeds: dict[str, np.ndarray]) -> dict:
    """Engine outputs vs ONNX Runtime (CPU) outputs of its source graph on the same inputs."""
    from .verify import ort_session

    sess = ort_session(onnx_path)
    ort_out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    trt_out = run_engine(target, engine_path, feeds)
    limits = TRT_THRESHOLDS[precision]
    stats: dict = {"outputs": {}}
    failures = []
    for name, ref in ort_out.items():
        got = trt_out[name]
        cos = _cosine(ref, got)
        entry = {"max_abs": float(np.abs(ref - got).max()), "cosine": cos}
        if name == "low_res_masks":
            inter, union = np.logical_and(ref > 0, got > 0).sum(), np.logical_or(ref > 0, got > 0).sum()
            entry["mask_iou"] = 1.0 if union == 0 else float(inter / union)
            if entry["mask_iou"] < limits["mask_iou"]:
                failures.append(f"{name} mask IoU {entry['mask_iou']:.4f}")
        if not np.isfinite(got).all() or cos < limits["cosine"]:
            failures.append(f"{name} cosine {cos:.6f}")
        stats["outputs"][name] = entry
    stats.update(thresholds=limits, failures=failures, passed=not failures)
    return stats


def build_engines(
    target: TrtTarget,
    export_dir: Path,
    onnx_files: dict[str, dict[str, str]],
    image_size: int,
    feeds: dict[str, dict[str, np.ndarray]],
    log: Callable[[str], None] = print,
    strict: bool = False,
) -> dict:
    """Engines for every (graph, precision) in ``onnx_files`` ({graph: {precision: onnx filename}}).

    Returns the manifest's ``tensorrt`` section. An engine that fails to build (TensorRT reports it by a
    None result or a RuntimeError) or differs from ONNX Runtime is left out and listed in the section's
    ``refused`` (manifest ``refused`` entries, graph ``"<graph> engine"``): the ONNX graphs that passed
    stay. ``strict``: raise instead.
    """
    cache_path = export_dir / TIMING_CACHE
    engines: dict = {}
    refused: list[dict] = []
    for graph, by_precision in onnx_files.items():
        for precision, onnx_name in by_precision.items():
            name = target.engine_name(graph, precision)
            step = "build"
            try:
                seconds = build_engine(target, export_dir / onnx_name, export_dir / name, graph, precision,
                                       image_size, cache_path)
                step = "check"
                parity = verify_engine(target, export_dir / name, export_dir / onnx_name, graph, precision,
                                       feeds[graph])
            except (PeftExportError, RuntimeError) as exc:  # pybind11 turns TensorRT's C++ errors into RuntimeError
                if strict:
                    raise PeftExportError(f"{name}: TensorRT {step} failed: {exc} (--strict)") from None
                (export_dir / name).unlink(missing_ok=True)
                refused.append(refusal_record(f"{graph} engine", precision, "tensorrt", None, None,
                                              f"{step} failed: {exc}"))
                log(f"  tensorrt {graph} {precision}: {step} FAILED ({exc})")
                continue
            log(f"  tensorrt {graph} {precision}: built in {seconds:.1f} s, "
                f"{'ok' if parity['passed'] else 'FAILED ' + '; '.join(parity['failures'])}")
            if not parity["passed"]:
                why = f"{name}: TensorRT engine differs from ONNX Runtime: {'; '.join(parity['failures'])}"
                if strict:
                    raise PeftExportError(why + " (--strict)")
                (export_dir / name).unlink(missing_ok=True)
                refused.append(refusal_record(f"{graph} engine", precision, "tensorrt", parity, None, why))
                continue
            engines.setdefault(graph, {})[precision] = {
                "path": name, "onnx": onnx_name, "build_seconds": round(seconds, 2), "parity_vs_onnxruntime": parity,
                "profile": {k: [list(s) for s in v] for k, v in _profile_shapes(graph, image_size).items()},
            }
    return {
        "engines": engines,
        "timing_cache": TIMING_CACHE if cache_path.exists() else None,  # no engine built: no cache written
        "tensorrt_version": target.version,
        "gpu": target.gpu_name,
        "compute_capability": f"sm{target.capability[0]}{target.capability[1]}",
        "strongly_typed": target.major >= 11,
        "refused": refused,
    }
