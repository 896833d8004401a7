"""``merge_and_export`` for SAM 2: exact merge, the image graphs (``sam2_image_graphs``) at each precision,
their parity checks on every CPU backend, the constants the runtime adds, and ``manifest.json``.

Same contract as SAM 1's pipeline: everything is written into a temporary folder that replaces
``out_dir`` only when the required graphs (fp32 encoder and decoder) passed; an int8 encoder that fails
the gate (prompt-by-prompt mask agreement with fp32, ``gates.THRESHOLDS``) is left out and recorded in
``refused``. A model with micro-sam's instance decoder also gets SAM's ``ais_decoder`` graph (``export.ais``:
fp32, no int8, verified against torch on the probe image's still-image embedding; a refused one is left out).
The int8 recipe is tuned on other images and prompts than the gate's, as SAM's (``int8_data``:
probe images of seeds 1 and 2 through SAM 2's normalisation, or the user's planes less a held-out part). ``extra_graphs`` lets the video side add its graphs to the same export.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import PeftExportError
from ..fsutil import atomic_dir
from ..models.sam2 import SAM2_PIXEL_MEAN, SAM2_PIXEL_STD
from ..peft.adapters import AdaptedModel
from .prepare import check_out_dir, encoder_filename, export_source, merge_for_export
from .manifest import build_manifest, file_entry, graph_entry, training_scale_record, write_manifest
from .int8_data import GATE_PROMPT_SEED, Agreement, quantise_tuned, split_int8_data, with_held_out
from .quantize import Int8Recipe, onnx_bytes
from .refusals import is_required, refusal_line, refusal_record
from .sam2_image_graphs import (REDUCED_MEASURES, build_sam2_reference, export_sam2_decoder, export_sam2_encoder,
                                sam2_graph_io, sam2_probe_image, verify_sam2_decoder, verify_sam2_encoder)

CONSTANTS = "sam2_constants.npz"
FAMILY = "sam2"


def sam2_preprocessing(intensity: dict) -> dict:
    """SAM2Transforms: float /255, resize to S x S (torch bilinear, antialias), normalise."""
    return {"resize": "square", "interpolation": "bilinear_antialias", "input_scale": 255.0,
            "pixel_mean": list(SAM2_PIXEL_MEAN), "pixel_std": list(SAM2_PIXEL_STD), "intensity": intensity}


def decoder_selection(model) -> dict | None:
    """sam2's dynamic multimask fallback for single-mask prediction, as built (None: off)."""
    dec = model.sam_mask_decoder
    if not dec.dynamic_multimask_via_stability:
        return None
    return {"stability_delta": float(dec.dynamic_multimask_stability_delta),
            "stability_thresh": float(dec.dynamic_multimask_stability_thresh)}


def write_constants(model, path: Path) -> None:
    """``no_mem_embed`` (1, 256) and the lowest level's sine position encoding (1, 256, g, g)."""
    import torch

    g = int(model.image_size) // 16
    with torch.no_grad():
        pos = model.image_encoder.neck.position_encoding(torch.zeros(1, 256, g, g))
        np.savez(path, no_mem_embed=model.no_mem_embed.detach().float().reshape(1, -1).numpy(),
                 vision_pos_enc=pos.float().numpy())


