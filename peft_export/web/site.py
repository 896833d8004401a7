"""``build_site``: a static click-to-segment site for an export and some images.

The site (every path relative, so any static server or folder works)::

    index.html  app.js  sam.js  style.css     the page (assets/ of this package, unchanged)
    site.json                                 model, decoder and images (read by app.js)
    split_image.onnx                          per image: the context of the click decoder (see below)
    click_decoder[.int8].onnx                 per click: the shown mask (web_graph's rewrite of the export's)
    decoder.onnx | decoder.int8.onnx          instead of both: exports without a click decoder (made
                                              before it) ship their decoder_lowres / decoder
    images/<name>.png                         each image as the model sees it (intensity rule applied)
    embeddings/<name>.f32                     its image embedding, float32 little-endian, 1x256xgxg
    encoder.onnx[.data] | encoder.int8.onnx   with the encoder in the browser (browser_encoder.py): the
                                              export's graph; people open their own images (encoder.js)
    ort/                                      onnxruntime-web's wasm files + NOTICE.txt (see ortweb.py)

Embeddings are computed here with the runtime (``SamSession.encode``), so the page only
decodes. With a click decoder it runs ``split_image`` once per image and opens a session of
``click_decoder`` with that context as its ``context.bin``; per click it runs the decoder on wasm
and upsamples the chosen low-res mask exactly as ``runtime.postprocess.postprocess_masks`` does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .. import __version__
from ..errors import PeftExportError
from ..fsutil import atomic_dir
from ..predict import read_image
from ..predict.overlay import display_image, save_png
from ..runtime import SamSession, read_manifest
from ..runtime.split_decoder import CLICK_GRAPH, SPLIT_CONTEXT
from .browser_encoder import browser_encoder_entry, write_browser_encoder
from .decoder_check import INT8_MIN_IOU, compare_decoders
from .ortweb import ORT_FILES, copy_ort_files, find_ort_files
from .web_graph import CONTEXT_FILE, web_int8_recipe, write_web_click_decoder

SITE_FORMAT = "peftexport-web-site"
SITE_FORMAT_VERSION = 1
ASSETS = Path(__file__).resolve().parent / "assets"
ASSET_FILES = ("index.html", "app.js", "sam.js", "encoder.js", "style.css")
DECODER_PRECISIONS = ("fp32", "int8")
DECODER_FLAVOURS = (CLICK_GRAPH, "decoder_lowres", "decoder")  # the page's preference, in order


def _graph_path(export_dir: Path, manifest: Dict[str, Any], key: Optional[str]) -> Optional[Path]:
    """The fp32 file of manifest graph ``key`` (None when the export has no such graph)."""
    entry = (manifest["graphs"].get(key or "") or {}).get("fp32")
    if not entry:
        return None
    path = export_dir / entry["path"]
    if not path.is_file():
        raise PeftExportError(f"{path}: {key} graph listed in manifest.json is missing")
    return path


def decoder_source(export_dir: Path, manifest: Dict[str, Any], adapter: Optional[str] = None) -> tuple[str, Path]:
    """(flavour, path) of the export's fp32 decoder the site uses: the click decoder where the export
    has it with its split_image, else the runtime's choice (for an export of several adapters, that
    adapter's own graphs)."""
    keys = {f: f for f in DECODER_FLAVOURS}
    if adapter is not None:
        entry = manifest["adapters"][adapter]
        keys = {f: entry.get(f) for f in DECODER_FLAVOURS}
    if context_source(export_dir, manifest, adapter) is None:
        keys[CLICK_GRAPH] = None
    for flavour in DECODER_FLAVOURS:
        path = _graph_path(export_dir, manifest, keys[flavour])
        if path is not None:
            return flavour, path
    raise PeftExportError(f"{export_dir}: manifest.json lists no fp32 decoder graph")


def context_source(export_dir: Path, manifest: Dict[str, Any], adapter: Optional[str] = None) -> Optional[Path]:
    """The split_image graph that makes the click decoder's per-image context (that adapter's own)."""
    key = manifest["adapters"][adapter].get("split_image") if adapter is not None else "split_image"
    return _graph_path(export_dir, manifest, key)


def _site_names(images: Sequence[Path]) -> List[str]:
    """A unique, URL-safe name per image (its stem; -2, -3 ... on repeats)."""
    names: List[str] = []
    for path in images:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem) or "image"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _check_assets() -> None:
    missing = [n for n in ASSET_FILES if not (ASSETS / n).is_file()]
    if missing:
        raise PeftExportError(f"{ASSETS}: page files missing from the installed package: {', '.join(missing)}")


