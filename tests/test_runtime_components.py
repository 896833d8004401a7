"""Runtime components against their references: Pillow, torch, segment_anything.

The runtime itself is torch-free; these tests use torch and segment_anything as the
oracle. ``tiny_export`` exports a small random SAM (image size 256) with
torch.onnx so the session can be checked end to end against SamPredictor.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from peft_export.errors import PeftExportError
from peft_export.fsutil import sha256_file
from helpers import fake_cv2, striped_disk_image
from peft_export.runtime import everything as E
from peft_export.runtime import regions as R
from peft_export.runtime.postprocess import postprocess_masks, resize_bilinear
from peft_export.runtime.preprocess import (
    prepare_image,
    preprocess_shape,
    resize_longest_side,
    resize_pil,
    transform_boxes,
    transform_coords,
)
from peft_export.runtime.session import SamSession
from segment_anything.utils import amg
from segment_anything.utils.transforms import ResizeLongestSide

S = 256
G = S // 16
LOW = 4 * G


def _rand_image(rng, h, w, c=3):
    if rng.random() < 0.5:
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = 127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None] + rng.normal(0, 20, (h, w, c))
    return np.clip(smooth, 0, 255).astype(np.uint8)


# ---- preprocessing --------------------------------------------------------------------


def test_preprocess_shape_matches_segment_anything():
    for h, w in [(1, 1), (300, 417), (1024, 1024), (1023, 1), (5, 2000), (777, 779)]:
        for s in (256, 512, 1024):
            assert preprocess_shape(h, w, s) == ResizeLongestSide.get_preprocess_shape(h, w, s)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_numpy_resize_is_bit_exact_with_pillow(interpolation):
    """The fallback for installs without Pillow: Pillow's arithmetic, pixel for pixel."""
    rng = np.random.default_rng(0)
    pil = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    sizes = [((300, 417), (184, 256)), ((50, 40), (256, 205)), ((700, 1000), (717, 1024)), ((7, 3), (256, 110)),
             ((2000, 100), (1024, 51)), ((100, 2000), (51, 1024)), ((150, 100), (100, 200)), ((64, 64), (65, 129)),
             ((600, 300), (256, 128))]  # > 256 lines: several chunks of the other axis
    sizes += [(tuple(rng.integers(1, 120, 2)), tuple(rng.integers(1, 120, 2))) for _ in range(40)]
    for (h, w), (oh, ow) in sizes:
        im = _rand_image(rng, int(h), int(w))
        ref = np.array(Image.fromarray(im).resize((int(ow), int(oh)), pil))
        np.testing.assert_array_equal(resize_pil(im, (oh, ow), interpolation, backend="numpy"), ref)
        np.testing.assert_array_equal(resize_pil(im, (oh, ow), interpolation, backend="pillow"), ref)
    gray = rng.integers(0, 256, (33, 71), dtype=np.uint8)
    ref = np.array(Image.fromarray(gray).resize((40, 20), pil))
    for backend in ("numpy", "pillow"):
        np.testing.assert_array_equal(resize_pil(gray, (20, 40), interpolation, backend=backend), ref)


@pytest.mark.parametrize("backend", ["pillow", "numpy"])
def test_resize_longest_side_matches_apply_image(backend):
    """Both backends against segment_anything's ResizeLongestSide: sizes, aspect ratios, gray and RGB."""
    rng = np.random.default_rng(1)
    shapes = [(300, 417), (97, 61), (256, 256), (600, 129), (20, 30), (1, 5), (900, 1300), (255, 257)]
    for h, w in shapes:
        for im in (_rand_image(rng, h, w), _rand_image(rng, h, w)[..., 0]):  # RGB, gray
            for size in (S, 1024):
                want = ResizeLongestSide(size).apply_image(im)
                got = resize_longest_side(im, size, backend=backend)
                assert got.dtype == np.uint8 and got.shape == want.shape
                np.testing.assert_array_equal(got, want)


