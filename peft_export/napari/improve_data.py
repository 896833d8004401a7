"""What "Improve the model" trains on, without Qt: pairs of an image layer and a Labels layer of
committed objects (2D, or a stack whose labelled planes count), checked and written as the
``--images DIR --labels DIR`` folders ``peftexport improve`` reads; whether the ``[torch]`` extra is
there; the before/after Dice of its result as text.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from ..errors import PeftExportError

TORCH_MODULES = ("torch", "segment_anything", "safetensors", "onnx")
TORCH_HINT = "pip install 'peftexport[torch]'"


def torch_missing() -> Optional[str]:
    """None when the ``[torch]`` extra is installed (checked without importing it), else what is missing."""
    missing = []
    for name in TORCH_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if not missing:
        return None
    return (f"Improve the model trains in a separate process and needs the [torch] extra ({', '.join(missing)} "
            f"missing here): {TORCH_HINT}. The segment widget works without it.")


@dataclass
class TrainingPair:
    """An image layer's pixels and its committed labels (full resolution, array-likes; read in a worker)."""

    name: str
    image: Any
    labels: Any
    rgb: bool = False

    def image_shape(self) -> tuple:
        shape = tuple(int(s) for s in self.image.shape)
        return shape[:-1] if self.rgb else shape


def check_pairs(pairs: Sequence[TrainingPair], count_objects: Callable[[Any], int]) -> int:
    """Refuse what ``improve`` cannot train on, in one message: no pairs, labels of another shape than
    their image, no committed object at all. Returns the number of objects (``count_objects`` per
    labels)."""
    if not pairs:
        raise PeftExportError("no committed labels: commit objects with the segment widget (Shift-C), or choose a "
                              "Labels layer for an image")
    wrong = [f"'{p.name}': labels {tuple(int(s) for s in p.labels.shape)}, image {p.image_shape()}" for p in pairs
             if tuple(int(s) for s in p.labels.shape) != p.image_shape()]
    if wrong:
        raise PeftExportError("labels of another shape than their image: " + "; ".join(wrong))
    objects = sum(count_objects(p.labels) for p in pairs)
    if objects == 0:
        raise PeftExportError("no committed labels: the chosen Labels layers hold no object")
    return objects


def count_ids(labels: Any) -> int:
    """Objects of a labels array (ids other than 0; per plane for a stack, as improve counts them)."""
    arr = np.asarray(labels)
    planes = arr.reshape(-1, *arr.shape[-2:])
    return int(sum(len(np.unique(p[p > 0])) for p in planes))


def file_stem(name: str, taken: set) -> str:
    """A file name for a layer name: unsafe characters replaced, unique among ``taken``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"
    unique, n = stem, 2
    while unique in taken:
        unique, n = f"{stem}_{n}", n + 1
    taken.add(unique)
    return unique


def write_dataset(pairs: Sequence[TrainingPair], folder: Path) -> List[str]:
    """``folder/images/NAME.tif`` and ``folder/labels/NAME.tif`` for every pair (stacks as ZYX
    TIFFs, labels as uint32); returns the names."""
    import tifffile

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    taken: set = set()
    names = []
    for pair in pairs:
        stem = file_stem(pair.name, taken)
        image, labels = np.asarray(pair.image), np.asarray(pair.labels).astype(np.uint32)
        stacked = labels.ndim == 3
        axes = ("ZYX" if stacked else "YX") + ("S" if pair.rgb else "")
        tifffile.imwrite(folder / "images" / f"{stem}.tif", image, metadata={"axes": axes},
                         photometric="rgb" if pair.rgb else "minisblack")
        tifffile.imwrite(folder / "labels" / f"{stem}.tif", labels, metadata={"axes": "ZYX" if stacked else "YX"},
                         photometric="minisblack")
        names.append(stem)
    return names


def dice_text(result: dict) -> str:
    """The held-out check of an ``improve`` result, one line per precision."""
    held = result["held_out"]
    lines = [f"held out {held['held_out']} of {held['objects']} objects; Dice on them, before -> after:"]
    show = lambda r, key: "-" if r is None else f"{r[key]:.3f}"  # noqa: E731
    for precision in sorted(set(result["before"]) | set(result["after"])):
        b, a = result["before"].get(precision), result["after"].get(precision)
        lines.append(f"{precision}: box {show(b, 'box_dice')} -> {show(a, 'box_dice')}, "
                     f"point {show(b, 'point_dice')} -> {show(a, 'point_dice')}")
    lines += [f"refused: {r} (left out of the new export)" for r in result.get("refused", [])]
    return "\n".join(lines)


def next_free(path: Path) -> Path:
    """``path`` if free, else ``path_2``, ``path_3``, ..."""
    if not path.exists():
        return path
    n = 2
    while path.with_name(f"{path.name}_{n}").exists():
        n += 1
    return path.with_name(f"{path.name}_{n}")
