"""``peftexport propagate``: SAM 2 propagation through a movie or a volume read from files.

Frames come from one stack file (TIFF / NPY with several planes: a volume's slices or a movie's frames),
from several image files, or from a folder of them (sorted by name). Prompts come from a JSON file
``{"<object id>": {"<frame index>": {"points": [[x, y], ...], "labels": [1, ...], "box": [x0, y0, x1, y1],
"mask": "mask.tif"}}}`` (a mask path is relative to the JSON file). The result is one label stack (uint16,
object ids, 0 = background; where objects overlap the one with the higher logit wins) and a JSON record.
A stack that is not uint8 is mapped to 0..255 with one percentile range for all its planes, so that
slices keep their relative brightness.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..data.io import IMAGE_EXTENSIONS, read_array, read_image_planes
from ..errors import PeftExportError
from ..fsutil import atomic_file, check_can_write
from ..runtime.intensity import check_intensity_rule
from ..runtime.sam2_video import Sam2Propagator, propagate_labels


def read_frames(inputs: Sequence[str | Path]) -> List[np.ndarray]:
    """The frames of a stack file, of several image files, or of a folder of image files."""
    paths: List[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise PeftExportError(f"{p}: no image files in this folder")
            paths.extend(found)
        else:
            paths.append(p)
    if len(paths) == 1:
        frames = read_image_planes(paths[0])
        if len(frames) < 2:
            raise PeftExportError(f"{paths[0]}: one plane only; propagation needs a stack or several frames")
        return frames
    frames = []
    for p in paths:
        planes = read_image_planes(p)
        if len(planes) != 1:
            raise PeftExportError(f"{p}: {len(planes)} planes; give one stack, or single-plane frames")
        frames.append(planes[0])
    if len({f.shape for f in frames}) > 1:
        raise PeftExportError(f"{paths[0].parent}: frames differ in size ({sorted({f.shape for f in frames})})")
    return frames


def stack_to_uint8(frames: List[np.ndarray], rule: dict | None = None) -> List[np.ndarray]:
    """uint8 frames as they are; others mapped to 0..255 with the rule's percentiles over ALL frames."""
    if all(f.dtype == np.uint8 for f in frames):
        return frames
    rule = check_intensity_rule(rule)
    if rule["name"] == "none":
        return [np.clip(np.nan_to_num(f.astype(np.float32)), 0, 255).astype(np.uint8) for f in frames]
    step = max(1, sum(f.size for f in frames) // 10_000_000)  # a sample bounds the percentile's memory
    sample = np.concatenate([f.reshape(-1)[::step] for f in frames]).astype(np.float64)
    sample = sample[np.isfinite(sample)]
    lo, hi = np.percentile(sample, [rule["low"], rule["high"]]) if sample.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = (float(sample.min()), float(sample.max())) if sample.size else (0.0, 1.0)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return [np.clip(np.rint((np.nan_to_num(f.astype(np.float64), nan=lo) - lo) * scale), 0, 255).astype(np.uint8)
            for f in frames]


def read_prompts(path: str | Path) -> Dict[Any, Dict[int, dict]]:
    """Prompts from JSON (see the module doc); object ids that look like integers become integers."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise PeftExportError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise PeftExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise PeftExportError(f"{path}: expected {{object id: {{frame index: prompt}}}}")
    prompts: Dict[Any, Dict[int, dict]] = {}
    for obj, frames in raw.items():
        key = int(obj) if str(obj).isdigit() else obj
        if not isinstance(frames, dict):
            raise PeftExportError(f"{path}: object {obj}: expected {{frame index: prompt}}")
        prompts[key] = {}
        for frame, prompt in frames.items():
            if not str(frame).isdigit() or not isinstance(prompt, dict):
                raise PeftExportError(f"{path}: object {obj}: frame {frame!r}: expected an index and a prompt object")
            prompt = dict(prompt)
            if isinstance(prompt.get("mask"), str):
                arr, _ = read_array(path.parent / prompt["mask"], for_labels=True)
                prompt["mask"] = np.squeeze(arr) > 0
            prompts[key][int(frame)] = prompt
    return prompts


def propagate_files(export_dir: str | Path, inputs: Sequence[str | Path], prompts: str | Path | dict,
                    out: str | Path, direction: str = "both", overwrite: bool = False,
                    fill_hole_area: Optional[int] = None, threads: Optional[int] = None,
                    progress: bool = False) -> dict:
    """Propagate prompts through the frames of ``inputs``; write the label stack ``out`` (TIFF).

    ``progress``: a progress bar over the frames visited (shown once the inputs are checked)."""
    out = Path(out)
    if out.suffix.lower() not in (".tif", ".tiff"):
        raise PeftExportError(f"{out}: the label stack is written as TIFF (.tif)")
    check_can_write(out, overwrite)
    session = Sam2Propagator(export_dir, intra_op_threads=threads)  # refuses exports without memory graphs
    frames = stack_to_uint8(read_frames(inputs), (session.intensity_rule or None))
    if not isinstance(prompts, dict):
        prompts = read_prompts(prompts)
    from tqdm import tqdm

    start = min((int(f) for p in prompts.values() for f in p), default=0)
    forward, backward = len(frames) - start, (start + 1 if start > 0 else 0)
    visits = {"both": forward + backward, "forward": forward, "backward": backward}.get(direction)
    with tqdm(total=visits, desc="propagate", unit="frame", disable=not progress) as bar:
        labels, ids = propagate_labels(session, frames, prompts, direction=direction,
                                       fill_hole_area=fill_hole_area, progress=lambda _: bar.update())
    import tifffile

    with atomic_file(out, overwrite) as tmp:
        tifffile.imwrite(tmp, labels, compression="zlib", metadata={"axes": "ZYX"})
    areas = {str(obj): int(np.count_nonzero(labels == i)) for obj, i in ids.items()}
    return {"frames": len(frames), "objects": {str(k): v for k, v in ids.items()}, "voxels": areas,
            "labels": str(out), "direction": direction}