def test_resize_other_channel_counts_agree_between_backends():
    rng = np.random.default_rng(5)
    for c in (1, 2, 4):
        im = rng.integers(0, 256, (61, 97, c), dtype=np.uint8)
        a = resize_pil(im, (40, 64), backend="pillow")
        np.testing.assert_array_equal(a, resize_pil(im, (40, 64), backend="numpy"))
        assert a.shape == (40, 64, c)
    with pytest.raises(PeftExportError, match="resize backend"):
        resize_pil(im, (4, 4), backend="cv2")


def test_auto_uses_pillow_when_importable(monkeypatch):
    import peft_export.runtime.preprocess as pre

    calls = []
    monkeypatch.setattr(pre, "_resize_with_pillow", lambda *a: calls.append(a) or np.zeros((2, 2), np.uint8))
    pre.resize_pil(np.zeros((4, 4), np.uint8), (2, 2))
    assert len(calls) == 1  # Pillow is installed here (the bare-venv test covers its absence)
    monkeypatch.setattr(pre, "pillow_available", lambda: False)
    assert pre.resize_pil(np.zeros((4, 4), np.uint8), (2, 2)).shape == (2, 2) and len(calls) == 1


def test_prepare_image_matches_torch_path(tiny_sam):
    rng = np.random.default_rng(2)
    im = _rand_image(rng, 181, 250)
    x, original_size, input_size = prepare_image(im, {"name": "percentile", "low": 1.0, "high": 99.8, "uint8": "keep"}, S)
    t = torch.as_tensor(ResizeLongestSide(S).apply_image(im)).permute(2, 0, 1)[None].float()
    ref = tiny_sam.preprocess(t).numpy()
    assert original_size == (181, 250) and input_size == tuple(t.shape[-2:])
    np.testing.assert_allclose(x, ref, atol=1e-5)


def test_prepare_image_float_and_16bit_inputs():
    rng = np.random.default_rng(3)
    img16 = rng.integers(0, 65535, (90, 70), dtype=np.uint16)
    x, osz, isz = prepare_image(img16, None, S)
    assert x.shape == (1, 3, S, S) and x.dtype == np.float32 and osz == (90, 70) and isz == (256, 199)
    assert np.all(x[..., isz[0]:, :] == 0) and np.all(x[..., isz[1]:] == 0)
    with pytest.raises(PeftExportError):
        prepare_image(np.zeros((4,)), None, S)


def test_transform_coords_and_boxes():
    rng = np.random.default_rng(4)
    t = ResizeLongestSide(S)
    coords = rng.uniform(0, 300, (5, 3, 2))
    boxes = rng.uniform(0, 300, (6, 4))
    np.testing.assert_allclose(transform_coords(coords, (200, 333), S), t.apply_coords(coords, (200, 333)))
    np.testing.assert_allclose(transform_boxes(boxes, (333, 200), S), t.apply_boxes(boxes, (333, 200)))


# ---- postprocessing -------------------------------------------------------------------


def test_resize_bilinear_matches_interpolate():
    rng = np.random.default_rng(5)
    for (h, w), (oh, ow) in [((64, 64), (256, 256)), ((64, 64), (1024, 1024)), ((100, 37), (33, 250)),
                             ((256, 256), (183, 256)), ((5, 7), (5, 7)), ((10, 1), (20, 3))]:
        x = (rng.normal(size=(2, 3, h, w)) * 8).astype(np.float32)
        ref = F.interpolate(torch.from_numpy(x), (oh, ow), mode="bilinear", align_corners=False).numpy()
        assert np.abs(resize_bilinear(x, (oh, ow)) - ref).max() < 1e-4


def test_postprocess_masks_matches_sam(tiny_sam):
    rng = np.random.default_rng(6)
    for original in [(300, 417), (256, 256), (90, 700), (1000, 40)]:
        input_size = preprocess_shape(*original, S)
        low = (rng.normal(size=(1, 3, LOW, LOW)) * 8).astype(np.float32)
        ref = tiny_sam.postprocess_masks(torch.from_numpy(low), input_size, original).numpy()
        out = postprocess_masks(low, input_size, original, S)
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < 1e-4


# ---- segment everything parts -----------------------------------------------------------


