"""Segment-everything against SamAutomaticMaskGenerator: bit-exact upsampling and thresholds, identical
records for the same decoder outputs (dozens of them), the split decoder graphs of a real export, bounded
memory on a 4000x4000 image, and the per-filter counts behind `predict --everything`'s hint."""

from __future__ import annotations

import sys
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from helpers import fake_cv2
from peft_export.runtime import everything as E
from peft_export.runtime.mask_runs import MaskRuns, threshold_upsampled
from peft_export.runtime.postprocess import MaskUpsampler, fma32
from peft_export.runtime.preprocess import preprocess_shape

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow

S = 256
LOW = S // 4


@pytest.fixture(autouse=True)
def torch_threads():
    """torch resizes 3-channel masks with another kernel (other rounding) when it runs one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def _torch_postprocess(low: np.ndarray, input_size, original_size, image_size=S) -> np.ndarray:
    x = torch.nn.functional.interpolate(torch.from_numpy(low), (image_size, image_size), mode="bilinear",
                                        align_corners=False)[..., : input_size[0], : input_size[1]]
    return torch.nn.functional.interpolate(x, original_size, mode="bilinear", align_corners=False).numpy()


def _assert_same_records(records, ref):
    """Every field of every record equal, in the same order (floats exactly)."""
    assert len(records) == len(ref)
    for rec, r in zip(records, ref):
        assert rec["point_coords"] == r["point_coords"]
        assert rec["bbox"] == [int(v) for v in r["bbox"]]
        assert rec["area"] == r["area"]
        assert rec["predicted_iou"] == r["predicted_iou"]
        assert rec["stability_score"] == r["stability_score"]
        np.testing.assert_array_equal(rec["segmentation"], r["segmentation"])


def _painted(ref, shape):
    expected = np.zeros(shape, np.int32)
    for k in np.argsort([-r["area"] for r in ref], kind="stable"):
        expected[ref[k]["segmentation"]] = k + 1
    return expected


# ---- exact arithmetic -------------------------------------------------------------------------


def test_fma32_rounds_once():
    rng = np.random.default_rng(0)
    a = rng.normal(size=3000).astype(np.float32)
    b = rng.uniform(0, 1, 3000).astype(np.float32)
    c = (rng.normal(size=3000) * np.float32(2.0) ** rng.integers(-30, 10, 3000)).astype(np.float32)
    c[:1000] = -(a[:1000] * b[:1000])  # heavy cancellation
    out = fma32(a, b, c)
    for x, y, z, r in zip(a, b, c, out):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        err = abs(Fraction(float(r)) - exact)
        for n in (np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf))):
            assert err <= abs(Fraction(float(n)) - exact)  # no float32 closer than the result


GEOMETRIES = [(256, (150, 220)), (256, (256, 256)), (256, (512, 300)), (512, (512, 512)), (1024, (512, 512)),
              (256, (1000, 40)), (256, (37, 91)), (256, (60, 60)), (512, (700, 333))]


@pytest.mark.parametrize("image_size,original", GEOMETRIES)
def test_upsampler_is_bit_exact_with_torch(image_size, original):
    rng = np.random.default_rng(1)
    low = (rng.normal(size=(2, 1, image_size // 4, image_size // 4)) * 8).astype(np.float32)
    input_size = preprocess_shape(*original, image_size)
    ref = _torch_postprocess(low, input_size, original, image_size)
    up = MaskUpsampler(image_size // 4, input_size, original, image_size)
    for k in range(2):
        np.testing.assert_array_equal(up.exact_full(low[k, 0]), ref[k, 0])
        fast = up.plain(low[k, 0], (0, original[0]), (0, original[1]))
        assert np.abs(fast - ref[k, 0]).max() <= 1e-6 * np.abs(low).max()


def _blobs(rng, n, size):
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(1, size / 4)
        out.append(2.5 * (r - np.hypot(yy - cy, xx - cx)) + rng.normal(0, 1.5, (size, size)))
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("image_size,original", GEOMETRIES)
def test_threshold_counts_and_mask_equal_torch(image_size, original):
    rng = np.random.default_rng(2)
    lows = _blobs(rng, 8, image_size // 4)
    # Values a few ulps around the thresholds: float32 rounding decides these pixels.
    lows[0] = 1.0 + rng.normal(0, 2e-7, lows[0].shape)
    lows[1] = rng.normal(0, 1e-7, lows[1].shape)
    input_size = preprocess_shape(*original, image_size)
    ref = _torch_postprocess(lows[:, None], input_size, original, image_size)[:, 0]
    up = MaskUpsampler(image_size // 4, input_size, original, image_size)
    for low, r in zip(lows, ref):
        counts, runs = threshold_upsampled(up, low, (1.0, -1.0), 0.0)
        assert list(counts) == [int((r > 1).sum()), int((r > -1).sum())]
        np.testing.assert_array_equal(runs.to_mask(original), r > 0)
        assert runs.area == int((r > 0).sum())
        np.testing.assert_array_equal(runs.box(), E.batched_mask_to_box(r > 0))


def test_float32_alone_would_miscount_near_thresholds():
    """Why the exact recomputation exists: plain float32 values flip pixels at the thresholds."""
    rng = np.random.default_rng(3)
    input_size, original = preprocess_shape(300, 417, S), (300, 417)
    up = MaskUpsampler(LOW, input_size, original, S)
    flips = 0
    for _ in range(5):
        low = (1.0 + rng.normal(0, 2e-7, (LOW, LOW))).astype(np.float32)
        ref = _torch_postprocess(low[None, None], input_size, original)[0, 0]
        flips += int(((up.plain(low, (0, 300), (0, 417)) > 1) != (ref > 1)).sum())
        assert threshold_upsampled(up, low, (1.0, -1.0), 0.0)[0][0] == int((ref > 1).sum())
    assert flips > 0


# ---- the same decoder outputs through SamAutomaticMaskGenerator -----------------------------------


def _disc_decoder(seed: int, low_size: int = LOW):
    """A deterministic decoder stand-in: noisy discs around each point (holes, islands, overlaps)."""
    rng = np.random.default_rng(seed)
    noise = np.stack([np.kron(rng.normal(size=(low_size // 4, low_size // 4)), np.ones((4, 4))) for _ in range(4)])
    ly, lx = np.mgrid[0:low_size, 0:low_size] + 0.5

    def decode(points, labels):
        low = np.empty((len(points), 4, low_size, low_size), np.float32)
        iou = np.empty((len(points), 4), np.float32)
        for i, (x, y) in enumerate(np.asarray(points)[:, 0].astype(np.float64) / 4):
            d = np.hypot(lx - x, ly - y)
            for j, r in enumerate((6, 4, 9, 14)):
                low[i, j] = 2.0 * (r - d) + 3.0 * noise[j]
                iou[i, j] = 0.75 + 0.125 * (1.0 + np.sin(0.9 * x + 1.7 * y + 2.1 * j))
        return low, iou

    return decode


def _generator_on(decode, sam, monkeypatch, original, **kw):
    """SamAutomaticMaskGenerator whose predictor returns ``decode``'s outputs, upsampled by torch."""
    gen = SamAutomaticMaskGenerator(sam, **kw)
    input_size = preprocess_shape(*original, S)

    def predict_torch(point_coords, point_labels, multimask_output=True, return_logits=True):
        low, iou = decode(point_coords.numpy(), point_labels.numpy())
        low_t = torch.from_numpy(low[:, 1:])
        return sam.postprocess_masks(low_t, input_size, original), torch.from_numpy(iou[:, 1:]), low_t

    monkeypatch.setattr(gen.predictor, "set_image", lambda image: None)
    monkeypatch.setattr(gen.predictor, "predict_torch", predict_torch)
    return gen.generate(np.zeros((*original, 3), np.uint8)), input_size


