"""Reduced precisions of an exported graph.

* fp16: exported from torch (``onnx_graphs.Fp16EncoderGraph``): fp16 weights and compute,
  LayerNorms kept in fp32 (their variance overflows in fp16), graph input/output fp32, so
  the runtime feeds and reads float32 whatever the precision. ONNX Runtime's CPU provider
  runs the ops it has no fp16 kernel for in fp32 (it inserts the casts itself).
* int8: ``onnxruntime.quantization.quantize_dynamic`` with signed weights (QInt8) in 7 bits
  (``reduce_range``). Full 8-bit signed weights saturate ONNX Runtime's u8s8 kernels on x86
  CPUs without VNNI (AVX2 only, e.g. the AMD EPYC hosts this project also runs on): there the
  tiny model's embedding cosine fell to 0.985 and mask IoU to 0.91, against 0.9996 / 0.99 with
  7-bit weights (merge-and-export's parity check on three seeded tiny adapters, 2026-11-27). An export is verified on one
  machine and deployed on others, so the graph must be right on both kinds.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "int8")
EXTERNAL_DATA_BYTES = 1_500_000_000  # above this the int8 graph also uses external data


def onnx_bytes(path: str | os.PathLike) -> int:
    """Size of a graph with its external data file."""
    path = Path(path)
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Dynamic int8 quantisation (MatMul/Gemm/Conv weights QInt8, activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    external = onnx_bytes(src) // 4 > EXTERNAL_DATA_BYTES
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs advice and shape-inference notes at WARNING
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(
                str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False, reduce_range=True,
                use_external_data_format=external,
            )
    finally:
        root.setLevel(level)