def test_point_grid_stability_boxes_nms_match_amg():
    import torchvision

    for n in (1, 4, 32):
        np.testing.assert_allclose(E.build_point_grid(n), amg.build_point_grid(n))
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=(12, 40, 50)) * 3).astype(np.float32)
    logits[3] = -10  # empty mask
    ref = amg.calculate_stability_score(torch.from_numpy(logits), 0.0, 1.0).numpy()
    np.testing.assert_allclose(E.calculate_stability_score(logits, 0.0, 1.0), ref, rtol=1e-6)
    masks = logits > 2.5
    np.testing.assert_array_equal(E.batched_mask_to_box(masks), amg.batched_mask_to_box(torch.from_numpy(masks)).numpy())
    xy = rng.uniform(0, 80, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 40, (200, 2))], 1).astype(np.float32)
    scores = rng.random(200).astype(np.float32)
    for thr in (0.3, 0.7):
        keep = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.zeros(200), thr)
        np.testing.assert_array_equal(E.box_nms(boxes, scores, thr), keep.numpy())


def _blobs(rng, h, w, p=0.5, smooth=3):
    noise = rng.random((h // smooth + 1, w // smooth + 1)) < p
    return np.kron(noise, np.ones((smooth, smooth), bool))[:h, :w] ^ (rng.random((h, w)) < 0.03)


def test_label_components_matches_scipy():
    from scipy import ndimage

    rng = np.random.default_rng(8)
    for shape, p in [((64, 80), 0.5), ((1, 50), 0.5), ((50, 1), 0.5), ((300, 200), 0.3), ((20, 20), 0.0), ((20, 20), 1.0)]:
        m = _blobs(rng, *shape, p=p) if min(shape) > 1 else rng.random(shape) < p
        if p in (0.0, 1.0):
            m = np.full(shape, bool(p))
        labels, sizes = R.label_components(m)
        ref, n = ndimage.label(m, structure=np.ones((3, 3)))
        np.testing.assert_array_equal(labels, ref)
        np.testing.assert_array_equal(sizes, np.bincount(ref.ravel(), minlength=n + 1)[1:])


def test_remove_small_regions_matches_amg(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", fake_cv2())
    rng = np.random.default_rng(9)
    for _ in range(12):
        m = _blobs(rng, 90, 120, p=float(rng.uniform(0.2, 0.8)))
        for mode in ("holes", "islands"):
            for area in (5, 40, 10_000):
                out, changed = R.remove_small_regions(m, area, mode)
                ref, ref_changed = amg.remove_small_regions(m, area, mode)
                assert changed == ref_changed
                np.testing.assert_array_equal(out, ref)


def test_segment_everything_on_synthetic_objects():
    original = (200, 300)
    input_size = preprocess_shape(*original, S)
    yy, xx = np.mgrid[0 : original[0], 0 : original[1]]
    objects = [((yy - 50) ** 2 + (xx - 60) ** 2 < 30**2), (np.abs(yy - 140) < 35) & (np.abs(xx - 200) < 60),
               ((yy - 150) ** 2 + (xx - 50) ** 2 < 20**2), (np.abs(yy - 40) < 12) & (np.abs(xx - 230) < 40)]
    objects.append(((yy - 140) ** 2 + (xx - 200) ** 2 < 15**2))  # a nucleus inside object 1
    scale = S / max(original)
    lyy, lxx = np.mgrid[0:LOW, 0:LOW]
    # Low-res logits of each object: its indicator at the original size, mapped to the low-res frame.
    oy = np.clip(((lyy + 0.5) * 4 / scale).astype(int), 0, original[0] - 1)
    ox = np.clip(((lxx + 0.5) * 4 / scale).astype(int), 0, original[1] - 1)
    inside = (lyy * 4 < input_size[0]) & (lxx * 4 < input_size[1])
    lows = [np.where(o[oy, ox] & inside, 30.0, -30.0).astype(np.float32) for o in objects]
    calls = []

    def decode(points, labels):
        assert points.shape[1:] == (1, 2) and labels.shape == (len(points), 1)
        calls.append(len(points))
        low = np.full((len(points), 4, LOW, LOW), -30.0, np.float32)
        iou = np.full((len(points), 4), 0.2, np.float32)
        for i, (x, y) in enumerate(points[:, 0] / scale):
            hit = [k for k, o in enumerate(objects) if o[min(int(y), original[0] - 1), min(int(x), original[1] - 1)]]
            if hit:
                k = hit[-1]
                low[i, 1:] = lows[k]
                iou[i, 1:] = [0.99, 0.95, 0.9]
        return low, iou

    labels, records = E.segment_everything(decode, original, input_size, S, points_per_side=16, points_per_batch=40)
    assert calls == [40] * 6 + [16]
    assert labels.shape == original and labels.dtype == np.int32
    assert len(records) == len(objects)
    # What the decoder's masks become at full size; they are coarse versions of the objects.
    expected = [postprocess_masks(low, input_size, original, S) > 0 for low in lows]
    for k, obj in enumerate(expected):
        assert (obj & objects[k]).sum() / (obj | objects[k]).sum() > 0.8
        # Smaller masks are painted on top of larger ones.
        visible = obj & ~np.any([o for o in expected if o.sum() < obj.sum()], axis=0)
        lab = np.bincount(labels[visible]).argmax()
        assert lab > 0
        np.testing.assert_array_equal(labels == lab, visible)
        assert records[lab - 1]["area"] == obj.sum()
    # The nucleus is painted on top of the larger object that contains it.
    assert labels[140, 200] != labels[110, 150] and labels[110, 150] > 0
    for r in records:
        x, y, w, h = r["bbox"]
        assert 0 <= x and 0 <= y and x + w < original[1] and y + h < original[0]
        assert r["predicted_iou"] > 0.88 and r["stability_score"] >= 0.95


# ---- session -------------------------------------------------------------------------------


def _build_tiny_sam():
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=4, embed_dim=64, img_size=S, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=4, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1, 3),
            window_size=7, out_chans=256,
        ),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(G, G), input_image_size=(S, S), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    # Random weights give logits of about +-0.3; scale them so masks and stability scores mean something.
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
            mlp.layers[-1].bias.mul_(30.0)
    return sam


class _LowResDecoder(torch.nn.Module):
    """Prompt encoder + mask decoder for B prompt sets on one embedding; no postprocessing."""

    def __init__(self, sam):
        super().__init__()
        from segment_anything.utils.onnx import SamOnnxModel

        self.meta = SamOnnxModel(sam, return_single_mask=False)
        self.sam = sam

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        pe = self.sam.prompt_encoder
        sparse = self.meta._embed_points(point_coords, point_labels)
        has = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has * pe.mask_downscaling(mask_input) + (1 - has) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return self.sam.mask_decoder.predict_masks(image_embeddings, pe.get_dense_pe(), sparse, dense)


@pytest.fixture(scope="module")
def tiny_sam():
    return _build_tiny_sam()


def _io(name, shape, dtype="float32"):
    return {"name": name, "shape": shape, "dtype": dtype}


def _write_export(d: Path, graphs: dict, files: dict) -> None:
    manifest = {
        "format": "peftexport-export", "format_version": 1, "peftexport_version": "0.1.0",
        "model_type": "tiny", "image_size": S, "embedding_shape": [256, G, G], "low_res_size": LOW,
        "preprocessing": {"pixel_mean": [123.675, 116.28, 103.53], "pixel_std": [58.395, 57.12, 57.375],
                          "resize": "longest_side", "interpolation": "bilinear",
                          "pad": "bottom_right_zeros_after_normalize",
                          "intensity": {"name": "percentile", "low": 1.0, "high": 99.8, "uint8": "keep"}},
        "peft": None, "merged": True, "in_graph_adapters": [],
        "graphs": {g: {"fp32": {"path": files[g], "sha256": sha256_file(d / files[g]), **graphs[g]}} for g in graphs},
        "versions": {"torch": torch.__version__}, "created": "test",
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="module")
def tiny_export(tiny_sam, tmp_path_factory):
    """Two export dirs of the same tiny model: with decoder_lowres, and Meta decoder only."""
    from segment_anything.utils.onnx import SamOnnxModel

    root = tmp_path_factory.mktemp("export")
    full, meta_only = root / "full", root / "meta"
    full.mkdir()
    meta_only.mkdir()
    kw = dict(opset_version=17, dynamo=False)
    with torch.no_grad():
        torch.onnx.export(tiny_sam.image_encoder, torch.randn(1, 3, S, S), str(full / "encoder.onnx"),
                          input_names=["image"], output_names=["image_embeddings"], **kw)
        emb = torch.randn(1, 256, G, G)
        torch.onnx.export(
            SamOnnxModel(tiny_sam, return_single_mask=False),
            (emb, torch.rand(1, 3, 2) * S, torch.tensor([[1.0, 0.0, -1.0]]), torch.zeros(1, 1, LOW, LOW),
             torch.ones(1), torch.tensor([300.0, 200.0])),
            str(full / "decoder.onnx"),
            input_names=["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"],
            output_names=["masks", "iou_predictions", "low_res_masks"],
            dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
            **kw,
        )
        torch.onnx.export(
            _LowResDecoder(tiny_sam),
            (emb, torch.rand(2, 3, 2) * S, torch.tensor([[1.0, 0.0, -1.0], [1.0, 2.0, 3.0]]),
             torch.zeros(2, 1, LOW, LOW), torch.zeros(2)),
            str(full / "decoder_lowres.onnx"),
            input_names=["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input"],
            output_names=["low_res_masks", "iou_predictions"],
            dynamic_axes={"point_coords": {0: "batch", 1: "num_points"}, "point_labels": {0: "batch", 1: "num_points"},
                          "mask_input": {0: "batch"}, "has_mask_input": {0: "batch"},
                          "low_res_masks": {0: "batch"}, "iou_predictions": {0: "batch"}},
            **kw,
        )
    for f in ("encoder.onnx", "decoder.onnx"):
        (meta_only / f).write_bytes((full / f).read_bytes())
    enc = {"inputs": [_io("image", [1, 3, S, S])], "outputs": [_io("image_embeddings", [1, 256, G, G])]}
    dec = {"inputs": [_io("image_embeddings", [1, 256, G, G]), _io("point_coords", [1, "num_points", 2])],
           "outputs": [_io("masks", [1, 4, "H", "W"])]}
    low = {"inputs": [_io("image_embeddings", [1, 256, G, G])], "outputs": [_io("low_res_masks", ["batch", 4, LOW, LOW])]}
    files = {"encoder": "encoder.onnx", "decoder": "decoder.onnx", "decoder_lowres": "decoder_lowres.onnx"}
    _write_export(full, {"encoder": enc, "decoder": dec, "decoder_lowres": low}, files)
    _write_export(meta_only, {"encoder": enc, "decoder": dec}, files)
    return full, meta_only


@pytest.fixture(scope="module")
def predictor_and_image(tiny_sam):
    from segment_anything import SamPredictor

    image = striped_disk_image()
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)
    return predictor, image