@pytest.mark.parametrize("original,min_area", [((150, 220), 0), ((150, 220), 60), ((300, 180), 40), ((50, 70), 0)])
def test_records_identical_to_generator_on_same_decoder_outputs(merged_model, monkeypatch, original, min_area):
    monkeypatch.setitem(sys.modules, "cv2", fake_cv2())
    decode = _disc_decoder(11)
    kw = dict(points_per_side=12, points_per_batch=32, pred_iou_thresh=0.8, stability_score_thresh=0.7,
              box_nms_thresh=0.6, min_mask_region_area=min_area)
    ref, input_size = _generator_on(decode, merged_model, monkeypatch, original, **kw)
    labels, records = E.segment_everything(decode, original, input_size, S, return_masks=True, **kw)
    assert len(ref) >= 20  # dozens of records, every filter active
    removed = records.summary["removed"]
    assert removed["pred_iou"] > 0 and removed["stability"] > 0 and removed["nms"] > 0
    _assert_same_records(records, ref)
    np.testing.assert_array_equal(labels, _painted(ref, original))


class TorchDecoder:
    """segment_anything's own prompt encoder + mask decoder, fed exactly as the generator feeds them."""

    def __init__(self, sam, image):
        self.predictor = SamPredictor(sam)
        self.predictor.set_image(image)

    def prompts(self, coords, labels):
        with torch.no_grad():
            _, iou, low = self.predictor.predict_torch(
                torch.as_tensor(coords), torch.as_tensor(labels).int(), multimask_output=True, return_logits=True)
        b = len(coords)
        low = np.concatenate([np.zeros((b, 1, *low.shape[-2:]), np.float32), low.numpy()], axis=1)
        return np.concatenate([np.zeros((b, 1), np.float32), iou.numpy()], axis=1), low

    def masks(self, state, index):
        return state[index]


