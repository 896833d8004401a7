"""``ais_decoder.onnx``: micro-sam's instance decoder as an ONNX graph, and its parity check.

The graph takes the image embedding (1, 256, g, g) the encoder graph makes and returns the
three AIS maps (1, 3, S, S) at the model's input resolution (foreground, centre distance,
boundary distance; sigmoid outputs in [0, 1]). Cropping to the resized image and resizing
to the original image are left to the runtime (as for the low-res mask decoder), so the
graph has static shapes.

Precisions: bf16 is the fp32 graph run in OpenVINO's bf16 mode (checked there, no file of its
own). fp32 (TorchScript exporter) and fp16 (fp16 weights and convolutions, InstanceNorm
and BatchNorm in fp32, fp32 input and output; traced by the dynamo exporter like the fp16
encoder, because the TorchScript exporter would run fp16 convolutions on the CPU). No int8
graph: onnxruntime's dynamic quantisation (ConvInteger, activations quantised per tensor at
run time) was both slower and wrong here: on a 256 x 256 model 3.3x slower than fp32 in
ONNX Runtime on the CPU, and with mean map error 0.04 and pixels flipped from 0 to 1 on a
decoder with large logits (``export_ais`` notes this in the manifest; an int8 session runs
the fp32 AIS decoder, which is what ``SamSession`` picks when a precision is missing).
Each is compared with the torch decoder on the probe image's embedding from the (unmerged)
torch model: fp32 must agree to 1e-3 in every map value (the maps are sigmoid outputs in
[0, 1]; float rounding through the conv stack grows with the logits' scale: 6e-6 for a
freshly initialised decoder, 3e-4 with its output layer scaled 25x), fp16 to 0.01 in
the mean (``verify.THRESHOLDS``); each records its max and mean error and the share of
pixels on the same side of the post-processing's 0.5 thresholds.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import PeftExportError
from ..merge import error_stats
from ..models.instance_decoder import InstanceDecoder
from . import onnx_graphs as og
from .gates import BF16_NOTE, graph_runner, judge, nonfinite
from .verify import Reference

GRAPH = "ais_decoder"
INPUT, OUTPUT = "image_embeddings", "instance_maps"


def ais_filename(precision: str) -> str:
    return f"{GRAPH}.onnx" if precision == "fp32" else f"{GRAPH}.{precision}.onnx"


class Fp16AisGraph(nn.Module):
    """fp16 weights and convolutions, norms in fp32, graph input and output fp32."""

    def __init__(self, decoder: InstanceDecoder) -> None:
        super().__init__()
        # InstanceNorm's statistics overflow in fp16 like LayerNorm's; BatchNorm folds cheaply either way.
        self.decoder = og.half_with_fp32_norms(decoder, (nn.InstanceNorm2d, nn.BatchNorm2d))

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return self.decoder(image_embeddings.half()).float()


def export_ais_decoder_onnx(decoder: InstanceDecoder, path: str | os.PathLike, image_size: int,
                            precision: str = "fp32", opset: int = 17) -> str:
    """Write the AIS decoder graph of ``precision`` (fp32 or fp16). Returns the exporter used."""
    g = image_size // 16
    example = (torch.randn(1, 256, g, g, generator=torch.Generator().manual_seed(0)),)
    path = Path(path)
    decoder = decoder.eval()
    if precision == "fp32":
        return og._export(decoder, example, path, opset, [INPUT], [OUTPUT], None, "torchscript", external=False)
    if precision == "fp16":
        return og._export(Fp16AisGraph(decoder), example, path, og.encoder_opset("fp16", opset), [INPUT], [OUTPUT],
                          None, "dynamo", external=False)
    raise PeftExportError(f"--precision: unknown precision {precision!r} for the AIS decoder")


@torch.no_grad()
def verify_ais_decoder(path: str | os.PathLike, decoder: InstanceDecoder, reference: Reference,
                       precision: str = "fp32", backend: str = "onnxruntime") -> dict:
    """The graph on ``backend``, fed the torch model's probe embedding, vs the torch decoder on the same embedding."""
    want = decoder.eval()(reference.embeddings.float())
    got = graph_runner(path, backend)({INPUT: reference.embeddings.numpy().astype(np.float32)})[OUTPUT]
    if tuple(got.shape) != tuple(want.shape):
        raise PeftExportError(f"{path}: instance maps have shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    got_t = torch.from_numpy(np.nan_to_num(got))
    diff = (want.double() - got_t.double()).abs()
    stats = {
        "maps": error_stats(want, got_t),
        "maps_max_abs": float(diff.max()),
        "maps_mean_abs": float(diff.mean()),
        # Share of pixels on the same side of 0.5 (the post-processing's default thresholds).
        "maps_threshold_agreement": float(((want > 0.5) == (got_t > 0.5)).double().mean()),
        "finite": not nonfinite(got),
    }
    return judge(stats, precision, ("maps_max_abs", "maps_mean_abs", "maps_threshold_agreement"))


def export_ais(decoder: InstanceDecoder, tmp: Path, image_size: int, precisions, opset: int, check) -> dict:
    """Export and check the AIS decoder in fp32 and each other precision asked for; returns the
    manifest's ``instance_segmentation`` entry. ``check(graph, precision, filename, tmp, seconds,
    extra, verifier)`` is the pipeline's gate (False: refused and recorded). None when the fp32
    decoder is refused."""
    import time

    from ..models.instance_decoder import MAP_NAMES
    from ..runtime.instances import AIS_DEFAULTS

    def verifier(path, reference, precision, backend):
        return verify_ais_decoder(path, decoder, reference, precision, backend)

    notes = {}
    for precision in ["fp32"] + [p for p in precisions if p != "fp32"]:
        if precision == "int8":
            notes["int8"] = ("not exported: dynamic int8 quantisation of the decoder's convolutions is slower than "
                             "fp32 in ONNX Runtime on the CPU and not accurate enough; int8 sessions use the fp32 "
                             "AIS decoder")
            continue
        if precision == "bf16":  # the fp32 graph in OpenVINO's bf16 mode: no file of its own, checked as it runs
            check(GRAPH, "bf16", ais_filename("fp32"), tmp, 0.0, {"note": BF16_NOTE}, verifier)
            continue
        t = time.perf_counter()
        how = export_ais_decoder_onnx(decoder, tmp / ais_filename(precision), image_size, precision, opset)
        if not check(GRAPH, precision, ais_filename(precision), tmp, time.perf_counter() - t, {"exporter": how},
                     verifier) and precision == "fp32":
            return None  # refused (recorded by check): the other precisions fall back to fp32, so none is written
    return {"graph": GRAPH, "maps": list(MAP_NAMES), "map_resolution": "model input (image_size x image_size)",
            "conv_transpose": decoder.conv_transpose, "postprocessing_defaults": dict(AIS_DEFAULTS),
            "precision_notes": notes,
            "source": "micro-sam instance decoder (torch-em UNETR, no skip connections, sigmoid)"}