@pytest.fixture(scope="module")
def sessions(tiny_export, predictor_and_image):
    _, image = predictor_and_image
    out = []
    for d in tiny_export:
        sess = SamSession(d, device="cpu", verify_checksums=True)
        sess.set_image(image)
        out.append(sess)
    return out


def _iou(a, b):
    union = (a | b).sum()
    return 1.0 if union == 0 else (a & b).sum() / union


PROMPTS = [
    dict(point_coords=np.array([[120.0, 90.0]]), point_labels=np.array([1])),
    dict(point_coords=np.array([[60.0, 40.0], [200.0, 150.0], [121.0, 95.0]]), point_labels=np.array([1, 0, 1])),
    dict(box=np.array([70.0, 40.0, 175.0, 140.0])),
    dict(point_coords=np.array([[120.0, 90.0], [10.0, 10.0]]), point_labels=np.array([1, 0]), box=np.array([60, 30, 180, 150])),
]


def test_session_embedding_matches_predictor(sessions, predictor_and_image):
    predictor, _ = predictor_and_image
    ref = predictor.get_image_embedding().numpy()
    for sess in sessions:
        emb = sess.get_image_embedding()
        assert emb.shape == (1, 256, G, G)
        assert np.abs(emb - ref).max() < 1e-4


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
@pytest.mark.parametrize("multimask", [True, False])
def test_session_predict_matches_predictor(sessions, predictor_and_image, prompt, multimask):
    predictor, _ = predictor_and_image
    kwargs = PROMPTS[prompt]
    ref_masks, ref_iou, ref_low = predictor.predict(**kwargs, multimask_output=multimask, return_logits=True)
    # Feeding the low-res logits back exercises mask_input.
    ref_masks2, ref_iou2, _ = predictor.predict(**kwargs, mask_input=ref_low[:1], multimask_output=multimask, return_logits=True)
    for sess in sessions:
        logits, iou, low = sess.predict(**kwargs, multimask_output=multimask, return_logits=True)
        assert logits.shape == ref_masks.shape and iou.shape == ref_iou.shape and low.shape == ref_low.shape
        assert np.abs(logits - ref_masks).max() < 1e-3 and np.abs(iou - ref_iou).max() < 1e-4
        masks, _, _ = sess.predict(**kwargs, multimask_output=multimask)
        assert masks.dtype == bool
        for m, r in zip(masks, ref_masks > 0):
            assert _iou(m, r) >= 0.99
        masks2, iou2, _ = sess.predict(**kwargs, mask_input=low[:1], multimask_output=multimask)
        assert np.abs(iou2 - ref_iou2).max() < 1e-3
        for m, r in zip(masks2, ref_masks2 > 0):
            assert _iou(m, r) >= 0.99


