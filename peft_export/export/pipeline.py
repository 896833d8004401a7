"""``merge_and_export``: exact merge, ONNX export of encoder + decoders at each precision,
parity checks of every graph, optional TensorRT engines, and ``manifest.json``.

Everything is written into a temporary directory beside ``out_dir`` that replaces it only
when every graph passed its check; on any failure (or Ctrl-C) nothing is left behind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

from ..peft.adapters import AdaptedModel
from ..errors import PeftExportError
from ..fsutil import atomic_dir
from ..merge import merge_and_verify
from ..peft import has_unmergeable_layers
from . import onnx_graphs as og
from .manifest import build_manifest, graph_entry, write_manifest
from .quantize import PRECISIONS, onnx_bytes, quantize_int8
from .verify import build_reference, decoder_feeds, format_parity_table, verify_export

FORMATS = ("onnx", "tensorrt")
MAX_OPSET = 20  # the TorchScript exporter's newest


def encoder_filename(precision: str) -> str:
    return "encoder.onnx" if precision == "fp32" else f"encoder.{precision}.onnx"


def _check_options(formats: Sequence[str], precisions: Sequence[str], opset: int, exporter: str) -> None:
    for f in formats:
        if f not in FORMATS:
            raise PeftExportError(f"--format: unknown format {f!r}; choose from {', '.join(FORMATS)}")
    if not precisions:
        raise PeftExportError("--precision: give at least one of fp32, fp16, int8")
    for p in precisions:
        if p not in PRECISIONS:
            raise PeftExportError(f"--precision: unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if not og.MIN_OPSET <= opset <= MAX_OPSET:
        raise PeftExportError(f"--opset: {opset} is outside {og.MIN_OPSET}..{MAX_OPSET}")
    og.check_exporter(exporter, opset)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """The checks atomic_dir makes, and a file in the way, before any slow work."""
    for parent in out_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise PeftExportError(f"{out_dir}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise PeftExportError(f"{out_dir}: {parent} is not writable")
            break
    if out_dir.exists() and not out_dir.is_dir():
        raise PeftExportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise PeftExportError(f"{out_dir}: directory exists and is not empty (pass --overwrite to replace it)")


def export_source(adapted: AdaptedModel) -> dict:
    """Where the exported weights came from, so `bench EXPORT_DIR` can also time the torch model."""
    if not adapted.source:
        return {}
    path = str(Path(adapted.source).resolve())
    if adapted.meta.get("format"):  # an adapter file / run directory
        return {"kind": "adapter", "adapter": path}
    if adapted.config is None:
        return {"kind": "merged", "path": path}
    return {"kind": "micro-sam", "micro_sam": path}  # needs its --peft options to load


def merge_and_export(
    adapted: AdaptedModel,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("onnx",),
    precisions: Sequence[str] = ("fp32",),
    opset: int = 17,
    preprocess_in_graph: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    exporter: str = "torchscript",
) -> dict:
    """Merge exactly (or keep AdaptFormer in the graph), export, verify every graph, write the manifest.

    Graphs: ``encoder`` (each precision), ``decoder`` (Meta's interface) and
    ``decoder_lowres`` (batched, low-res) in fp32, plus ``encoder_preprocess`` with
    ``preprocess_in_graph``, and ``ais_decoder`` (fp32 and each precision) when the model
    has micro-sam's instance decoder. Returns the manifest; raises PeftExportError (nothing
    written) when a graph fails its parity check.
    """
    formats, precisions = tuple(dict.fromkeys(formats)), tuple(dict.fromkeys(precisions))
    _check_options(formats, precisions, opset, exporter)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    target = None
    if "tensorrt" in formats:
        from .tensorrt import check_tensorrt

        target = check_tensorrt(precisions)  # before any work: no package / GPU -> nothing done
    log: Callable[[str], None] = print if progress else (lambda _msg: None)

    reference_model = adapted.model.eval()
    size = reference_model.image_encoder.img_size
    model_type = adapted.base.model_type
    t0 = time.perf_counter()
    merge_report = None
    if adapted.config is None:
        model, merged, in_graph = reference_model, True, []
    elif has_unmergeable_layers(reference_model):
        model, merged, in_graph = reference_model, False, [adapted.config.method]
        log(f"{adapted.config.method} cannot be folded: exporting it with its branch inside the graph")
    else:
        model, report = merge_and_verify(adapted)
        merged, in_graph = True, []
        merge_report = {"errors": report["errors"], "tolerance_rel": report["tolerance_rel"]}
        log(f"merged {adapted.config.method} in {time.perf_counter() - t0:.1f} s "
            f"(embeddings max rel {report['errors']['embeddings']['max_rel']:.1e})")
    model = model.eval()
    reference = build_reference(reference_model)

    graphs: dict[str, dict] = {}
    rows: list[tuple[str, str, dict]] = []
    used_exporter = exporter

    def check(graph: str, precision: str, filename: str, tmp: Path, export_s: float, extra: dict | None = None,
              verifier: Callable | None = None) -> None:
        t = time.perf_counter()
        if verifier is not None:
            parity = verifier(tmp / filename, reference, precision)
        else:
            parity = verify_export(tmp / filename, graph, reference_model, reference, precision)
        parity["export_seconds"] = round(export_s, 2)
        parity["verify_seconds"] = round(time.perf_counter() - t, 2)
        rows.append((graph, precision, parity))
        log(f"  {graph:<18} {precision:<5} exported {export_s:6.1f} s, verified {parity['verify_seconds']:5.1f} s, "
            f"{onnx_bytes(tmp / filename) / 1e6:8.1f} MB  {'ok' if parity['passed'] else 'FAILED'}")
        if not parity["passed"]:
            log(format_parity_table(rows))
            raise PeftExportError(
                f"{out_dir}: {graph} {precision} failed verification ({'; '.join(parity['failures'])}); nothing written"
            )
        graphs.setdefault(graph, {})[precision] = graph_entry(tmp, graph, filename, size, parity, extra)

    log(f"exporting {model_type} (image size {size}) to {out_dir}: {', '.join(formats)}; {', '.join(precisions)}")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the export is meant to be shared
        # fp32 encoder first: int8 is quantised from it (and removed if fp32 was not asked for).
        t = time.perf_counter()
        used_exporter = og.export_encoder_onnx(model, tmp / "encoder.onnx", opset, "fp32", exporter)
        fp32_s = time.perf_counter() - t
        if "fp32" in precisions:
            check("encoder", "fp32", "encoder.onnx", tmp, fp32_s, {"exporter": used_exporter})
        if "fp16" in precisions:
            t = time.perf_counter()
            how = og.export_encoder_onnx(model, tmp / encoder_filename("fp16"), opset, "fp16", exporter)
            check("encoder", "fp16", encoder_filename("fp16"), tmp, time.perf_counter() - t,
                  {"exporter": how, "opset": og.encoder_opset("fp16", opset),
                   "note": "fp16 weights/compute, LayerNorm fp32, graph I/O float32"})
        if "int8" in precisions:
            t = time.perf_counter()
            quantize_int8(tmp / "encoder.onnx", tmp / encoder_filename("int8"))
            check("encoder", "int8", encoder_filename("int8"), tmp, time.perf_counter() - t,
                  {"note": "onnxruntime quantize_dynamic, QInt8 weights, from the fp32 graph"})
        if "fp32" not in precisions:
            for p in (tmp / "encoder.onnx", tmp / "encoder.onnx.data"):
                p.unlink(missing_ok=True)
        if preprocess_in_graph:
            t = time.perf_counter()
            og.export_preprocess_encoder_onnx(model, tmp / "encoder_preprocess.onnx", opset)
            check("encoder_preprocess", "fp32", "encoder_preprocess.onnx", tmp, time.perf_counter() - t,
                  {"note": "input: the resized image HWC float32 0..255, h, w <= image_size (long side == "
                           "image_size); normalisation and bottom/right zero padding in the graph"})
        for flavour in og.DECODER_FLAVOURS:
            t = time.perf_counter()
            og.export_decoder_onnx(model, tmp / f"{flavour}.onnx", flavour, opset)
            check(flavour, "fp32", f"{flavour}.onnx", tmp, time.perf_counter() - t)
        ais = None
        if adapted.instance_decoder is not None:  # micro-sam's AIS decoder: fp32 and each asked precision
            from .ais import export_ais

            ais = export_ais(adapted.instance_decoder, tmp, size, precisions, opset, check)

        manifest = build_manifest(
            model_type, size, dict(adapted.intensity), adapted.config.to_dict() if adapted.config else None,
            merged, in_graph, graphs, opset, used_exporter, adapted.base.to_dict(), merge_report,
        )
        manifest["source"] = export_source(adapted)
        manifest["instance_segmentation"] = ais
        if target is not None:
            manifest["tensorrt"] = _tensorrt(target, tmp, graphs, precisions, size, reference, log)
            manifest["versions"]["tensorrt"] = target.version
        write_manifest(tmp, manifest)
    log(format_parity_table(rows))
    log(f"export passed all checks in {time.perf_counter() - t0:.1f} s: {out_dir}")
    return manifest


def _tensorrt(target, tmp: Path, graphs: dict, precisions: Sequence[str], size: int, reference, log) -> dict:
    from .tensorrt import build_engines

    onnx_files: dict[str, dict[str, str]] = {"encoder": {}, "decoder_lowres": {"fp32": "decoder_lowres.onnx"}}
    for p in precisions:
        # TensorRT 11 is strongly typed: an fp16 engine needs the fp16 ONNX graph.
        onnx_files["encoder"][p] = graphs["encoder"][p]["path"]
    if "fp16" in precisions and target.major < 11:
        onnx_files["decoder_lowres"]["fp16"] = "decoder_lowres.onnx"
    feeds = {
        "encoder": {"image": reference.image.numpy()},
        "decoder_lowres": decoder_feeds(reference, reference.prompts[-1], "decoder_lowres"),
    }
    return build_engines(target, tmp, onnx_files, size, feeds, log)
