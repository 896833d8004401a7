"""``peftexport bench``: latency and memory of every way to run one model, side by side.

A *case* is one way to run the model (base SAM in torch, the adapter model unmerged,
the merged model, torch.compile, each exported precision in ONNX Runtime, TensorRT
engines). torch is also timed at its best (on the CPU with freed memory kept, and compiled
where torch.compile runs), and every ratio is against the fastest torch case of the same
run, per component (``report.pick_reference``). Each case is timed per *component*:

- ``encoder``: the image encoder on a preprocessed 1x3xSxS input;
- ``decoder_point`` / ``decoder_box``: prompt encoder + mask decoder on a fixed image
  embedding, one positive point / one box, low-resolution masks out (exports: as
  ``SamSession.predict``, the decoder family; ``decoder_lowres`` on TensorRT engines);
- ``decoder_boxes_bN``: the same with a batch of N boxes in one call (exports: as
  ``predict_batch``, the decoder family: ``split_prompts`` + ``split_masks`` per call,
  ``split_image`` once per image with the embedding, untimed; ``bench.family``);
- ``end_to_end``: ``set_image`` + ``predict`` (one box) from a host uint8 image to
  host boolean masks at the image's size (SamPredictor in torch, SamSession otherwise);
- ``ais`` (only when asked): micro-sam's instance decoder + post-processing on the fixed
  embedding (``bench.ais``).

A SAM 2 model (adapter, checkpoint or export: ``family`` sam2) is timed on the same components by
``bench.sam2``'s runners (its encoder with the two high-resolution maps, its decoder, SAM2ImagePredictor /
Sam2Session end to end); ``ais`` and TensorRT are SAM-only.

Warm-up calls are not timed. Memory is measured on the warm-up calls (on the first
timed calls when there is no warm-up): on CPU the peak RSS of the process above its
RSS on entry to the call (``stats.RssSampler``); with torch on CUDA
``max_memory_allocated`` above what was allocated on entry; for ONNX Runtime /
TensorRT on CUDA the growth of device memory in use (``cudaMemGetInfo``), because
their allocators are invisible to torch. ``resident_mb`` is what loading the case
added (weights, sessions); ``peak_mb`` = resident + the largest working memory of a call.

On CUDA torch calls are timed with CUDA events; ONNX Runtime runs with IO binding, so
inputs already sit on the device and outputs stay there (no host copies are timed).
End to end includes host copies by definition.

This module imports only numpy and the standard library at import time; torch,
onnxruntime and tensorrt are imported by the cases that need them, so an export dir
can be benchmarked on a machine without torch.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import __version__
from ..errors import PeftExportError
from .cases import (
    BACKENDS,
    BENCH_FORMAT,
    BENCH_FORMAT_VERSION,
    DEFAULT_COMPONENTS,
    EXPORT_PRECISIONS,
    TORCH_PRECISIONS,
    BenchInputs,
    CaseSpec,
    detect_availability,
    expand_components,
    plan_cases,
)
from .fresh import FreshCase, measure_fresh, save_model
from .load import load_between, snapshot
from .measure import measure
from .report import add_ratios, format_table, pick_reference, write_json, write_plot, write_text
from .factory import make_runner
from .sam2 import NO_AIS, is_sam2_model, split_sam2_cases
from .stats import device_info, library_versions


# ---- the command ----------------------------------------------------------------------------


def _export_precisions(manifest: dict) -> list[str]:
    return [p for p in EXPORT_PRECISIONS if p in (manifest.get("graphs", {}).get("encoder") or {})]


def _engine_precisions(manifest: dict) -> list[str]:
    engines = (manifest.get("tensorrt") or {}).get("engines") or {}
    enc = engines.get("encoder")
    if enc is None:
        return []
    if isinstance(enc, dict) and "path" not in enc:
        return [p for p in enc if p in EXPORT_PRECISIONS]
    return [str(enc.get("precision", "fp16")) if isinstance(enc, dict) else "fp16"]


def adapter_from_manifest(manifest: dict):
    """The adapter recorded as an export's source, if it is still there and loads; else (None, reason)."""
    src = manifest.get("source")
    path = None
    if isinstance(src, dict):
        path = src.get("adapter") or src.get("path")
    elif isinstance(src, str):
        path = src
    path = path or manifest.get("adapter")
    if not path:
        return None, "the manifest records no adapter source; give --adapter RUN for torch cases"
    if not Path(path).exists():
        return None, f"the manifest's adapter source {path} is not on this machine"
    try:
        from ..peft.adapters import load_model_source

        if Path(path).is_file() and Path(path).suffix in (".pt", ".pth"):
            return load_model_source(merged=path), None
        return load_model_source(adapter=path), None
    except PeftExportError as exc:
        return None, f"the manifest's adapter source does not load ({exc})"