def test_predict_batch_matches_predictor(sessions, predictor_and_image):
    predictor, _ = predictor_and_image
    boxes = np.array([[70.0, 40.0, 175.0, 140.0], [0, 0, 100, 100], [150, 20, 249, 180]])
    points = np.array([[[120.0, 90.0]], [[30, 30]], [[200, 100]]])
    labels = np.ones((3, 1))
    t = predictor.transform
    ref_masks, ref_iou, _ = predictor.predict_torch(
        torch.as_tensor(t.apply_coords(points, (181, 250)), dtype=torch.float), torch.as_tensor(labels),
        torch.as_tensor(t.apply_boxes(boxes, (181, 250)), dtype=torch.float), multimask_output=False, return_logits=True,
    )
    for sess in sessions:
        masks, iou, low = sess.predict_batch(boxes=boxes, points=points, point_labels=labels, return_logits=True)
        assert masks.shape == (3, 1, 181, 250) and iou.shape == (3, 1) and low.shape == (3, 1, LOW, LOW)
        assert np.abs(masks - ref_masks.numpy()).max() < 1e-3
        assert np.abs(iou - ref_iou.numpy()).max() < 1e-4
        only_boxes, _, _ = sess.predict_batch(boxes=boxes, multimask_output=True)
        assert only_boxes.shape == (3, 3, 181, 250) and only_boxes.dtype == bool


