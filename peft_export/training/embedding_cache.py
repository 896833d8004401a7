"""``finetune --cache-embeddings``: with the image encoder frozen, each training view is encoded once.

An embedding is keyed by what determines it: a digest of the image encoder's weights and the exact
uint8 patch it encodes (``preprocess_patches`` is a pure function of both). So a patch drawn again
reuses its embedding, and any change of weights, crop, flip or rotation is a new key: no stale
embedding can be used. Augmentations are kept honest that way: flips and 90-degree rotations do not
commute with the encoder, so each of a patch's up to 8 views is encoded the first time it is drawn
and kept (``--no-augment``: one view per patch). Random crops would make every patch new, so in this
mode training images larger than the patch are cut once into fixed overlapping tiles
(``fixed_tiles``) and patches are drawn from those.

Embeddings stay in memory (float32, 256 x g x g each: 4 MB at 1024 px, 1 MB at 512 px, 256 KB at
256 px), and with ``--embedding-store DIR`` also in ``DIR`` as one ``.npy`` per key (written
atomically), so a resumed or repeated run on the same images and weights encodes nothing. The
encoder runs in eval mode (TinyViT's BatchNorm uses its running statistics, as at inference).
Validation images are cached the same way (``CachedPredictor``).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from ..data import Sample
from ..data.patches import _kept_objects
from ..errors import PeftExportError
from ..fsutil import atomic_file
from .encoder import preprocess_patches


def encoder_digest(sam: Sam) -> str:
    """blake2b of the image encoder's whole state (parameters and buffers, names, shapes, dtypes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(sam.image_encoder.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d too (BatchNorm)
    h.update(str(sam.image_encoder.img_size).encode())
    return h.hexdigest()


def check_encoder_frozen(sam: Sam, what: str = "--cache-embeddings") -> None:
    trains = [n for n, p in sam.image_encoder.named_parameters() if p.requires_grad]
    if trains:
        raise PeftExportError(
            f"{what}: the image encoder trains ({len(trains)} tensors, e.g. image_encoder.{trains[0]}), so its "
            "embeddings change every step; adapt only the decoder (e.g. --peft lora --blocks none --targets "
            "dec.all) or use --peft freeze-encoder")


class EmbeddingCache:
    """Image embeddings of uint8 patches under one frozen encoder, in memory and optionally on disk."""

    def __init__(self, sam: Sam, store: str | Path | None = None):
        self.digest = encoder_digest(sam)
        self.memory: dict[str, torch.Tensor] = {}
        self.store = Path(store) if store is not None else None
        if self.store is not None:
            if self.store.exists() and not self.store.is_dir():
                raise PeftExportError(f"--embedding-store {self.store}: exists and is not a directory")
            self.store.mkdir(parents=True, exist_ok=True)
        self.encoded = self.reused = 0
        self.seconds = 0.0  # spent encoding (the time caching pays up front, inside the steps that draw new views)

    def key(self, patch: np.ndarray) -> str:
        h = hashlib.blake2b(self.digest.encode(), digest_size=16)
        h.update(f"{patch.shape}:{patch.dtype}".encode())
        h.update(np.ascontiguousarray(patch).tobytes())
        return h.hexdigest()

    def _lookup(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if self.store is not None and (self.store / f"{key}.npy").is_file():
            try:
                emb = torch.from_numpy(np.load(self.store / f"{key}.npy", allow_pickle=False))
            except (OSError, ValueError):
                return None  # unreadable: encoded again and rewritten
            self.memory[key] = emb
            return emb
        return None

    def _keep(self, key: str, emb: torch.Tensor) -> None:
        emb = emb.detach().float().cpu().contiguous()
        self.memory[key] = emb
        if self.store is not None:
            with atomic_file(self.store / f"{key}.npy", overwrite=True) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, emb.numpy(), allow_pickle=False)

    @torch.no_grad()
    def embed(self, sam: Sam, patches: Sequence[np.ndarray], device: torch.device
              ) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B x 256 x g x g embeddings on ``device``, the resized (h, w)) of same-size uint8 patches."""
        keys = [self.key(p) for p in patches]
        found = {k: self._lookup(k) for k in set(keys)}
        missing = [k for k, v in found.items() if v is None]
        h, w = patches[0].shape[:2]
        input_size = ResizeLongestSide.get_preprocess_shape(h, w, sam.image_encoder.img_size)
        if missing:
            t0 = time.perf_counter()
            first = {k: keys.index(k) for k in missing}
            x, input_size = preprocess_patches(sam, [patches[first[k]] for k in missing], device)
            encoder = sam.image_encoder
            was_training = encoder.training
            encoder.eval()
            try:
                out = encoder(x)
            finally:
                encoder.train(was_training)
            for k, emb in zip(missing, out):
                self._keep(k, emb)
                found[k] = self.memory[k]
            self.seconds += time.perf_counter() - t0
        self.encoded += len(missing)
        self.reused += len(keys) - len(missing)
        return torch.stack([found[k] for k in keys]).to(device), input_size

    def predictor(self, sam: Sam) -> SamPredictor:
        return CachedPredictor(sam, self)


class CachedPredictor(SamPredictor):
    """SamPredictor whose ``set_image`` takes the embedding from the cache (validation)."""

    def __init__(self, sam: Sam, cache: EmbeddingCache):
        super().__init__(sam)
        self.cache = cache

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        if image_format != self.model.image_format:
            image = image[..., ::-1]
        image = np.ascontiguousarray(image)
        self.reset_image()
        device = self.model.device
        emb, input_size = self.cache.embed(self.model, [image], device)
        self.original_size = image.shape[:2]
        self.input_size = tuple(input_size)
        self.features = emb
        self.is_image_set = True


def _starts(length: int, patch: int) -> list[int]:
    if length <= patch:
        return [0]
    n = -(-length // patch)
    return sorted({int(round(i * (length - patch) / (n - 1))) for i in range(n)})


def fixed_tiles(samples: Sequence[Sample], patch_size: int, min_object_size: int) -> list[Sample]:
    """Images larger than the patch cut into fixed tiles covering them (overlapping evenly), each kept
    when it holds an object of ``min_object_size`` pixels; smaller images as they are."""
    out = []
    for s in samples:
        h, w = s.label.shape
        if h <= patch_size and w <= patch_size:
            out.append(s)
            continue
        for y in _starts(h, patch_size):
            for x in _starts(w, patch_size):
                label = s.label[y:y + patch_size, x:x + patch_size]
                if len(_kept_objects(label, min_object_size)):
                    out.append(Sample(f"{s.name}@{y},{x}", s.image[y:y + patch_size, x:x + patch_size], label, s.source))
    return out