def run_bench(
    export_dir: str | Path | None = None,
    adapted: Any = None,
    backends: Sequence[str] = BACKENDS,
    device: str = "cpu",
    precisions: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (16,),
    warmup: int = 1,
    iterations: int = 10,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    include_base: bool = True,
    interleave: bool = False,
    fresh_process: bool | None = None,
    export_formats: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    seed: int = 0,
    label: str | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Benchmark every available case of one model; returns the full result (JSON-able).

    Give ``export_dir`` (ONNX cases; torch cases too if its manifest records a
    loadable adapter), ``adapted`` (an ``AdaptedModel``: torch cases; ONNX cases from
    ``export_dir`` if given, else from a temporary export made here when
    ``backends`` has onnxruntime), or both.

    ``fresh_process`` (the default unless ``interleave``): every case runs in its own
    worker process (``fresh.measure_fresh``), with the machine's load recorded around it.
    ``interleave``: every case is loaded in this process and timed in turn (A B A B).
    """
    from .options import check_bench_options

    check_bench_options(backends, device, precisions, batch_sizes, components, warmup, iterations, intra_op_threads)
    if fresh_process is None:
        fresh_process = not interleave
    if fresh_process and interleave:
        raise PeftExportError("--interleave times every case in one process; it cannot be combined with fresh processes")
    backends = list(backends)
    for b in backends:
        if b not in BACKENDS:
            raise PeftExportError(f"--backend: unknown '{b}' (use {', '.join(BACKENDS)})")
    for p in precisions or []:
        if p not in TORCH_PRECISIONS + EXPORT_PRECISIONS:
            raise PeftExportError(f"--precision: unknown '{p}' (use fp32, bf16, fp16, int8)")
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if any(b < 1 for b in batch_sizes):
        raise PeftExportError("--batch-size: must be >= 1")
    if export_dir is None and adapted is None:
        raise PeftExportError("give an EXPORT_DIR or --adapter RUN")
    comps = expand_components(components, batch_sizes)
    available = detect_availability()
    notes: list[str] = []

    manifest = None
    if export_dir is not None:
        from ..runtime.manifest import read_manifest

        manifest = read_manifest(export_dir)
        if adapted is None and ({"torch", "torch-compile"} & set(backends)):
            adapted, why = adapter_from_manifest(manifest)
            if why:
                notes.append(why)

    sam2 = (manifest or {}).get("family") == "sam2" or is_sam2_model(adapted)  # SAM 2's runners: bench.sam2
    if sam2 and "ais" in comps:
        raise PeftExportError(f"--components {NO_AIS}")

    with contextlib.ExitStack() as stack:
        no_export_reason = None
        if {"onnxruntime", "openvino"} & set(backends) and manifest is None:
            if not available.onnxruntime:
                no_export_reason = "onnxruntime is not installed (pip install 'peftexport[cpu]' or '[gpu]')"
            else:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peftexport-bench-")))
                export_dir = tmp / "export"
                log("exporting a temporary ONNX model (merge_and_export)")
                try:
                    manifest = _temporary_export(adapted, export_dir, precisions, device, export_formats)
                except PeftExportError as exc:
                    no_export_reason = f"temporary export failed: {exc}"
        image_size = int(manifest["image_size"]) if manifest else int(adapted.base.image_size)
        model_type = (manifest or {}).get("model_type") or (adapted.base.model_type if adapted else None)

        torch_models: list[str] = []
        unmergeable = None
        if adapted is not None and available.torch:
            if adapted.config is None:
                torch_models = ["merged"]  # a plain / merged checkpoint is its own merged model
            else:
                from ..peft import has_unmergeable_layers

                torch_models = (["base"] if include_base else []) + ["unmerged", "merged"]
                if has_unmergeable_layers(adapted.model):
                    unmergeable = f"{adapted.config.method} cannot be merged (non-linear branch); only unmerged is timed"
        specs, skipped = plan_cases(
            backends, device, precisions, available, torch_models, unmergeable,
            _export_precisions(manifest) if manifest else [],
            _engine_precisions(manifest) if manifest else [], no_export_reason,
            export_refused=_refused_encoders(manifest) if manifest else {}, fresh_process=fresh_process)
        if sam2:
            specs, not_sam2 = split_sam2_cases(specs)
            skipped += not_sam2
        inputs = BenchInputs(image_size, batch_sizes, seed)
        t0 = time.time()
        before = snapshot()
        if fresh_process:
            results = measure_fresh(_fresh_cases(specs, adapted, export_dir, stack), comps, image_size, batch_sizes,
                                    seed, warmup, iterations, intra_op_threads, log)
        else:
            runners = [make_runner(s, adapted, export_dir, inputs, intra_op_threads, comps) for s in specs]
            results = measure(runners, comps, warmup, iterations, interleave, log)
        run_load = load_between(before, snapshot())
        elapsed = time.time() - t0

    cases = results + skipped
    reference = pick_reference(cases)
    add_ratios(cases, reference)
    return {
        "format": BENCH_FORMAT,
        "format_version": BENCH_FORMAT_VERSION,
        "peftexport_version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "label": label,
        "machine": device_info(),
        "versions": library_versions(),
        "settings": {
            "device": device, "backends": backends, "precisions": list(precisions) if precisions else None,
            "batch_sizes": list(batch_sizes), "warmup": warmup, "iterations": iterations, "components": comps,
            "interleave": interleave, "fresh_process": fresh_process, "image_size": image_size, "model_type": model_type,
            "family": "sam2" if sam2 else "sam",
            "input_image_shape": list(inputs.image.shape), "seed": seed,
            "export_dir": str(export_dir) if export_dir and manifest and "peftexport-bench-" not in str(export_dir) else None,
            "temporary_export": bool(export_dir and "peftexport-bench-" in str(export_dir)),
            "source": getattr(adapted, "source", None) if adapted is not None else None,
            "peft": adapted.config.to_dict() if adapted is not None and adapted.config is not None else None,
            "base": adapted.base.to_dict() if adapted is not None else None,
        },
        "notes": notes,
        "load": run_load,
        "reference": reference,
        "elapsed_s": round(elapsed, 1),
        "cases": cases,
    }


def _temporary_export(adapted, out_dir: Path, precisions, device: str, formats) -> dict:
    try:
        from ..export import merge_and_export
    except ImportError as exc:
        raise PeftExportError(f"the export module cannot be imported ({exc})") from None
    from ..runtime.manifest import read_manifest

    default = ["fp32", "int8"] if device == "cpu" else ["fp32", "fp16"]
    wanted = [p for p in (precisions or default) if p in EXPORT_PRECISIONS] or ["fp32"]
    if "fp32" not in wanted:
        wanted = ["fp32"] + wanted  # the runtime's decoder is fp32
    kwargs: dict = {"precisions": wanted, "progress": False}
    if formats is not None:
        kwargs["formats"] = list(formats)
    merge_and_export(adapted, out_dir, **kwargs)
    return read_manifest(out_dir)


def _fresh_cases(specs: Sequence[CaseSpec], adapted, export_dir, stack: contextlib.ExitStack) -> list[FreshCase]:
    """Worker jobs; the torch model is written once to a temporary file that every torch case loads."""
    desc, model_file = {}, None
    if any(s.backend in ("torch", "torch-compile") for s in specs):
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peftexport-bench-model-")))
        model_file = str(tmp / "model.pt")
        desc = save_model(adapted, model_file)
    return [FreshCase(s, str(export_dir) if export_dir else None,
                      model_file if s.backend in ("torch", "torch-compile") else None,
                      desc if s.backend in ("torch", "torch-compile") else {}) for s in specs]


def run_and_write(
    json_out: str | Path | None = None,
    markdown_out: str | Path | None = None,
    plot_out: str | Path | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> dict:
    """``run_bench`` then write the requested outputs (each atomically); checks the paths first."""
    from ..fsutil import check_can_write

    for p in (json_out, markdown_out, plot_out):
        if p is not None:
            check_can_write(p, overwrite)
    result = run_bench(**kwargs)
    if json_out is not None:
        write_json(json_out, result, overwrite)
    if markdown_out is not None:
        write_text(markdown_out, format_table(result, markdown=True), overwrite)
    if plot_out is not None and any(c["status"] == "ok" and c["components"] for c in result["cases"]):
        write_plot(plot_out, result, overwrite)
    return result


def _refused_encoders(manifest: dict) -> dict[str, str]:
    """Encoder precisions refused at export: precision -> why (the manifest's refusal line)."""
    from ..runtime.manifest import refused_graphs

    return {r["precision"]: str(r.get("line", "")) for r in refused_graphs(manifest) if r.get("graph") == "encoder"}
