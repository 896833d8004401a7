"""Stage 6, export: verified ONNX (and TensorRT) graphs of SAM with its adapter merged, and the manifest.

May import: merge, peft, data, models, runtime, errors, fsutil (and torch, onnx, onnxruntime; tensorrt lazily).
"""

from ..runtime.manifest import read_manifest  # the checked reader the runtime uses
from .manifest import MANIFEST, graph_io
from .onnx_graphs import DECODER_FLAVOURS, export_decoder_onnx, export_encoder_onnx, export_preprocess_encoder_onnx
from .pipeline import FORMATS, merge_and_export
from .quantize import DEFAULT_INT8, PRECISIONS, Int8Recipe, quantize_int8
from .shared_export import merge_and_export_adapters
from .sources import load_named_sources
from .verify import THRESHOLDS, build_reference, format_parity_table, ort_session, verify_export

__all__ = [
    "DECODER_FLAVOURS",
    "DEFAULT_INT8",
    "Int8Recipe",
    "FORMATS",
    "MANIFEST",
    "PRECISIONS",
    "THRESHOLDS",
    "build_reference",
    "export_decoder_onnx",
    "export_encoder_onnx",
    "export_preprocess_encoder_onnx",
    "format_parity_table",
    "graph_io",
    "load_named_sources",
    "merge_and_export",
    "merge_and_export_adapters",
    "ort_session",
    "quantize_int8",
    "read_manifest",
    "verify_export",
]
