"""ImageEmbedding: one encoded image, shared by the session and its automatic-segmentation mixin
(a module of its own so that ``session`` and ``automatic`` do not import each other)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

# predict_batch refuses a mask stack larger than this (64 masks of an 8000x8000 image: 4 GiB).
MAX_BATCH_MASK_BYTES = 2**30


@dataclass(frozen=True)
class ImageEmbedding:
    """One encoded image: embedding (1,256,g,g) float32 and the sizes its prompts need."""

    embedding: np.ndarray
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    adapter: Optional[str] = None  # exports of several adapters: whose embedding this is
