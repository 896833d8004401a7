"""``peftexport web``: a static click-to-segment site (decoder in the browser, onnxruntime-web)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .app import command, echo


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@command("web", short="A static click-to-segment web page for an export.",
         help="Build a static site that segments IMAGES in the browser: embeddings computed here, the decoder "
              "runs on onnxruntime-web (wasm). Serve it with any static server. With the encoder in the browser "
              "(--encoder-in-browser; default for vit_t) people also open their own images in the page.")
def web(
    export_dir: Path = typer.Argument(..., help="Export directory (manifest.json + ONNX graphs)."),
    images: Optional[List[Path]] = typer.Argument(None, help="Image files: TIFF, PNG, JPEG or NPY (2D gray or RGB); "
                                                  "may be left out when the encoder runs in the browser."),
    out: Path = typer.Option(..., "--out", "-o", help="Site directory to write."),
    precision: str = typer.Option("fp32", "--precision", help="Decoder in the site: fp32, or int8 (quantised here: the "
                                  "output upscaling's products of a click decoder, every MatMul of an older "
                                  "decoder; refused unless its masks match fp32 at mean IoU >= 0.99)."),
    encoder_precision: str = typer.Option("fp32", "--encoder-precision", help="Export's encoder that computes the "
                                          "embeddings: fp32, fp16 or int8."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="Adapter of a shared-trunk export."),
    encoder_in_browser: Optional[bool] = typer.Option(
        None, "--encoder-in-browser/--no-encoder-in-browser",
        help="Put the export's encoder (--encoder-precision: fp32 or int8) into the site, so people open their own "
             "images (file picker, drag and drop) and the encoder runs in the page. Default: on for a vit_t export "
             "whose encoder graph is at most 64 MB (vit_t fp32: ~24 MB), off otherwise (vit_b: ~360 MB)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing site directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Writes index.html, app.js, sam.js, site.json, the decoder, images/, embeddings/ and ort/."""
    from peft_export.web import build_site

    s = build_site(export_dir, images or [], out, precision=precision, encoder_precision=encoder_precision,
                   adapter=adapter, overwrite=overwrite, progress=not quiet, encoder_in_browser=encoder_in_browser)
    dec = s["decoder"]
    echo(f"wrote {out}: {len(s['images'])} image(s), {dec['graph']} {dec['precision']} {_mb(s['bytes_decoder'])}, "
         f"embeddings {_mb(s['bytes_embeddings'])}, images {_mb(s['bytes_images'])}; "
         f"{_mb(s['bytes_site_without_ort'])} + onnxruntime-web {_mb(s['bytes_onnxruntime_web'])}")
    if s.get("encoder"):
        echo(f"encoder in the browser: {s['encoder']['path']} {s['encoder']['precision']} {_mb(s['bytes_encoder'])} "
             "(open an image in the page: file picker or drag and drop)")
    check = dec.get("check")
    if check:
        echo(f"int8 decoder vs fp32: mean mask IoU {check['mean_iou']:.4f}, min {check['min_iou']:.4f} "
             f"({check['prompts']} prompts)")
    echo(f"serve it:  python -m http.server -d {out}          (decoder on one wasm thread)")
    echo(f"      or:  python -m peft_export.web.serve {out}   (COOP/COEP headers: all cores)")
