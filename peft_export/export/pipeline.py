"""``merge_and_export``: exact merge, ONNX export of encoder + decoders at each precision,
parity checks of every graph, optional TensorRT engines, and ``manifest.json``.

Everything is written into a temporary directory beside ``out_dir`` that replaces it when the
required graphs (the fp32 encoder and Meta's decoders: the reference every other graph is judged
against) passed their checks. An optional graph (int8 / fp16 encoder, split and click decoders, AIS
decoder, TensorRT engines) that fails its gate is left out and recorded in the manifest's
``refused`` list (what was measured, the value, the limit, the recipe tried); ``strict=True`` makes
any refusal fail the whole export. On a failure (or Ctrl-C) nothing is left behind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

from segment_anything.modeling import Sam

from ..peft.adapters import AdaptedModel
from ..errors import PeftExportError
from ..fsutil import atomic_dir
from ..models.family import is_sam2
from . import onnx_graphs as og
from .fused_attention import ATTENTION_FORMS
from .gates import BF16_NOTE, bf16_mode_backends, check_bf16_export
from .manifest import build_manifest, graph_entry, training_scale_record, write_manifest
from .refusals import is_required, refusal_line, refusal_record
from .int8_data import GATE_PROMPT_SEED, Agreement, int8_verifier, quantise_tuned, split_int8_data
from .quantize import PRECISIONS, Int8Recipe, onnx_bytes
from .click_decoder import CLICK_GRAPH, CLICK_NOTE, export_click_graph
from .split_decoder import SPLIT_GRAPHS, SPLIT_NOTE, export_split_graph
from .verify import ENCODER_MEASURES, build_reference, decoder_feeds, format_parity_table, verify_backends, verify_export
# What every export does before its graphs (SAM 2's pipeline, sam2_image, uses them too).
from .prepare import check_out_dir as _check_out_dir, encoder_filename, export_source, merge_for_export  # noqa: F401

FORMATS = ("onnx", "tensorrt")
MAX_OPSET = 20  # the TorchScript exporter's newest


def _check_options(formats: Sequence[str], precisions: Sequence[str], opset: int, exporter: str,
                   attention: str = "plain") -> None:
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
    if attention not in ATTENTION_FORMS:
        raise PeftExportError(f"--attention: unknown {attention!r}; choose one of {', '.join(ATTENTION_FORMS)}")


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
    calibration_data: str | os.PathLike | None = None,
    int8_recipe: Int8Recipe | None = None,
    attention: str = "plain",
    strict: bool = False,
    meta_decoder: bool = False,
    video: bool = False,
) -> dict:
    """Merge exactly (or keep AdaptFormer in the graph), export, verify every graph, write the manifest.

    Graphs: ``encoder`` (each precision), the decoder family (``split_image``, ``split_prompts``
    with the mask input, ``split_masks``: predict, predict_batch and segment-everything), ``click_decoder``
    (the browser page's decoder, after ``split_image``), and with ``meta_decoder`` Meta's ``decoder``
    and ``decoder_lowres`` (batched, low-res; also for a TensorRT target) in fp32, plus ``encoder_preprocess`` with
    ``preprocess_in_graph``, and ``ais_decoder`` (fp32 and each precision) when the model
    has micro-sam's instance decoder. Returns the manifest; raises PeftExportError (nothing
    written) when a graph fails its parity check.

    int8: ``calibration_data`` (a directory of the user's images) makes a static QDQ graph
    calibrated on them (less a held-out part the gate verifies on, ``int8_data``), else dynamic
    quantisation; ``int8_recipe`` overrides the default (``quantize.default_recipe``). The manifest
    records the recipe, the calibration images and which data tuned and which verified the graph.

    ``attention``: how the fp32 encoder (and the int8 one quantised from it) writes attention:
    ``plain`` (SAM's ops), ``folded`` or ``fused`` (``fused_attention``), parity-gated like any graph.

    ``meta_decoder``: also write Meta's ``decoder`` (segment_anything's ONNX interface, for other
    tools). The runtime runs the family (split_image, split_prompts with the mask input, split_masks)
    for every prompt (``decoder_flavours``).

    ``strict``: any refused graph fails the export (nothing written); by default an optional graph
    that fails its gate is left out and listed in ``manifest["refused"]`` (``refusal_line`` words it).

    ``video`` (SAM 2 only): also the memory graphs for propagation (``sam2_video``).
    """
    formats, precisions = tuple(dict.fromkeys(formats)), tuple(dict.fromkeys(precisions))
    _check_options(formats, precisions, opset, exporter, attention)
    check_bf16_export(precisions)  # before any work: bf16 is verified where it runs (OpenVINO, native bfloat16)
    if is_sam2(adapted.model):  # SAM 2: its own graphs (sam2_image); the SAM-only options are refused by name
        from .sam2_image import export_sam2

        asked = [name for name, on in (("--format tensorrt", "tensorrt" in formats), ("--precision fp16", "fp16" in precisions),
                                       ("--preprocess-in-graph", preprocess_in_graph), ("--meta-decoder", meta_decoder),
                                       ("--attention " + attention, attention != "plain"),
                                       ("--exporter dynamo", exporter != "torchscript")) if on]
        if asked:
            raise PeftExportError(f"{asked[0]}: not available for SAM 2 exports (ONNX fp32 / int8, TorchScript exporter)")
        from .sam2_video import video_graphs_hook

        return export_sam2(adapted, out_dir, precisions, opset, overwrite, progress, calibration_data, int8_recipe,
                           strict, extra_graphs=video_graphs_hook() if video else None)
    if video:
        raise PeftExportError("--video: only SAM 2 models have memory graphs (--model sam2.1_hiera_t ...)")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    if calibration_data is not None and "int8" not in precisions:
        raise PeftExportError("--calibration-data: only int8 is calibrated; add int8 to --precision")
    target = None
    if "tensorrt" in formats:
        from .tensorrt import check_tensorrt

        target = check_tensorrt([p for p in precisions if p != "bf16"])  # before any work: no package / GPU -> nothing done
    log: Callable[[str], None] = print if progress else (lambda _msg: None)

    reference_model = adapted.model.eval()
    size = reference_model.image_encoder.img_size
    model_type = adapted.base.model_type
    t0 = time.perf_counter()
    model, merged, in_graph, merge_report = merge_for_export(adapted, log)
    if merged and next(reference_model.parameters()).device.type != "cpu":
        # A QLoRA model lives on the GPU its 4-bit layers run on; exports and their checks run on the
        # CPU, against the merged copy (verified against the 4-bit model in merge_for_export).
        reference_model = model
    calibration, calibration_record = None, None
    if calibration_data is not None:
        from .calibration import calibration_inputs

        calibration, calibration_record = calibration_inputs(calibration_data, size, dict(adapted.intensity))
        log(f"calibration: {calibration_record['planes']} image plane(s) from {calibration_data}")
    reference = build_reference(reference_model)

    graphs: dict[str, dict] = {}
    rows: list[tuple[str, str, dict]] = []
    used_exporter = exporter

    refused: list[dict] = []

    def check(graph: str, precision: str, filename: str, tmp: Path, export_s: float, extra: dict | None = None,
              verifier: Callable | None = None) -> bool:
        # The same gate on every installed CPU backend: a graph one of them runs wrongly is refused.
        # True: written; False: an optional graph refused (files removed, recorded); raises otherwise.
        by_backend = {}
        for backend in verify_backends(precision):
            t = time.perf_counter()
            if verifier is not None:
                parity = verifier(tmp / filename, reference, precision, backend)
            else:
                parity = verify_export(tmp / filename, graph, reference_model, reference, precision, backend)
            parity["export_seconds"] = round(export_s, 2)
            parity["verify_seconds"] = round(time.perf_counter() - t, 2)
            by_backend[backend] = parity
            rows.append((graph if backend == "onnxruntime" else f"{graph} ({backend})", precision, parity))
            log(f"  {graph:<18} {precision:<5} exported {export_s:6.1f} s, verified {parity['verify_seconds']:5.1f} s "
                f"on {backend:<11}, {onnx_bytes(tmp / filename) / 1e6:8.1f} MB  {'ok' if parity['passed'] else 'FAILED'}")
            gate = parity.get("prompt_agreement")
            if gate:
                log(f"    masks vs fp32 over {gate['prompts']} prompts: IoU mean {gate['mask_iou_mean']:.4f}, "
                    f"min {gate['mask_iou_min']:.4f} (gate {parity['thresholds']['prompt_mask_iou_mean']} / "
                    f"{parity['thresholds']['prompt_mask_iou_min']})")
            if not parity["passed"]:
                if strict or is_required(graph, precision):
                    log(format_parity_table(rows))
                    raise PeftExportError(
                        f"{out_dir}: {graph} {precision} failed verification on {backend} "
                        f"({'; '.join(parity['failures'])}); nothing written"
                        + ("" if is_required(graph, precision) else " (--strict)")
                    )
                refuse(tmp, graph, precision, None if precision == "bf16" else filename, backend, parity, extra)
                return False  # (a bf16 entry names the fp32 file: that stays)
        verified = list(by_backend)
        for backend in bf16_mode_backends(precision):  # optional: a failure only keeps OpenVINO in f32 mode
            t = time.perf_counter()
            parity = (verifier(tmp / filename, reference, precision, backend) if verifier is not None else
                      verify_export(tmp / filename, graph, reference_model, reference, precision, backend))
            parity["verify_seconds"] = round(time.perf_counter() - t, 2)
            by_backend[backend] = parity
            rows.append((f"{graph} ({backend})", precision, parity))
            verified += [backend] if parity["passed"] else []
            why = "" if parity["passed"] else f": runs in f32 mode there ({'; '.join(parity['failures'])})"
            log(f"  {graph:<18} {precision:<5} {'verified' if parity['passed'] else 'not verified'} in OpenVINO's bf16 "
                f"mode ({parity['verify_seconds']:.1f} s){why}")
        extra = dict(extra or {}, verified_on=verified)
        if len(by_backend) > 1:
            extra["parity_by_backend"] = {b: p for b, p in by_backend.items() if b != "onnxruntime"}
        graphs.setdefault(graph, {})[precision] = graph_entry(tmp, graph, filename, size, next(iter(by_backend.values())),
                                                              extra)
        return True

    def refuse(tmp: Path, graph: str, precision: str, filename: str | None, backend: str, parity: dict | None,
               extra: dict | None, reason: str | None = None) -> None:
        if filename:
            for p in (tmp / filename, tmp / (filename + ".data")):
                p.unlink(missing_ok=True)
        graphs.get(graph, {}).pop(precision, None)
        if graph in graphs and not graphs[graph]:
            del graphs[graph]
        entry = refusal_record(graph, precision, backend, parity, extra, reason)
        refused.append(entry)
        log(f"refused: {refusal_line(entry)}")

    log(f"exporting {model_type} (image size {size}) to {out_dir}: {', '.join(formats)}; {', '.join(precisions)}")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:  # modes follow the umask, as for any new folder
        # fp32 encoder first: int8 is quantised from it (and removed if fp32 was not asked for).
        t = time.perf_counter()
        used_exporter = og.export_encoder_onnx(model, tmp / "encoder.onnx", opset, "fp32", exporter, attention)
        fp32_s = time.perf_counter() - t
        if "fp32" in precisions:
            check("encoder", "fp32", "encoder.onnx", tmp, fp32_s, {"exporter": used_exporter, "attention": attention})
        if "fp16" in precisions:
            t = time.perf_counter()
            how = og.export_encoder_onnx(model, tmp / encoder_filename("fp16"), opset, "fp16", exporter)
            check("encoder", "fp16", encoder_filename("fp16"), tmp, time.perf_counter() - t,
                  {"exporter": how, "opset": og.encoder_opset("fp16", opset),
                   "note": "fp16 weights/compute, LayerNorm fp32, graph I/O float32"})
        if "int8" in precisions:
            t = time.perf_counter()
            # tuned on some images and prompts, gated on others (with --calibration-data: a held-out part of them)
            data = split_int8_data(size, calibration, calibration_record)
            applied, search = quantise_tuned(reference_model, tmp / "encoder.onnx", tmp / encoder_filename("int8"), data,
                                             model_type, int8_recipe, log)
            how = "static QDQ calibrated on the user's images" if applied.static else "dynamic"
            held_out = Agreement(reference_model, data.held_out, GATE_PROMPT_SEED) if data.held_out else None
            check("encoder", "int8", encoder_filename("int8"), tmp, time.perf_counter() - t,
                  {"note": f"onnxruntime quantisation ({how}), QInt8 weights, from the fp32 graph",
                   "attention": attention, "int8_recipe": applied.to_dict(), "int8_search": search,
                   "int8_data": data.record, "calibration": calibration_record},
                  verifier=int8_verifier(reference_model, held_out, ENCODER_MEASURES, verify_export))
        if "bf16" in precisions and "fp32" in graphs["encoder"]:
            check("encoder", "bf16", "encoder.onnx", tmp, 0.0, {"note": BF16_NOTE})
        if "fp32" not in precisions:
            for p in (tmp / "encoder.onnx", tmp / "encoder.onnx.data"):
                p.unlink(missing_ok=True)
        if not graphs.get("encoder"):
            raise PeftExportError(f"{out_dir}: every encoder precision was refused "
                                  f"({'; '.join(refusal_line(r) for r in refused)}); nothing written")
        if preprocess_in_graph:
            t = time.perf_counter()
            og.export_preprocess_encoder_onnx(model, tmp / "encoder_preprocess.onnx", opset)
            check("encoder_preprocess", "fp32", "encoder_preprocess.onnx", tmp, time.perf_counter() - t,
                  {"note": "input: the resized image HWC float32 0..255, h, w <= image_size (long side == "
                           "image_size); normalisation and bottom/right zero padding in the graph"})
        for flavour in decoder_flavours(meta_decoder, target is not None):
            t = time.perf_counter()
            og.export_decoder_onnx(model, tmp / f"{flavour}.onnx", flavour, opset)
            check(flavour, "fp32", f"{flavour}.onnx", tmp, time.perf_counter() - t)
        split_s = {}
        for name in SPLIT_GRAPHS:
            t = time.perf_counter()
            export_split_graph(model, tmp / f"{name}.onnx", name, opset)
            split_s[name] = time.perf_counter() - t
        split_ok = True
        for name in SPLIT_GRAPHS:  # each check runs the chain of all three
            split_ok = split_ok and check(name, "fp32", f"{name}.onnx", tmp, split_s[name], {"note": SPLIT_NOTE})
        if not split_ok:  # the three run as one chain (and the click decoder after split_image): none is of use alone
            for name in SPLIT_GRAPHS:
                if "fp32" in graphs.get(name, {}) or (tmp / f"{name}.onnx").exists():
                    refuse(tmp, name, "fp32", f"{name}.onnx", "onnxruntime", None, None,
                           "left out with the split decoder chain it belongs to")
            refuse(tmp, CLICK_GRAPH, "fp32", None, "onnxruntime", None, None,
                   "not exported: it runs after split_image, which was refused")
            if not set(og.DECODER_FLAVOURS) & set(graphs):  # no decoder left for prompts
                raise PeftExportError(f"{out_dir}: the decoder family failed verification "
                                      f"({'; '.join(refusal_line(r) for r in refused)}) and no Meta decoder was "
                                      "asked for (--meta-decoder); nothing written")
        else:
            t = time.perf_counter()
            export_click_graph(model, tmp / f"{CLICK_GRAPH}.onnx", opset)
            check(CLICK_GRAPH, "fp32", f"{CLICK_GRAPH}.onnx", tmp, time.perf_counter() - t, {"note": CLICK_NOTE})
        ais = None
        if adapted.instance_decoder is not None:  # micro-sam's AIS decoder: fp32 and each asked precision
            from .ais import export_ais

            ais = export_ais(adapted.instance_decoder, tmp, size, precisions, opset, check)

        manifest = build_manifest(
            model_type, size, dict(adapted.intensity), adapted.config.to_dict() if adapted.config else None,
            merged, in_graph, graphs, opset, used_exporter, adapted.base.to_dict(), merge_report,
        )
        manifest["source"] = export_source(adapted)
        manifest["training_scale"] = training_scale_record(adapted.meta)  # the tiled runtime's default tile
        manifest["instance_segmentation"] = ais if ais is None or graphs.get("ais_decoder") else None
        if target is not None:
            manifest["tensorrt"] = _tensorrt(target, tmp, graphs, [p for p in precisions if p in graphs["encoder"] and p != "bf16"],
                                             size, reference, log, strict)
            manifest["versions"]["tensorrt"] = target.version
            for entry in manifest["tensorrt"].pop("refused"):  # an engine that failed: the ONNX graphs stay
                refused.append(entry)
                log(f"refused: {refusal_line(entry)}")
        manifest["refused"] = refused
        write_manifest(tmp, manifest)
    log(format_parity_table(rows))
    if refused:
        log(f"export written in {time.perf_counter() - t0:.1f} s with {len(refused)} graph(s) refused: {out_dir}")
    else:
        log(f"export passed all checks in {time.perf_counter() - t0:.1f} s: {out_dir}")
    return manifest


def decoder_flavours(meta_decoder: bool, tensorrt: bool) -> tuple[str, ...]:
    """Meta's decoder graphs an export writes besides the family (which serves every prompt path of
    the runtime and the browser): with ``meta_decoder`` (other tools) ``decoder`` (Meta's interface)
    and ``decoder_lowres`` (its batched low-res form); for TensorRT ``decoder_lowres`` (its decoder
    engine is built from it). Neither by default."""
    return tuple(f for f in og.DECODER_FLAVOURS if meta_decoder or (tensorrt and f == "decoder_lowres"))


def _tensorrt(target, tmp: Path, graphs: dict, precisions: Sequence[str], size: int, reference, log,
              strict: bool) -> dict:
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
    return build_engines(target, tmp, onnx_files, size, feeds, log, strict)
