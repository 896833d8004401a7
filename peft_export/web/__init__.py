"""Stage 10, web: a static click-to-segment site that runs the export's decoder in the browser.

``build_site`` computes each image's embedding with the runtime and writes index.html, the
page's JS (``assets/``: no framework, no bundler), the decoder graph, the images, their
embeddings and onnxruntime-web's wasm files (``ortweb``: copied from npm, never a CDN).
``serve`` is a static server that adds the cross-origin-isolation headers for multi-threaded wasm.

May import: runtime, predict, evaluation (its metrics), export (only to quantise an int8 decoder, lazily), errors, fsutil.
"""

from .decoder_check import INT8_MIN_IOU, compare_decoders, decode_shown, shown_mask_index
from .ortweb import ORT_FILES, ORT_WEB_VERSION, find_ort_files
from .site import SITE_FORMAT, build_site, decoder_source

__all__ = [
    "INT8_MIN_IOU",
    "ORT_FILES",
    "ORT_WEB_VERSION",
    "SITE_FORMAT",
    "build_site",
    "compare_decoders",
    "decode_shown",
    "decoder_source",
    "find_ort_files",
    "shown_mask_index",
]
