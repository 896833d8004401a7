"""Training patches: crops that hold at least one prompt-worthy object, with flips/rotations.

Every patch is a pure function of (seed, index), so a resumed run continues with exactly
the patches it would have drawn. The sampler is a map-style dataset (``__len__`` and
``__getitem__``), so ``torch.utils.data.DataLoader`` can use it directly; it does not
import torch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import PeftExportError
from .labels import relabel_consecutive


def _as_rgb_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    elif image.ndim == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise PeftExportError(f"image: expected HxW or HxWx3 after normalisation, got {image.shape}")
    return image


def _pad_to(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad bottom/right so both sides are at least ``size``."""
    h, w = label.shape
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        label = np.pad(label, ((0, ph), (0, pw)))
    return image, label


def _kept_objects(crop: np.ndarray, min_object_size: int) -> np.ndarray:
    """Ids of the objects with at least ``min_object_size`` pixels inside ``crop``."""
    # np.unique rather than bincount: instance ids can be arbitrarily large
    ids, counts = np.unique(crop, return_counts=True)
    return ids[(ids > 0) & (counts >= max(min_object_size, 1))]


def _eligible(label: np.ndarray, min_object_size: int) -> np.ndarray:
    return _kept_objects(label, min_object_size)


def augment_pair(image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random flips and 90-degree rotation applied to image (HxWxC) and label (HxW)."""
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    if rng.random() < 0.5:
        image, label = image[::-1], label[::-1]
    k = int(rng.integers(4))
    image, label = np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def sample_patch(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, patch_size: int = 512,
                 min_object_size: int = 25, augment: bool = True, random_tries: int = 10
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One training sample: (float32 patch_size x patch_size x 3 in 0..255, int32 labels 1..n).

    The crop holds at least one object with ``min_object_size`` pixels inside it; smaller
    objects (inside the crop) are set to 0 so they are never prompted. Images smaller than
    the patch are zero-padded bottom/right (labels with 0). First ``random_tries`` uniform
    crops are tried, then crops centred on the bounding box of a random eligible object.
    """
    image = _as_rgb_float(image)
    label = np.asarray(label)
    if image.shape[:2] != label.shape:
        raise PeftExportError(f"image shape {image.shape[:2]} differs from label shape {label.shape}")
    if label.dtype.kind not in "iu":
        label = label.astype(np.int64)
    image, label = _pad_to(image, label, patch_size)
    h, w = label.shape
    crop = None
    for _ in range(random_tries):
        y0, x0 = int(rng.integers(h - patch_size + 1)), int(rng.integers(w - patch_size + 1))
        candidate = label[y0:y0 + patch_size, x0:x0 + patch_size]
        if len(_kept_objects(candidate, min_object_size)):
            crop = (y0, x0)
            break
    if crop is None:
        eligible = _eligible(label, min_object_size)
        for obj in rng.permutation(eligible):
            ys, xs = np.nonzero(label == obj)
            cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
            y0 = int(np.clip(cy - patch_size // 2, 0, h - patch_size))
            x0 = int(np.clip(cx - patch_size // 2, 0, w - patch_size))
            if len(_kept_objects(label[y0:y0 + patch_size, x0:x0 + patch_size], min_object_size)):
                crop = (y0, x0)
                break
    if crop is None:
        raise PeftExportError(f"no crop of {patch_size}x{patch_size} holds an object of at least "
                              f"{min_object_size} pixels")
    y0, x0 = crop
    img = image[y0:y0 + patch_size, x0:x0 + patch_size]
    lab = label[y0:y0 + patch_size, x0:x0 + patch_size]
    lab = np.where(np.isin(lab, _kept_objects(lab, min_object_size)), lab, 0)
    if augment:
        img, lab = augment_pair(img, lab, rng)
    return np.ascontiguousarray(img, dtype=np.float32), relabel_consecutive(lab)


class PatchSampler:
    """Map-style dataset of training patches over already normalised images.

    ``sample(i)`` depends only on ``seed`` and ``i``: block ``i // n`` of ``n`` usable images
    visits them in a seeded random order and the crop/augmentation use ``rng([seed, i])``.
    ``sampler[i]`` (for DataLoader) is ``sample(epoch * len(sampler) + i)``, see set_epoch.
    Images without any object of ``min_object_size`` pixels are skipped.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], patch_size: int = 512,
                 min_object_size: int = 25, augment: bool = True, seed: int = 0,
                 samples_per_epoch: int | None = None):
        if len(images) != len(labels):
            raise PeftExportError(f"{len(images)} images but {len(labels)} label images")
        if patch_size < 1 or min_object_size < 0:
            raise PeftExportError(f"patch_size must be >= 1 and min_object_size >= 0 "
                                  f"(got {patch_size}, {min_object_size})")
        self.images = list(images)
        self.labels = list(labels)
        self.patch_size = int(patch_size)
        self.min_object_size = int(min_object_size)
        self.augment = augment
        self.seed = int(seed)
        self.usable = [i for i, lb in enumerate(self.labels)
                       if len(_eligible(np.asarray(lb), self.min_object_size))]
        if not self.usable:
            raise PeftExportError(f"training data: no image has an object of at least {min_object_size} pixels")
        self.samples_per_epoch = samples_per_epoch or len(self.usable)
        self.epoch = 0

    @classmethod
    def from_samples(cls, samples: Sequence, **kwargs) -> "PatchSampler":
        """Build from data.dataset.Sample objects (``.image``, ``.label``)."""
        return cls([s.image for s in samples], [s.label for s in samples], **kwargs)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def image_index(self, index: int) -> int:
        """Which source image sample ``index`` is cut from."""
        n = len(self.usable)
        order = np.random.default_rng([self.seed, index // n, 1]).permutation(n)
        return self.usable[order[index % n]]

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index < 0:
            raise IndexError(index)
        k = self.image_index(index)
        rng = np.random.default_rng([self.seed, index, 0])
        return sample_patch(self.images[k], self.labels[k], rng, self.patch_size,
                            self.min_object_size, self.augment)

    def set_epoch(self, epoch: int) -> None:
        """Make ``sampler[i]`` return ``sample(epoch * len(self) + i)`` (like DistributedSampler)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.sample(self.epoch * len(self) + index)
