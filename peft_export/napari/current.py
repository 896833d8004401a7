"""What a request works on, and whether its result still belongs to what the viewer shows.

A ``Target`` names the export (the ``SamSession`` object itself: another export, or the same
folder loaded again, is another target), the image layer (napari's ``Layer.unique_id``: unlike
``id(layer)`` it is never given to a later layer), the generation of that layer's data (bumped
each time its data is replaced), the slice and the adapter. The widget builds the current
target from the viewer; a worker's result is used only while its target is still *valid*
(same export, layer still there with the same data) and shown only while it is *current*
(also the same slice and adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class Target:
    """One image plane as one export sees it. ``session`` compares by identity (SamSession has no ``__eq__``)."""

    session: Any
    layer: str  # napari Layer.unique_id
    generation: int  # LayerVersions: how often the layer's data was replaced
    index: Tuple[int, ...]  # leading (z, t, ...) indices of the plane
    adapter: Optional[str]

    def same_data(self, other: Optional["Target"]) -> bool:
        """Whether ``other`` is the same export on the same, unchanged layer (any slice or adapter)."""
        return (other is not None and other.session is self.session and other.layer == self.layer
                and other.generation == self.generation)


class LayerVersions:
    """The data generation of each watched image layer, keyed by its ``unique_id``."""

    def __init__(self) -> None:
        self._generation: Dict[str, int] = {}

    def watch(self, layer: Any, on_change: Callable[[Any], None]) -> None:
        """Start counting ``layer``'s data replacements; ``on_change(layer)`` runs after each one."""
        uid = layer.unique_id
        if uid in self._generation:
            return
        self._generation[uid] = 0

        def changed(_event: Any) -> None:
            if uid in self._generation:
                self._generation[uid] += 1
                on_change(layer)

        layer.events.data.connect(changed)

    def generation(self, layer: Any) -> int:
        return self._generation.get(layer.unique_id, 0)

    def alive(self, uid: str) -> bool:
        """Whether the layer is still watched (not removed from the viewer)."""
        return uid in self._generation

    def forget(self, layer: Any) -> None:
        self._generation.pop(layer.unique_id, None)
