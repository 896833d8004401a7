"""``manifest.json`` of an export directory: everything the runtime needs, and nothing else.

Schema: /tmp/contracts.md ("manifest.json of an export dir"). Dynamic dimensions are
strings ("num_points", "batch", "height", "width").
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from .. import __version__
from ..fsutil import sha256_file
from ..models import PIXEL_MEAN, PIXEL_STD
from .click_decoder import CLICK_GRAPH, click_graph_io
from .split_decoder import SPLIT_GRAPHS, split_graph_io

MANIFEST = "manifest.json"
FORMAT = "peftexport-export"
FORMAT_VERSION = 1


def _t(name: str, shape: list, dtype: str = "float32") -> dict:
    return {"name": name, "shape": shape, "dtype": dtype}


def graph_io(graph: str, image_size: int) -> tuple[list[dict], list[dict]]:
    """Input and output specs of a graph (names, shapes, dtypes), as the runtime feeds them."""
    s, g = image_size, image_size // 16
    emb = _t("image_embeddings", [1, 256, g, g])
    if graph == "encoder":
        return [_t("image", [1, 3, s, s])], [emb]
    if graph == "encoder_preprocess":
        return [_t("image", ["height", "width", 3])], [emb]
    if graph == "decoder":
        return (
            [emb, _t("point_coords", [1, "num_points", 2]), _t("point_labels", [1, "num_points"]),
             _t("mask_input", [1, 1, 4 * g, 4 * g]), _t("has_mask_input", [1]), _t("orig_im_size", [2])],
            [_t("masks", [1, 4, "height", "width"]), _t("iou_predictions", [1, 4]),
             _t("low_res_masks", [1, 4, 4 * g, 4 * g])],
        )
    if graph == "decoder_lowres":
        return (
            [emb, _t("point_coords", ["batch", "num_points", 2]), _t("point_labels", ["batch", "num_points"]),
             _t("mask_input", ["batch", 1, 4 * g, 4 * g]), _t("has_mask_input", ["batch"])],
            [_t("low_res_masks", ["batch", 4, 4 * g, 4 * g]), _t("iou_predictions", ["batch", 4])],
        )
    if graph in SPLIT_GRAPHS:
        return split_graph_io(graph, image_size)
    if graph == CLICK_GRAPH:
        return click_graph_io(image_size)
    if graph == "ais_decoder":
        return [emb], [_t("instance_maps", [1, 3, s, s])]
    raise KeyError(graph)


def file_entry(export_dir: Path, name: str) -> dict:
    path = export_dir / name
    return {"path": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def graph_entry(export_dir: Path, graph: str, filename: str, image_size: int, parity: dict, extra: dict | None = None,
                io: tuple[list[dict], list[dict]] | None = None) -> dict:
    """One graph at one precision: its file (+ external data), I/O (``graph_io``'s unless ``io``) and parity."""
    files = [file_entry(export_dir, filename)]
    if (export_dir / (filename + ".data")).exists():
        files.append(file_entry(export_dir, filename + ".data"))
    inputs, outputs = io or graph_io(graph, image_size)
    entry = {
        "path": filename,
        "sha256": files[0]["sha256"],
        "external_data": files[1]["path"] if len(files) > 1 else None,
        "files": files,
        "bytes": sum(f["bytes"] for f in files),
        "inputs": inputs,
        "outputs": outputs,
        "parity": parity,
    }
    entry.update(extra or {})
    return entry


def versions(tensorrt_version: str | None = None) -> dict:
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "tensorrt": tensorrt_version, "peftexport": __version__}


def build_manifest(
    model_type: str,
    image_size: int,
    intensity: dict,
    peft: dict | None,
    merged: bool,
    in_graph_adapters: list[str],
    graphs: dict,
    opset: int,
    exporter: str,
    base: dict,
    merge_report: dict | None,
) -> dict:
    from ..runtime.preprocess import SAM_INTERPOLATION

    g = image_size // 16
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "peftexport_version": __version__,
        "model_type": model_type,
        "image_size": image_size,
        "embedding_shape": [256, g, g],
        "low_res_size": 4 * g,
        "preprocessing": {
            "pixel_mean": list(PIXEL_MEAN),
            "pixel_std": list(PIXEL_STD),
            "resize": "longest_side",
            # What segment_anything really does: torchvision's default on a PIL image (bilinear).
            "interpolation": SAM_INTERPOLATION,
            "pad": "bottom_right_zeros_after_normalize",
            "intensity": intensity,
        },
        "peft": peft,
        "merged": merged,
        "in_graph_adapters": in_graph_adapters,
        "base": base,
        "opset": opset,
        "exporter": exporter,
        "merge_report": merge_report,
        "graphs": graphs,
        "versions": versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_manifest(export_dir: Path, manifest: dict) -> Path:
    path = Path(export_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


def training_scale_record(adapter_meta: dict) -> dict | None:
    """The adapter's training scale (native crop size -> model input) for manifest.json, or None
    (older adapters: from their training.patch_size and base image size)."""
    rec = adapter_meta.get("training_scale")
    if rec is None:
        patch = (adapter_meta.get("training") or {}).get("patch_size")
        size = (adapter_meta.get("base") or {}).get("image_size")
        rec = {"crop_size": int(patch), "model_input": int(size)} if patch and size else None
    return rec