def _random_model():
    """Tiny SAM + random LoRA, merged. Random decoders give logits of about +-1 and negative IoU
    predictions: the hypernetwork outputs are scaled and the IoU head shifted so that masks,
    stability scores and the IoU filter mean something."""
    from helpers import MERGEABLE_CONFIGS, make_adapted

    adapted = make_adapted(MERGEABLE_CONFIGS["lora"])
    with torch.no_grad():
        for mlp in adapted.model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
            mlp.layers[-1].bias.mul_(30.0)
        adapted.model.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.6)
    return adapted


@pytest.fixture(scope="module")
def random_model():
    return _random_model()


@pytest.fixture(scope="module")
def merged_model(random_model):
    from peft_export.peft import merge_peft

    return merge_peft(random_model.model).eval()


def _nuclei_image():
    from peft_export.data.synthetic import synthetic_sample

    img, _ = synthetic_sample(256, seed=3)
    return np.repeat((img / img.max() * 255).astype(np.uint8)[..., None], 3, -1)[:200]


# The random model's masks are large blobs with near-identical boxes: NMS at 0.7 would leave one.
# With NMS off the comparison covers every candidate that passes the IoU and stability filters.
MODEL_OPTIONS = dict(points_per_side=12, points_per_batch=48, pred_iou_thresh=0.3, stability_score_thresh=0.8,
                     box_nms_thresh=1.0)


def test_records_identical_to_generator_on_random_model(merged_model):
    image = _nuclei_image()
    ref = SamAutomaticMaskGenerator(merged_model, **MODEL_OPTIONS).generate(image)
    input_size = preprocess_shape(*image.shape[:2], S)
    labels, records = E.segment_everything(TorchDecoder(merged_model, image), image.shape[:2], input_size, S,
                                           return_masks=True, **MODEL_OPTIONS)
    assert len(ref) >= 40
    assert records.summary["removed"]["pred_iou"] > 0 and records.summary["removed"]["stability"] > 0
    _assert_same_records(records, ref)
    np.testing.assert_array_equal(labels, _painted(ref, image.shape[:2]))


# ---- a real export: split decoder graphs and decoder_lowres -----------------------------------------


@pytest.fixture(scope="module")
def export(random_model, tmp_path_factory):
    from peft_export.export import merge_and_export

    out = tmp_path_factory.mktemp("everything") / "export"
    # --meta-decoder: decoder_lowres too, the path of older exports compared with the split graphs below
    merge_and_export(random_model, out, precisions=("fp32",), progress=False, meta_decoder=True)
    return out


def test_export_has_verified_split_decoder(export):
    import json

    graphs = json.loads((export / "manifest.json").read_text())["graphs"]
    for name in ("split_image", "split_prompts", "split_masks"):
        # what the chain computes is measured against SamAutomaticMaskGenerator in
        # test_session_matches_generator_through_onnx, not read back from the export's own record
        assert graphs[name]["fp32"]["verified_on"][0] == "onnxruntime"
        assert (export / graphs[name]["fp32"]["path"]).is_file()