def export_sam2(
    adapted: AdaptedModel,
    out_dir: str | os.PathLike,
    precisions: Sequence[str] = ("fp32",),
    opset: int = 17,
    overwrite: bool = False,
    progress: bool = True,
    calibration_data: str | os.PathLike | None = None,
    int8_recipe: Int8Recipe | None = None,
    strict: bool = False,
    extra_graphs: Callable | None = None,
) -> dict:
    """Merge (verified), export the encoder (each precision) and the decoder, verify each, write the
    manifest. ``extra_graphs(model, tmp_dir, opset, log) -> {"graphs": {...}, ...}``: more graphs (the video
    side's) whose entries join ``manifest["graphs"]`` and whose other keys join the manifest."""
    from .gates import BF16_NOTE, bf16_mode_backends, verify_backends

    out_dir = Path(out_dir)
    precisions = tuple(dict.fromkeys(precisions))
    bad = [p for p in precisions if p not in ("fp32", "int8", "bf16")]
    if bad or not precisions:
        raise PeftExportError(f"--precision {bad[0] if bad else ''}: SAM 2 exports fp32, int8 and bf16")
    if calibration_data is not None and "int8" not in precisions:
        raise PeftExportError("--calibration-data: only int8 is calibrated; add int8 to --precision")
    check_out_dir(out_dir, overwrite)
    log: Callable[[str], None] = print if progress else (lambda _m: None)
    t0 = time.perf_counter()
    reference_model = adapted.model.eval()
    size = int(reference_model.image_size)
    model, merged, in_graph, merge_report = merge_for_export(adapted, log)
    if merged and next(reference_model.parameters()).device.type != "cpu":
        reference_model = model  # QLoRA: checked against the merged copy (verified in merge_for_export)
    reference = build_sam2_reference(reference_model)
    calibration, calibration_record = None, None
    if calibration_data is not None:
        from ..runtime.sam2_preprocess import prepare_sam2_image
        from .calibration import calibration_inputs

        calibration, calibration_record = calibration_inputs(
            calibration_data, size, dict(adapted.intensity),
            prepare=lambda plane, rule, s: prepare_sam2_image(plane, rule, s)[0])
        log(f"calibration: {calibration_record['planes']} image plane(s) from {calibration_data}")
    graphs: dict[str, dict] = {}
    refused: list[dict] = []

    def check(graph: str, precision: str, filename: str, tmp: Path, verify: Callable, extra: dict) -> bool:
        by_backend = {}
        for backend in verify_backends(precision):
            t = time.perf_counter()
            parity = verify(tmp / filename, backend)
            parity["verify_seconds"] = round(time.perf_counter() - t, 2)
            by_backend[backend] = parity
            log(f"  {graph:<8} {precision:<5} verified on {backend:<11} {onnx_bytes(tmp / filename) / 1e6:8.1f} MB  "
                f"{'ok' if parity['passed'] else 'FAILED: ' + '; '.join(parity['failures'])}")
            if not parity["passed"]:
                if strict or is_required(graph, precision):  # the fp32 encoder and decoder; not the AIS decoder
                    raise PeftExportError(f"{out_dir}: {graph} {precision} failed verification on {backend} "
                                          f"({'; '.join(parity['failures'])}); nothing written")
                for p in (tmp / filename, tmp / (filename + ".data")) if precision != "bf16" else ():
                    p.unlink(missing_ok=True)  # (a bf16 entry names the fp32 file: that stays)
                entry = refusal_record(graph, precision, backend, parity, extra)
                refused.append(entry)
                log(f"refused: {refusal_line(entry)}")
                return False
        verified = list(by_backend)
        for backend in bf16_mode_backends(precision):  # optional: a failure only keeps OpenVINO in f32 mode
            t = time.perf_counter()
            parity = verify(tmp / filename, backend)
            parity["verify_seconds"] = round(time.perf_counter() - t, 2)
            by_backend[backend] = parity
            verified += [backend] if parity["passed"] else []
            why = "" if parity["passed"] else f": runs in f32 mode there ({'; '.join(parity['failures'])})"
            log(f"  {graph:<8} {precision:<5} {'verified' if parity['passed'] else 'not verified'} in OpenVINO's bf16 "
                f"mode ({parity['verify_seconds']:.1f} s){why}")
        extra = dict(extra, verified_on=verified)
        if len(by_backend) > 1:
            extra["parity_by_backend"] = {b: p for b, p in by_backend.items() if b != "onnxruntime"}
        graphs.setdefault(graph, {})[precision] = graph_entry(tmp, graph, filename, size, next(iter(by_backend.values())),
                                                              extra, io=sam2_graph_io(graph, size))
        return True

    def encoder_check(precision: str, held_out: Agreement | None = None):
        def verify(path, backend):
            parity = verify_sam2_encoder(path, reference_model, reference, precision, backend)
            return with_held_out(parity, held_out, path, backend, precision, REDUCED_MEASURES)

        return verify

    log(f"exporting {adapted.base.model_type} (SAM 2, image size {size}) to {out_dir}: onnx; {', '.join(precisions)}")
    extra_keys: dict = {}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        t = time.perf_counter()
        exporter = export_sam2_encoder(model, tmp / "encoder.onnx", opset)
        log(f"  encoder exported in {time.perf_counter() - t:.1f} s")
        check("encoder", "fp32", "encoder.onnx", tmp, encoder_check("fp32"), {"exporter": exporter})
        if "int8" in precisions:
            t = time.perf_counter()
            # tuned on some images and prompts, gated on others (with --calibration-data: a held-out part of them)
            data = split_int8_data(size, calibration, calibration_record, probe=sam2_probe_image)
            applied, search = quantise_tuned(reference_model, tmp / "encoder.onnx", tmp / encoder_filename("int8"),
                                             data, FAMILY, int8_recipe, log)
            how = "static QDQ calibrated on the user's images" if applied.static else "dynamic"
            log(f"  encoder int8 quantised in {time.perf_counter() - t:.1f} s ({how})")
            held_out = Agreement(reference_model, data.held_out, GATE_PROMPT_SEED) if data.held_out else None
            check("encoder", "int8", encoder_filename("int8"), tmp, encoder_check("int8", held_out),
                  {"note": f"onnxruntime quantisation ({how}), from the fp32 graph", "int8_recipe": applied.to_dict(),
                   "int8_search": search, "int8_data": data.record, "calibration": calibration_record})
        if "bf16" in precisions and "fp32" in graphs.get("encoder", {}):
            check("encoder", "bf16", "encoder.onnx", tmp, encoder_check("bf16"), {"note": BF16_NOTE})
        if "fp32" not in precisions:
            for p in (tmp / "encoder.onnx", tmp / "encoder.onnx.data"):
                p.unlink(missing_ok=True)
            graphs["encoder"].pop("fp32", None)
        if not graphs.get("encoder"):
            raise PeftExportError(f"{out_dir}: every encoder precision was refused "
                                  f"({'; '.join(refusal_line(r) for r in refused)}); nothing written")
        t = time.perf_counter()
        export_sam2_decoder(model, tmp / "decoder.onnx", opset)
        log(f"  decoder exported in {time.perf_counter() - t:.1f} s")
        check("decoder", "fp32", "decoder.onnx", tmp,
              lambda path, backend: verify_sam2_decoder(path, reference, backend),
              {"note": "prompt encoder + mask decoder; all four mask tokens (the runtime selects)"})
        ais = None
        if adapted.instance_decoder is not None:  # SAM's AIS graph on the still-image embedding (export.ais)
            from .ais import export_ais

            def ais_check(graph, precision, filename, tmp_dir, seconds, extra, verifier):
                return check(graph, precision, filename, tmp_dir,
                             lambda path, backend: verifier(path, reference, precision, backend),
                             dict(extra, export_seconds=round(seconds, 2)))

            ais = export_ais(adapted.instance_decoder, tmp, size, precisions, opset, ais_check)
            if ais is not None:
                ais["input"] = "the still-image embedding: the encoder's image_embeddings + no_mem_embed"
        write_constants(model, tmp / CONSTANTS)
        if extra_graphs is not None:
            extra_keys = dict(extra_graphs(model, tmp, opset, log) or {})
            graphs.update(extra_keys.pop("graphs", {}))
        manifest = build_manifest(adapted.base.model_type, size, dict(adapted.intensity),
                                  adapted.config.to_dict() if adapted.config else None, merged, in_graph, graphs, opset,
                                  exporter, adapted.base.to_dict(), merge_report)
        manifest.update(family=FAMILY, preprocessing=sam2_preprocessing(dict(adapted.intensity)),
                        constants=file_entry(tmp, CONSTANTS), decoder_selection=decoder_selection(model),
                        source=export_source(adapted), training_scale=training_scale_record(adapted.meta),
                        instance_segmentation=ais if graphs.get("ais_decoder") else None, refused=refused,
                        **extra_keys)
        write_manifest(tmp, manifest)
    log(f"export written in {time.perf_counter() - t0:.1f} s" + (f" with {len(refused)} graph(s) refused" if refused
                                                                  else ", all checks passed") + f": {out_dir}")
    return manifest