def _open_session(export_dir: Path, encoder_precision: str, adapter: Optional[str]) -> tuple[SamSession, Optional[str]]:
    """The session computing the embeddings, and the adapter (of an export of several) they are for."""
    from ..runtime.adapters import pick_adapter

    names = list(read_manifest(export_dir).get("adapters") or {})
    if adapter is not None and not names:
        raise PeftExportError(
            f"--adapter: {export_dir} holds one model (manifest.json lists no adapters); "
            "--adapter picks one adapter of a shared-trunk export, leave it out here"
        )
    if not names:
        return SamSession(export_dir, precision=encoder_precision), None
    try:
        name = pick_adapter(adapter, names)
    except PeftExportError as e:
        raise PeftExportError(f"--adapter: {e}") from None
    return SamSession(export_dir, precision=encoder_precision, adapters=[name]), name


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_site(
    export_dir: str | Path,
    images: Sequence[str | Path],
    out: str | Path,
    precision: str = "fp32",
    encoder_precision: str = "fp32",
    adapter: Optional[str] = None,
    overwrite: bool = False,
    progress: bool = True,
    encoder_in_browser: Optional[bool] = None,
) -> Dict[str, Any]:
    """Write the site into ``out`` (atomically) and return a summary (paths, sizes, checks).

    ``precision`` is the decoder's in the site (int8: dynamic quantisation of the fp32 decoder,
    refused unless its masks agree with fp32 at mean IoU >= 0.99 on these images);
    ``encoder_precision`` picks the export's encoder that computes the embeddings (and, with
    ``encoder_in_browser``, the one the page runs on the images people open; None: on for a small
    vit_t encoder, see ``browser_encoder``). With the encoder in the browser ``images`` may be empty.
    """
    if precision not in DECODER_PRECISIONS:
        raise PeftExportError(f"--precision: the site's decoder is fp32 or int8, not {precision!r}")
    export_dir, out = Path(export_dir), Path(out)
    if not images and encoder_in_browser is False:
        raise PeftExportError("IMAGES: give at least one image file")
    _check_assets()
    find_ort_files()  # before any slow work: no npm files -> one line naming the fix
    session, adapter = _open_session(export_dir, encoder_precision, adapter)
    manifest = session.manifest
    encoder_entry = browser_encoder_entry(export_dir, manifest, encoder_precision, adapter, encoder_in_browser)
    if not images and encoder_entry is None:
        raise PeftExportError("IMAGES: give at least one image file (or --encoder-in-browser: people open their own)")
    if not images and precision == "int8":
        raise PeftExportError("--precision int8: the int8 decoder is checked on the site's IMAGES; give at least one")
    flavour, decoder_path = decoder_source(export_dir, manifest, adapter)
    paths = [Path(p) for p in images]
    arrays = []
    for path in paths:  # every image readable before anything is computed
        if not path.is_file():
            raise PeftExportError(f"{path}: no such image file")
        arrays.append(read_image(path))
    names = _site_names(paths)
    rule = manifest["preprocessing"].get("intensity")

    from tqdm import tqdm

    # One bar over everything the site takes: each image's embedding and picture, the decoder (its int8
    # check), the browser encoder's copy and onnxruntime-web's files; never an empty bar when the page
    # encodes its own images.
    bar = tqdm(total=2 * len(paths) + 2 + (encoder_entry is not None), unit="step", desc="site",
               disable=not progress)
    embeddings, records = [], []
    for name, path, image in zip(names, paths, arrays):
        bar.set_description(f"embedding {path.name}")
        emb = session.encode(image)
        if adapter is not None:  # trunk + this adapter's head
            emb = emb.embedding(adapter)
        embeddings.append(emb)
        h, w = emb.original_size
        records.append({
            "name": name, "source": path.name, "width": w, "height": h,
            "input_size": list(emb.input_size),
            "image": f"images/{name}.png", "embedding": f"embeddings/{name}.f32",
        })
        bar.update()

    g = session.image_size // 16
    base = manifest.get("base") or {}
    site: Dict[str, Any] = {
        "format": SITE_FORMAT,
        "format_version": SITE_FORMAT_VERSION,
        "peftexport_version": __version__,
        "model_type": manifest.get("model_type"),
        "random_weights": base.get("sha256") == "random-init",
        "model_note": model_note(manifest, adapter),
        "peft": ((manifest["adapters"][adapter] if adapter else manifest).get("peft") or {}).get("method"),
        "adapter": adapter,
        "image_size": session.image_size,
        "low_res_size": session.low_res_size,
        "embedding_shape": [1, 256, g, g],
        "encoder_precision": encoder_precision,
        "images": records,
        "encoder": None,
    }
    summary: Dict[str, Any] = {"out": str(out), "images": records}
    with bar, atomic_dir(out, overwrite=overwrite) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; a site is meant to be served
        for name in ASSET_FILES:
            shutil.copyfile(ASSETS / name, tmp / name)
        context = context_source(export_dir, manifest, adapter) if flavour == CLICK_GRAPH else None
        bar.set_description(f"decoder {precision}" + (" (quantised and checked)" if precision == "int8" else ""))
        site["decoder"] = _write_decoder(tmp, flavour, decoder_path, context, precision, embeddings,
                                         session.image_size, summary)
        bar.update()
        (tmp / "images").mkdir()
        (tmp / "embeddings").mkdir()
        for rec, image, emb in zip(records, arrays, embeddings):
            bar.set_description(f"writing {rec['image']}")
            save_png(display_image(image, rule), tmp / rec["image"])
            (tmp / rec["embedding"]).write_bytes(np.ascontiguousarray(emb.embedding, dtype="<f4").tobytes())
            bar.update()
        if encoder_entry is not None:
            bar.set_description("encoder for the browser")
            site["encoder"] = write_browser_encoder(tmp, export_dir, encoder_entry, manifest, encoder_precision)
            bar.update()
        bar.set_description("onnxruntime-web")
        copy_ort_files(tmp / "ort")
        bar.update()
        bar.set_description("site")
        (tmp / "site.json").write_text(json.dumps(site, indent=2))
        ort_bytes = sum((tmp / "ort" / n).stat().st_size for n in ORT_FILES)
        summary.update(
            decoder=site["decoder"],
            bytes_total=_folder_bytes(tmp),
            bytes_onnxruntime_web=ort_bytes,
            bytes_decoder=sum((tmp / site["decoder"][k]).stat().st_size for k in ("path", "context_graph")
                              if site["decoder"].get(k)),
            bytes_embeddings=_folder_bytes(tmp / "embeddings"),
            bytes_images=_folder_bytes(tmp / "images"),
            encoder=site["encoder"],
            bytes_encoder=site["encoder"]["bytes"] if site["encoder"] else 0,
        )
        summary["bytes_site_without_ort"] = summary["bytes_total"] - ort_bytes
    return summary


