"""finetune --cache-embeddings: training on kept embeddings is training as before (same adapter, same
validation), each view is encoded once, a store makes a resumed run encode less, and a trainable
encoder is refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_export.data import make_demo_data
from peft_export.errors import PeftExportError
from peft_export.training import TrainConfig, finetune


def _config(tmp_path, name: str, **kw) -> TrainConfig:
    base = dict(out=str(tmp_path / name), data=str(tmp_path / "data"), model_type="tiny", image_size=128,
                peft="lora", blocks="none", targets=("dec.all",), decoder_rank=4, patch_size=96, iterations=4,
                val_every=2, val_fraction=0.25, objects_per_image=4, sub_iterations=1, lr=1e-3, progress=False,
                device="cpu")
    return TrainConfig(**{**base, **kw})


def _adapter(tmp_path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(tmp_path / name / "adapter.safetensors"))


def _val(tmp_path, name: str) -> list[dict]:
    lines = (tmp_path / name / "train_log.jsonl").read_text().splitlines()
    return [{k: v for k, v in e["metrics"].items() if k != "seconds"} for e in map(json.loads, lines) if e["type"] == "val"]


@pytest.mark.slow  # four short tiny-model runs
def test_cached_embeddings_train_like_encoding_every_step(tmp_path):
    make_demo_data(tmp_path / "data", n_images=5, size=96, seed=3)
    finetune(_config(tmp_path, "plain"))
    cached = finetune(_config(tmp_path, "cached", cache_embeddings=True))
    a, b = _adapter(tmp_path, "plain"), _adapter(tmp_path, "cached")
    assert a.keys() == b.keys() and all(k.startswith("mask_decoder.") or k.startswith("prompt_encoder.") for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    for plain, cached_val in zip(_val(tmp_path, "plain"), _val(tmp_path, "cached"), strict=True):
        assert plain == pytest.approx(cached_val, rel=1e-4)
    # 4 training draws from 4 images with flips/rotations, 1 validation image scored 3 times: encoded once.
    emb = cached["embeddings"]
    assert emb["encoded"] + emb["reused"] == 4 + 3 and emb["encoded"] <= 4 + 1 and emb["reused"] >= 2

    # A run cut in two with an embedding store: the same adapter, and the second half encodes less.
    store = tmp_path / "store"
    first = finetune(_config(tmp_path, "resumed", cache_embeddings=True, embedding_store=str(store), iterations=2))
    files = sorted(p.name for p in store.iterdir())
    assert len(files) == first["embeddings"]["encoded"] and all(f.endswith(".npy") for f in files)
    second = finetune(_config(tmp_path, "resumed", cache_embeddings=True, embedding_store=str(store), resume=True))
    assert second["steps"] == 4
    assert second["embeddings"]["encoded"] < emb["encoded"]
    c = _adapter(tmp_path, "resumed")
    for k in a:
        assert torch.allclose(b[k], c[k], rtol=1e-4, atol=1e-6), k


def test_a_trainable_encoder_is_refused_before_anything_is_written(tmp_path):
    make_demo_data(tmp_path / "data", n_images=2, size=96, seed=3)
    with pytest.raises(PeftExportError, match="--cache-embeddings: the image encoder trains.*--blocks none"):
        finetune(_config(tmp_path, "run", blocks="late", targets=("q", "v"), cache_embeddings=True))
    assert not (tmp_path / "run").exists()


def test_images_larger_than_the_patch_become_fixed_tiles_covering_them():
    import numpy as np

    from peft_export.data import Sample
    from peft_export.training.embedding_cache import fixed_tiles

    label = np.zeros((250, 170), np.int32)
    label[5:25, 5:25] = 1  # top left
    label[220:245, 140:165] = 2  # bottom right corner
    image = np.random.default_rng(0).random((250, 170, 3)).astype(np.float32)
    small = Sample("small", image[:80, :80], label[:80, :80])
    tiles = fixed_tiles([Sample("big", image, label), small], patch_size=100, min_object_size=25)
    assert tiles[-1] is small  # fits a patch: kept as it is
    big = tiles[:-1]
    assert all(t.label.shape == (100, 100) for t in big)
    # Every object is whole in some tile; tiles without an object are left out; the same tiles every time.
    for obj in (1, 2):
        assert any((t.label == obj).sum() == (label == obj).sum() for t in big)
    assert all(t.label.any() for t in big)
    assert [t.name for t in big] == [t.name for t in fixed_tiles([Sample("big", image, label)], 100, 25)]
    corner = next(t for t in big if t.name == "big@150,70")  # the last tile ends at the image's edge
    assert np.array_equal(corner.image, image[150:250, 70:170])


def test_the_cache_key_follows_every_encoder_weight_of_vit_t():
    """TinyViT has BatchNorm (0-d step counters among its buffers) and is what the napari loop uses."""
    from peft_export.models import random_sam
    from peft_export.training.embedding_cache import encoder_digest

    sam = random_sam("vit_t", 256, seed=0)
    first = encoder_digest(sam)
    assert encoder_digest(random_sam("vit_t", 256, seed=0)) == first
    with torch.no_grad():
        next(iter(sam.image_encoder.parameters())).view(-1)[0] += 1e-3
    assert encoder_digest(sam) != first
