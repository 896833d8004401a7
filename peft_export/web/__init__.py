"""Stage 10, web: a static click-to-segment site that runs the export's decoder in the browser.

``build_site`` computes each image's embedding with the runtime and writes index.html, the
page's JS (``assets/``: no framework, no bundler), the decoder graph, the images, their
embeddings and onnxruntime-web's wasm files (``ortweb``: copied from npm, never a CDN).
``serve`` is a static server that adds the cross-origin-isolation headers for multi-threaded wasm.
With the encoder in the browser (``browser_encoder``; default for a small vit_t encoder) the site also
carries the export's encoder graph and people open their own images in the page (``assets/encoder.js``).

May import: runtime, predict, evaluation (its metrics), export (only to quantise an int8 decoder, lazily), errors, fsutil.
"""

from .browser_encoder import browser_encoder_entry
from .decoder_check import INT8_MIN_IOU, compare_decoders, decode_shown, shown_mask_index
from .ortweb import ORT_FILES, ORT_WEB_VERSION, find_ort_files
from .site import SITE_FORMAT, build_site, decoder_source

__all__ = [
    "INT8_MIN_IOU",
    "ORT_FILES",
    "ORT_WEB_VERSION",
    "SITE_FORMAT",
    "browser_encoder_entry",
    "build_site",
    "compare_decoders",
    "decode_shown",
    "decoder_source",
    "find_ort_files",
    "shown_mask_index",
]
