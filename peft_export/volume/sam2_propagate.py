"""One object through a volume with SAM 2's memory: the second propagation method, beside the
micro-sam-style carrying of prompts from plane to plane (``propagate``).

The volume is read as a video (plane = frame) and the annotated planes are SAM 2's conditioning
frames: a mask is taken as that plane's output as it is (``add_new_mask``), points and a box are
segmented there (``add_new_points_or_box``). Every other plane is segmented by
``Sam2Session.propagate`` (``SAM2VideoPredictor``'s memory attention over the annotated planes and
the last planes it tracked): forward from the lowest annotated plane to the top, then backward from
it to plane 0. Where SAM 2's object score says the object is absent the plane stays empty; there is
no IoU stop (SAM 2 decides), and the prompt projection options of the other method do not apply.
``stop_lower``: nothing below the lowest annotated plane (the backward pass is not run);
``stop_upper``: nothing above the highest (with the backward pass those planes are still tracked,
since it reads their memories, then cleared; without it tracking ends there).

Planes are mapped to uint8 with the whole stack's intensity statistics (``stack_intensity``, as the
plane embeddings of the other method are) and read one at a time as SAM 2 reaches them; each plane
is resized to the model's square input (no tiling).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from ..errors import PeftExportError
from ..runtime.tiling import IntensityRange
from .embeddings import Cancel, Progress, cancelled, is_sam2, stack_intensity
from .stacks import Stack

PROPAGATION_METHODS = ("auto", "prompts", "sam2")
OBJECT = 1  # the one object SAM 2 tracks here


def propagation_methods(session: Any) -> Tuple[str, ...]:
    """The propagation methods an export offers: ("prompts",) on SAM exports, ("sam2",) on SAM 2
    exports with memory graphs, () on SAM 2 exports without them (what a UI lists)."""
    if not is_sam2(session):
        return ("prompts",)
    return ("sam2",) if session.has_memory_graphs else ()


def resolve_method(session: Any, method: str = "auto") -> str:
    """"auto" -> "sam2" on a SAM 2 export, "prompts" on a SAM export; a method the export cannot run
    (or a SAM 2 export without memory graphs) -> one error naming the export."""
    if method not in PROPAGATION_METHODS:
        raise PeftExportError(f"--propagation: unknown method {method!r} (use {', '.join(PROPAGATION_METHODS)})")
    where = getattr(session, "export_dir", "export")
    if method == "auto":
        method = "sam2" if is_sam2(session) else "prompts"
    if method == "prompts" and is_sam2(session):
        raise PeftExportError(f"{where}: --propagation prompts (micro-sam's, on plane embeddings) runs on SAM "
                              "exports; a SAM 2 export propagates with its memory (--propagation sam2)")
    if method == "sam2" and not is_sam2(session):
        raise PeftExportError(f"{where}: --propagation sam2 needs a SAM 2 export with memory graphs; this is a SAM "
                              f"export ({session.manifest.get('model_type')}): use --propagation prompts")
    if method == "sam2":
        session.propagator()  # opens the memory graphs, or the one-line error where there are none
    return method


class StackFrames:
    """The planes of a stack as SAM 2 frames: each read and mapped to uint8 RGB when it is asked for."""

    def __init__(self, stack: Stack, intensity: IntensityRange) -> None:
        self.stack, self.intensity = stack, intensity
        self.plane_shape = stack.plane_shape

    def __len__(self) -> int:
        return self.stack.n_planes

    def __getitem__(self, z: int) -> np.ndarray:
        return self.intensity.to_uint8(self.stack.read(int(z)))


def annotation_prompts(annotations: Union[np.ndarray, Mapping[int, Any]], n: int, shape: Tuple[int, int]
                       ) -> Dict[int, Dict[str, Any]]:
    """{plane: SAM 2 prompt} from {plane: H x W mask or {"points", "labels", "box"}} or a Z x H x W
    stack of masks (its non-empty planes are the annotated ones)."""
    if not isinstance(annotations, Mapping):
        arr = np.asarray(annotations)
        if arr.shape != (n, *shape):
            raise PeftExportError(f"annotations: shape {arr.shape}, the volume is {(n, *shape)}")
        annotations = {z: arr[z] for z in np.flatnonzero(arr.reshape(n, -1).any(axis=1))}
    prompts: Dict[int, Dict[str, Any]] = {}
    for z, value in annotations.items():
        if int(z) != z or not 0 <= int(z) < n:
            raise PeftExportError(f"annotation on plane {z}: outside the volume (0..{n - 1})")
        if isinstance(value, Mapping):
            prompt = {k: value[k] for k in ("points", "labels", "box") if value.get(k) is not None}
            if "points" in prompt and "labels" not in prompt:
                prompt["labels"] = np.ones(len(np.asarray(prompt["points"]).reshape(-1, 2)), np.int64)
        else:
            mask = np.asarray(value)
            if mask.shape != shape:
                raise PeftExportError(f"annotation on plane {z}: shape {mask.shape}, the planes are {shape}")
            if not mask.any():
                continue  # an empty plane is not an annotation (as with the other method)
            prompt = {"mask": mask != 0}
        prompts[int(z)] = prompt
    if not prompts:
        raise PeftExportError("annotations: no annotated plane (every mask is empty)")
    return prompts


def segment_object_with_sam2(
    session: Any,
    stack: Stack,
    annotations: Union[np.ndarray, Mapping[int, Any]],
    intensity: Optional[IntensityRange] = None,
    stop_lower: bool = False,
    stop_upper: bool = False,
    fill_hole_area: Optional[int] = None,
    progress: Progress = None,
    cancel: Cancel = None,
) -> Tuple[np.ndarray, Tuple[int, int]]:
    """One object through ``stack`` with SAM 2's memory: (Z x H x W uint8 mask, (first, last) plane
    of the object).

    ``session``: a ``Sam2Session`` on an export with memory graphs. ``annotations``: the object on
    its annotated planes, {plane: H x W mask} or a Z x H x W array as ``segment_object_in_volume``
    takes, or {plane: {"points": (N, 2) xy, "labels": (N,), "box": XYXY}}; annotated masks are kept as
    they are. ``intensity``: the stack's statistics (default: ``stack_intensity``).
    ``progress(done, total)`` after each plane SAM 2 visits; ``cancel`` stops between planes and
    returns what is segmented so far.
    """
    if not is_sam2(session):
        raise PeftExportError(f"{getattr(session, 'export_dir', 'export')}: SAM 2 propagation needs a SAM 2 export")
    n, shape = stack.n_planes, stack.plane_shape
    prompts = annotation_prompts(annotations, n, shape)
    z0, z1 = min(prompts), max(prompts)
    frames = StackFrames(stack, intensity or stack_intensity(stack, session._intensity_rule))
    backward = z0 > 0 and not stop_lower
    # without a backward pass no plane reads the memories above the last annotated one: stop there
    last = z1 if stop_upper and not backward else n - 1
    total = (last + 1 - z0) + (z0 + 1 if backward else 0)  # the first annotated plane is in both passes
    seg = np.zeros((n, *shape), np.uint8)
    visits = session.propagate(frames, {OBJECT: prompts}, "both" if backward else "forward", fill_hole_area)
    for done, (z, logits) in enumerate(visits, 1):
        seg[z] = logits[OBJECT] > 0
        if progress is not None:
            progress(done, total)
        if cancelled(cancel) or (z == last and not backward):
            visits.close()
            break
    for z, prompt in prompts.items():
        if "mask" in prompt:
            seg[z] = prompt["mask"]
    if stop_upper:
        seg[z1 + 1:] = 0
    found = np.flatnonzero(seg.reshape(n, -1).any(axis=1))
    span = (int(found[0]), int(found[-1])) if len(found) else (z0, z1)
    return seg, span
