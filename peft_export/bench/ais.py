"""The ``ais`` bench component: micro-sam's instance decoder + the runtime's post-processing on one
image embedding (what automatic instance segmentation adds to the encoder), for torch and ONNX Runtime.

Both paths end in the same numpy post-processing (``runtime.instances``, micro-sam's defaults),
so the difference between cases is the decoder. The embedding is the case's own, of the bench's
seeded input; the maps are taken at the model's input size (S x S).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import PeftExportError


def torch_ais(decoder: Any, embedding: Any) -> np.ndarray:
    """Torch decoder on a (1, 256, g, g) torch embedding, then post-processing; returns the labels."""
    import torch

    from ..runtime.instances import segment_from_maps

    if decoder is None:
        raise PeftExportError("--components ais: this model has no instance decoder")
    with torch.inference_mode():
        maps = decoder(embedding.float())[0].float().cpu().numpy()
    return segment_from_maps(maps, {})[0]


def ort_ais(session: Any, embedding: np.ndarray) -> np.ndarray:
    """The export's ``ais_decoder`` ONNX Runtime session on an embedding, then post-processing."""
    from ..runtime.instances import segment_from_maps

    if session is None:
        raise PeftExportError("--components ais: this export has no ais_decoder graph")
    maps = session.run(["instance_maps"], {"image_embeddings": np.ascontiguousarray(embedding, np.float32)})[0]
    return segment_from_maps(maps[0], {})[0]
