"""What the Volume / movie box does differently on a SAM 2 export: the annotated slices' prompts as
SAM 2's conditioning prompts, the note the box shows, the planes Segment all (3D) and Track segment
(each encoded as it is reached, nothing kept: a SAM 2 plane embedding holds the two high-res feature maps
too, about 4x a SAM one), and the one-line refusals of what a SAM 2 export does not do here: Embed all
planes (nothing would use them) and propagation without memory graphs (``merge-and-export --video``)."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..volume.embeddings import VolumeEmbeddings, is_sam2
from .prompts import Prompts

PROPAGATE = "Segment object in volume"
EMBED = "Embed all planes"


def sam2_prompt(prompts: Prompts) -> Dict[str, np.ndarray]:
    """A slice's prompts as SAM 2's prompt on that frame: {"points", "labels", "box"} (those given)."""
    prompt: Dict[str, np.ndarray] = {}
    if len(prompts.coords):
        prompt["points"], prompt["labels"] = prompts.coords, prompts.labels
    if prompts.box is not None:
        prompt["box"] = prompts.box
    return prompt


def sam2_planes(volume: VolumeEmbeddings) -> VolumeEmbeddings:
    """The planes Segment all (3D) and Track run on: on a SAM 2 export each plane encoded when it is segmented
    and dropped after (the stack's intensity statistics kept), on SAM exports ``volume`` itself."""
    if not is_sam2(volume.session):
        return volume
    return VolumeEmbeddings(volume.session, volume.stack, keep=False, intensity=volume.intensity)


def sam2_note(session: Any) -> str:
    """What the Volume / movie box offers on ``session``'s export ("" on a SAM export)."""
    if session is None or not is_sam2(session):
        return ""
    auto = ("Segment all (3D) and Track segment every plane with SAM 2 (segment-everything), encoding each plane "
            "as they reach it; Embed all planes is for SAM exports.")
    if not session.has_memory_graphs:
        return ("SAM 2 export without memory graphs: it cannot propagate. To segment an object in a volume, "
                "export the model again with its memory graphs (peftexport merge-and-export ... --video). " + auto)
    return ("SAM 2 export: Segment object in volume carries the object with SAM 2's memory, encoding each plane "
            "as it reaches it; no projection, IoU threshold or box extension (SAM 2's object score decides where "
            "the object ends). " + auto)


def sam2_refusal(session: Any, action: str) -> str:
    """Why ``action`` cannot run on ``session``'s export, in one line ("" when it can)."""
    if session is None or not is_sam2(session):
        return ""
    name = session.export_dir.name
    if action == EMBED:
        return (f"{action}: {name} is a SAM 2 export; its planes are encoded as {PROPAGATE}, Segment all (3D) and "
                "Track reach them, so there is nothing to embed first")
    if action == PROPAGATE and not session.has_memory_graphs:
        return (f"{action}: {name} is a SAM 2 export without memory graphs, so it cannot propagate; export the "
                "model again with 'peftexport merge-and-export ... --video'")
    return ""
