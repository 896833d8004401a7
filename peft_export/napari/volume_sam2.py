"""What the Volume / movie box does differently on a SAM 2 export: the annotated slices' prompts as
SAM 2's conditioning prompts, the note the box shows, and the one-line refusals of what needs plane
embeddings (SAM 2 exports have none) or memory graphs (``merge-and-export --video``)."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..volume.embeddings import is_sam2
from .prompts import Prompts

PROPAGATE = "Segment object in volume"


def sam2_prompt(prompts: Prompts) -> Dict[str, np.ndarray]:
    """A slice's prompts as SAM 2's prompt on that frame: {"points", "labels", "box"} (those given)."""
    prompt: Dict[str, np.ndarray] = {}
    if len(prompts.coords):
        prompt["points"], prompt["labels"] = prompts.coords, prompts.labels
    if prompts.box is not None:
        prompt["box"] = prompts.box
    return prompt


def sam2_note(session: Any) -> str:
    """What the Volume / movie box offers on ``session``'s export ("" on a SAM export)."""
    if session is None or not is_sam2(session):
        return ""
    if not session.has_memory_graphs:
        return ("SAM 2 export without memory graphs: it cannot propagate. To segment an object in a volume, "
                "export the model again with its memory graphs (peftexport merge-and-export ... --video). "
                "Embed all planes, Segment all (3D) and Track need a SAM export.")
    return ("SAM 2 export: Segment object in volume carries the object with SAM 2's memory, encoding each plane "
            "as it reaches it; no projection, IoU threshold or box extension (SAM 2's object score decides where "
            "the object ends). Embed all planes, Segment all (3D) and Track need a SAM export.")


def sam2_refusal(session: Any, action: str) -> str:
    """Why ``action`` cannot run on ``session``'s export, in one line ("" when it can)."""
    if session is None or not is_sam2(session):
        return ""
    name = session.export_dir.name
    if action != PROPAGATE:
        return (f"{action}: {name} is a SAM 2 export, which has no plane embeddings; {action} runs on SAM exports "
                f"(on SAM 2: {PROPAGATE})")
    if not session.has_memory_graphs:
        return (f"{action}: {name} is a SAM 2 export without memory graphs, so it cannot propagate; export the "
                "model again with 'peftexport merge-and-export ... --video'")
    return ""
