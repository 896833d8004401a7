"""Shared by the volume tests: stacks with known objects, per-plane segmentations to merge, the
check that two label images are the same up to renumbering, and a small random SAM 2 export with its
memory graphs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from peft_export.data.synthetic_volume import synthetic_volume


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """Every object of ``a`` is exactly one object of ``b`` and back (background 0 to 0)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if ((a == 0) != (b == 0)).any():
        return False
    pairs = np.unique(np.stack([a, b], 1), axis=0)
    return len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def per_plane_segmentation(gt: np.ndarray, seed: int = 0, drop: float = 0.1, split: float = 0.1) -> np.ndarray:
    """What a 2D segmenter gives on each plane of ``gt``: objects missed (``drop``) or cut in two
    (``split``) at random, each plane numbered on its own, ids offset to be unique over the stack."""
    rng = np.random.default_rng(seed)
    out = np.zeros(gt.shape, np.uint32)
    offset = 0
    for z in range(len(gt)):
        plane = gt[z].astype(np.int64)
        for k in np.unique(plane)[1:]:
            r = rng.random()
            m = plane == k
            if r < drop:
                plane[m] = 0
            elif r < drop + split:
                xs = np.nonzero(m)[1]
                plane[m & (np.arange(plane.shape[1])[None] < np.median(xs))] = plane.max() + 1
        ids = np.unique(plane)[1:]
        lut = np.zeros(plane.max() + 1, np.uint32)
        lut[ids] = rng.permutation(len(ids)) + 1 + offset
        out[z] = lut[plane]
        offset += len(ids)
    return out


def small_volume(seed: int = 1, shape=(10, 96, 96)) -> tuple[np.ndarray, np.ndarray]:
    return synthetic_volume(shape, seed=seed, n_objects=(5, 7), radius=(6.0, 12.0))


SAM2_SIZE = 256


def sam2_video_export(tmp_path_factory) -> tuple[Path, Path]:
    """A random hiera_t at image size 256 exported with its memory graphs (``merge-and-export --video``),
    and the same export without them (the manifest as ``merge-and-export`` writes it without ``--video``);
    made once per test session (test_volume_sam2.py, test_napari_sam2.py)."""
    import torch
    from typer.testing import CliRunner

    from peft_export.cli.main import app
    from peft_export.models.sam2 import random_sam2

    tmp = tmp_path_factory.getbasetemp() / "sam2_video_export"
    export, plain = tmp / "export", tmp / "image_only"
    if (plain / "manifest.json").is_file():
        return export, plain
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({"model": random_sam2("sam2.1_hiera_t", SAM2_SIZE, seed=0).state_dict()}, tmp / "sam2_random.pt")
    res = CliRunner().invoke(app, ["merge-and-export", "--merged", str(tmp / "sam2_random.pt"), "--image-size",
                                   str(SAM2_SIZE), "--video", "-o", str(export), "-q"])
    assert res.exit_code == 0, res.output
    shutil.copytree(export, tmp / "image_only.tmp")
    manifest = json.loads((tmp / "image_only.tmp" / "manifest.json").read_text())
    del manifest["video"]
    for name in ("memory_attention", "memory_encoder", "obj_ptr", "mask_downsample"):
        del manifest["graphs"][name]
    (tmp / "image_only.tmp" / "manifest.json").write_text(json.dumps(manifest))
    (tmp / "image_only.tmp").rename(plain)  # last: its manifest says the pair is complete
    return export, plain


SAM2_TILE_SIZE = 128


def sam2_image_export(tmp_path_factory) -> Path:
    """A random hiera_t at image size 128, image graphs only (``merge-and-export`` of random weights, ~15 s):
    SAM 2's tiles, automatic 3D and tracking (test_sam2_tiled.py, test_volume_sam2_auto.py,
    test_napari_sam2.py); made once per test session."""
    import torch
    from typer.testing import CliRunner

    from peft_export.cli.main import app
    from peft_export.models.sam2 import random_sam2

    tmp = tmp_path_factory.getbasetemp() / "sam2_image_export"
    export = tmp / "export"
    if (export / "manifest.json").is_file():
        return export
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save({"model": random_sam2("sam2.1_hiera_t", SAM2_TILE_SIZE, seed=3).state_dict()}, tmp / "random.pt")
    res = CliRunner().invoke(app, ["merge-and-export", "--merged", str(tmp / "random.pt"), "--image-size",
                                   str(SAM2_TILE_SIZE), "-o", str(tmp / "export.tmp"), "-q"])
    assert res.exit_code == 0, res.output
    (tmp / "export.tmp").rename(export)  # last: a complete export has the name
    return export