def test_split_decoder_verification_refuses_a_wrong_graph(random_model, tmp_path):
    """The chain is checked against segment_anything's decoder: a mask graph from other weights fails."""
    import copy

    from peft_export.export.split_decoder import SPLIT_GRAPHS, export_split_graph, verify_split_decoder
    from peft_export.export.verify import build_reference

    model = random_model.model.eval()
    reference = build_reference(model)
    for name in SPLIT_GRAPHS:
        export_split_graph(model, tmp_path / f"{name}.onnx", name)
    assert verify_split_decoder(tmp_path, reference)["passed"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.mask_decoder.output_upscaling[3].weight.mul_(1.01)  # 1 % off: far above float rounding
    export_split_graph(other, tmp_path / "split_masks.onnx", "split_masks")
    parity = verify_split_decoder(tmp_path, reference)
    assert not parity["passed"] and any("mask_logits_max_rel" in f for f in parity["failures"])


@pytest.mark.slow  # SamAutomaticMaskGenerator in torch, twice
@pytest.mark.parametrize("decoder", ["split", "lowres"])
def test_session_matches_generator_through_onnx(export, merged_model, decoder):
    from peft_export.runtime import SamSession

    session = SamSession(export)
    image = _nuclei_image()
    ref = SamAutomaticMaskGenerator(merged_model, **MODEL_OPTIONS).generate(image)
    labels, records = session.segment_everything(embedding=session.encode(image), return_masks=True,
                                                 decoder=decoder, **MODEL_OPTIONS)
    # ONNX Runtime's decoder differs from torch's by float rounding: a candidate right at a
    # threshold may go either way, and a few pixels within rounding of 0 may flip.
    assert len(ref) >= 40 and abs(len(records) - len(ref)) <= 1
    by_point = {(tuple(r["point_coords"][0]), r["predicted_iou"]): r for r in ref}
    matched = 0
    for rec in records:
        r = next((v for (p, iou), v in by_point.items()
                  if p == tuple(rec["point_coords"][0]) and abs(iou - rec["predicted_iou"]) < 1e-4), None)
        if r is None:
            continue
        matched += 1
        assert abs(rec["stability_score"] - r["stability_score"]) < 1e-3
        assert (rec["segmentation"] != r["segmentation"]).sum() <= 5
    assert matched >= len(ref) - 1


def test_split_and_lowres_decoders_agree_and_old_exports_fall_back(export, tmp_path):
    import json
    import shutil

    from peft_export.runtime import SamSession

    image = _nuclei_image()
    session = SamSession(export)
    emb = session.encode(image)
    kw = dict(MODEL_OPTIONS, embedding=emb)
    split = session.segment_everything(decoder="split", **kw)
    lowres = session.segment_everything(decoder="lowres", **kw)
    assert len(split[1]) == len(lowres[1]) >= 40
    assert np.mean(split[0] == lowres[0]) > 0.999
    # An export made before the split graphs existed: no split_* in its manifest.
    old = tmp_path / "old"
    shutil.copytree(export, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for name in ("split_image", "split_prompts", "split_masks"):
        del manifest["graphs"][name]
        (old / f"{name}.onnx").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    old_session = SamSession(old)
    labels, records = old_session.segment_everything(**kw)
    assert records == lowres[1]
    np.testing.assert_array_equal(labels, lowres[0])
    from peft_export.errors import PeftExportError

    with pytest.raises(PeftExportError, match="no split decoder graphs"):
        old_session.segment_everything(decoder="split", **kw)


# ---- bounded memory and the filter counts ------------------------------------------------------------


def _nuclei_decoder(low_size: int, seed: int = 5):
    """Small round objects around each point, plus a few large ones: masks like real nuclei."""
    rng = np.random.default_rng(seed)
    ly, lx = np.mgrid[0:low_size, 0:low_size] + 0.5

    def decode(points, labels):
        pts = np.asarray(points)[:, 0] / 4
        low = np.empty((len(pts), 4, low_size, low_size), np.float32)
        for i, (x, y) in enumerate(pts):
            d = np.hypot(lx - x, ly - y)
            for j, r in enumerate((3, 2, 4, low_size / 3 if i % 16 == 0 else 5)):
                low[i, j] = 3.0 * (r - d) + rng.normal(0, 0.3, d.shape)
        return low, np.full((len(pts), 4), 0.95, np.float32)

    return decode


def test_memory_stays_bounded_on_a_4000x4000_image():
    original = (4000, 4000)
    input_size = preprocess_shape(*original, S)
    decode = _nuclei_decoder(LOW)
    tracemalloc.start()
    try:
        labels, records = E.segment_everything(decode, original, input_size, S, points_per_side=10,
                                               stability_score_thresh=0.5, box_nms_thresh=0.7)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(records) >= 50
    # The int32 label image is 64 MB; the old path held 16 full-size float32 masks (1 GB) at once.
    assert peak < labels.nbytes + 160e6, f"peak {peak / 1e6:.0f} MB"
    big = [r for r in records if r["area"] > 1e6]
    assert big and all(labels[int(r["point_coords"][0][1]), int(r["point_coords"][0][0])] > 0 for r in big)


def test_summary_counts_match_independent_counts():
    original = (150, 220)
    input_size = preprocess_shape(*original, S)
    decode = _disc_decoder(11)
    kw = dict(points_per_side=12, points_per_batch=32, pred_iou_thresh=0.8, stability_score_thresh=0.7,
              box_nms_thresh=0.6)
    _, records = E.segment_everything(decode, original, input_size, S, **kw)
    s = records.summary
    grid = E.build_point_grid(12) * np.array([original[1], original[0]])
    from peft_export.runtime.preprocess import transform_coords

    _, iou = decode(transform_coords(grid, original, S)[:, None, :], np.ones((len(grid), 1)))
    assert s["removed"]["pred_iou"] == int((iou[:, 1:] <= np.float32(0.8)).sum())
    # Without the stability filter and NMS every IoU survivor is a record with its stability score.
    _, everyone = E.segment_everything(decode, original, input_size, S, **{**kw, "stability_score_thresh": 0.0,
                                                                          "box_nms_thresh": 1.0})
    assert len(everyone) == s["candidates"] - s["removed"]["pred_iou"]
    assert s["removed"]["stability"] == sum(r["stability_score"] < np.float32(0.7) for r in everyone)
    assert s["objects"] == len(records) == s["candidates"] - sum(s["removed"].values())
    text = E.filter_report(s, {"pred_iou": "--pred-iou-thresh"})
    assert f"predicted IoU <= 0.8 removed {s['removed']['pred_iou']} (lower --pred-iou-thresh)" in text
    assert f"stability score < 0.7 removed {s['removed']['stability']} (lower stability_score_thresh)" in text


def test_mask_runs_roundtrip():
    rng = np.random.default_rng(4)
    mask = rng.random((37, 53)) < 0.4
    runs = MaskRuns.from_mask(mask[5:20, 3:40], 5, 3)
    full = np.zeros_like(mask)
    full[5:20, 3:40] = mask[5:20, 3:40]
    np.testing.assert_array_equal(runs.to_mask(mask.shape), full)
    assert runs.area == full.sum()
    np.testing.assert_array_equal(runs.box(), E.batched_mask_to_box(full))
    assert list(MaskRuns.concat([]).box()) == [0, 0, 0, 0]


def test_cli_everything_says_which_filter_removed_the_candidates(export, tmp_path):
    import json

    import tifffile
    from typer.testing import CliRunner

    from peft_export.cli.main import app
    from peft_export.runtime import SamSession

    image = _nuclei_image()
    tifffile.imwrite(tmp_path / "cells.tif", image)
    result = CliRunner().invoke(app, ["predict", str(export), str(tmp_path / "cells.tif"), "--everything",
                                      "--points-per-side", "8", "--out", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    # Every candidate with its predicted IoU: no filter at all.
    session = SamSession(export)
    _, everyone = session.segment_everything(embedding=session.encode(image), points_per_side=8,
                                             pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    assert len(everyone) == 192
    low_iou = sum(r["predicted_iou"] <= np.float32(0.88) for r in everyone)
    assert low_iou > 180  # this random model predicts IoUs of about 0.2-0.6
    record = json.loads((tmp_path / "out" / "cells_scores.json").read_text())
    assert record["filters"]["removed"]["pred_iou"] == low_iou
    assert f"predicted IoU <= 0.88 removed {low_iou} (lower --pred-iou-thresh)" in result.output
    assert record["hint"] in result.output and f"{record['n_objects']} objects from 192 candidates" in record["hint"]
    # The options it names do relax the filters.
    relaxed = CliRunner().invoke(app, ["predict", str(export), str(tmp_path / "cells.tif"), "--everything",
                                       "--points-per-side", "8", "--pred-iou-thresh", "0.2", "--stability-thresh",
                                       "0.8", "--box-nms-thresh", "0.99", "--out", str(tmp_path / "relaxed"), "-q"])
    assert relaxed.exit_code == 0, relaxed.output
    more = json.loads((tmp_path / "relaxed" / "cells_scores.json").read_text())
    assert more["filters"]["removed"]["pred_iou"] < low_iou and more["n_objects"] > record["n_objects"]