def test_session_segment_everything_matches_amg(sessions, predictor_and_image, tiny_sam):
    from segment_anything import SamAutomaticMaskGenerator

    _, image = predictor_and_image
    kw = dict(points_per_side=6, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.6, box_nms_thresh=0.7)
    ref = SamAutomaticMaskGenerator(tiny_sam, **kw).generate(image)
    labels, records = sessions[0].segment_everything(**kw)
    assert labels.shape == image.shape[:2] and labels.dtype == np.int32
    assert abs(len(records) - len(ref)) <= max(1, len(ref) // 10)
    matched = 0
    for r in ref:
        for rec in records:
            if rec["bbox"] == [int(v) for v in r["bbox"]] and abs(rec["area"] - r["area"]) <= max(3, r["area"] // 100):
                matched += 1
                break
    assert matched >= 0.9 * len(ref)
    assert len(ref) > 0


def test_session_threads_with_separate_embeddings(sessions, predictor_and_image):
    sess = sessions[0]
    _, image = predictor_and_image
    other = np.ascontiguousarray(image[::-1, ::-1])
    embs = [sess.encode(image), sess.encode(other)]
    expected = [sess.predict(**PROMPTS[0], embedding=e)[1] for e in embs]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = sess.predict(**PROMPTS[0], embedding=embs[i % 2])[1]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for i in range(4):
        np.testing.assert_allclose(results[i], expected[i % 2], atol=1e-6)


def test_session_describe_and_errors(tiny_export, tmp_path, sessions):
    full, meta_only = tiny_export
    d = sessions[0].describe()
    assert d["providers"] == ["CPUExecutionProvider"] and d["decoder_used"] == "decoder_lowres"
    assert d["graphs"]["encoder"]["precision"] == "fp32"
    assert sessions[1].describe()["decoder_used"] == "decoder"
    sess = SamSession(full)
    with pytest.raises(PeftExportError, match="set_image"):
        sess.predict(**PROMPTS[0])
    sess.set_image(np.zeros((40, 60), np.uint16))
    with pytest.raises(PeftExportError, match="outside"):
        sess.predict(point_coords=np.array([[61.0, 10.0]]), point_labels=np.array([1]))
    with pytest.raises(PeftExportError, match="shape"):
        sess.predict(point_coords=np.array([1.0, 2.0]), point_labels=np.array([1]))
    with pytest.raises(PeftExportError, match="point_labels"):
        sess.predict(point_coords=np.array([[1.0, 2.0]]), point_labels=np.array([1, 1]))
    with pytest.raises(PeftExportError, match="x0 <= x1"):
        sess.predict(box=np.array([30, 5, 10, 20]))
    with pytest.raises(PeftExportError, match="mask_input"):
        sess.predict(**PROMPTS[0] | {"point_coords": np.array([[5.0, 5.0]])}, mask_input=np.zeros((1, 8, 8)))
    with pytest.raises(PeftExportError, match="no manifest"):
        SamSession(tmp_path)
    with pytest.raises(PeftExportError, match="no int8 encoder"):
        SamSession(full, precision="int8")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(PeftExportError, match="onnxruntime-gpu"):
            SamSession(full, device="cuda")
    newer = tmp_path / "newer"
    newer.mkdir()
    m = json.loads((full / "manifest.json").read_text())
    m["format_version"], m["peftexport_version"] = 3, "9.0.0"
    (newer / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PeftExportError, match="peftexport 9.0.0, format 3; this runtime reads formats up to 2"):
        SamSession(newer)
    with pytest.raises(PeftExportError, match="tensorrt"):
        SamSession(full, backend="tensorrt", device="cuda")


def test_runtime_imports_without_torch():
    code = (
        "import sys\n"
        "for m in ('torch', 'torchvision', 'segment_anything', 'onnx', 'scipy', 'PIL'):\n"
        "    sys.modules[m] = None\n"
        "import peft_export.runtime as r\n"
        "import peft_export.runtime.session, peft_export.runtime.everything\n"
        "print(sorted(r.__all__))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr


def test_predict_without_masks_then_upsample_only_the_best(sessions):
    # what the napari widget does per click: low-res logits of three masks, only the shown one upsampled
    for sess in sessions:
        for prompt in PROMPTS:
            masks, iou, low = sess.predict(**prompt, return_logits=True)
            none, iou2, low2 = sess.predict(**prompt, masks=False)
            assert none is None
            np.testing.assert_array_equal(iou2, iou)
            np.testing.assert_array_equal(low2, low)
            best = int(np.argmax(iou))
            np.testing.assert_array_equal(sess.upsample_masks(low[best:best + 1])[0], masks[best])


def test_postprocess_masks_one_at_a_time_equals_the_stack():
    low = np.random.default_rng(5).normal(size=(2, 3, 64, 64)).astype(np.float32)
    out = postprocess_masks(low, (200, 150), (400, 300), 256)
    assert out.shape == (2, 3, 400, 300)
    # the whole stack through the same two resizes at once (what it computed before looping per mask)
    whole = resize_bilinear(resize_bilinear(low, (256, 256), crop_hw=(200, 150)), (400, 300))
    np.testing.assert_array_equal(out, whole)