def model_note(manifest: Dict[str, Any], adapter: Optional[str] = None) -> Optional[str]:
    """What the page says about the weights when the base is random (None otherwise): whether and on
    how many images it was fine-tuned, and its validation Dice, as the adapter's adapter.json records
    them. Validation images chose the best training step, so their Dice is not a held-out figure and
    the page does not call it one (``peftexport evaluate`` on other images gives that)."""
    if (manifest.get("base") or {}).get("sha256") != "random-init":
        return None
    entry = (manifest.get("adapters") or {}).get(adapter, {}) if adapter else manifest
    source = entry.get("source") or {}
    if source.get("kind") != "adapter":
        return "The base model has random weights (no checkpoint): the page works, its masks mean nothing."
    try:
        meta = json.loads((Path(source["adapter"]) / "adapter.json").read_text()) \
            if Path(source["adapter"]).is_dir() else json.loads(Path(source["adapter"]).with_suffix(".json").read_text())
    except (OSError, ValueError, KeyError):
        meta = {}
    training, validation = meta.get("training") or {}, meta.get("validation") or {}
    n_train = training.get("train_images")
    seen = f" on {n_train} image{'s' * (n_train != 1)}" if n_train else ""
    metrics = validation.get("metrics") or {}
    scores = ""
    if metrics.get("box_dice") is not None:
        n_val = metrics.get("n_images") or len(validation.get("files") or [])
        on = f" on {n_val} image{'s' * (n_val != 1)}" if n_val else ""
        scores = (f"; validation box Dice {metrics['box_dice']:.2f}, point Dice {metrics['point_dice']:.2f}{on} "
                  "(the images that picked the best training step, not a held-out test)")
    elif not meta:
        scores = f" (its adapter.json was not found at {source['adapter']})"
    return (f"The base model has random weights (no checkpoint) and was fine-tuned{seen}{scores}: "
            "its masks show what this small run learned, not what a pretrained SAM would give.")


def _write_decoder(tmp: Path, flavour: str, source: Path, context_graph: Optional[Path], precision: str,
                   embeddings: list, image_size: int, summary: Dict[str, Any]) -> Dict[str, Any]:
    """The site's decoder graph(s) in ``tmp`` (a click decoder with its split_image, ``context_graph``);
    returns site.json's ``decoder`` record. int8: the export's fp32 graph quantised here and refused
    (PeftExportError) unless its masks agree."""
    click = flavour == CLICK_GRAPH
    stem = CLICK_GRAPH if click else "decoder"
    graph = source
    if precision == "int8":
        from ..export.quantize import DEFAULT_INT8, quantize_int8

        graph = tmp / f".{stem}.int8.source.onnx"
        quantize_int8(source, graph, web_int8_recipe(source) if click else DEFAULT_INT8)
        check = compare_decoders(source, graph, flavour, embeddings, image_size, context_graph)
        check["quantised"] = "output upscaling MatMuls" if click else "every MatMul"
        summary["int8_check"] = check
        if check["mean_iou"] < INT8_MIN_IOU:
            raise PeftExportError(
                f"--precision int8: the int8 decoder's masks agree with fp32 at mean IoU {check['mean_iou']:.4f} "
                f"(< {INT8_MIN_IOU}) on these images; use --precision fp32 (nothing written)"
            )
    path = f"{stem}.onnx" if precision == "fp32" else f"{stem}.int8.onnx"
    record: Dict[str, Any] = {"path": path, "graph": flavour, "precision": precision,
                              "check": summary.get("int8_check")}
    if click:
        record["context"] = write_web_click_decoder(graph, tmp / path, SPLIT_CONTEXT)
        record["context_file"] = CONTEXT_FILE
        record["context_graph"] = "split_image.onnx"
        shutil.copyfile(context_graph, tmp / "split_image.onnx")
    else:
        shutil.copyfile(graph, tmp / path)
    if graph != source:
        graph.unlink()
    return record
