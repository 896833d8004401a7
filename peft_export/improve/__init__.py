"""Stage 6, improve: an export's decoder fine-tuned on a user's corrected objects, exported anew.

May import: models, peft, data, training, merge, export, evaluation, runtime, errors, fsutil (and torch, except in ``protocol``).

``improve_export`` (``loop``) is the library function behind ``peftexport improve``; ``protocol`` is the
torch-free line protocol and subprocess client the napari widget uses to run it away from the viewer.
The package imports nothing heavy itself, so ``peft_export.improve.protocol`` stays torch-free.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("improve_export", "ImproveCancelled", "heldout_dice"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(name)
