import json
from functools import partial

import numpy as np
import pytest
from scipy import ndimage

from peft_export.data.prompts import box_from_mask
from peft_export.errors import PeftExportError
from peft_export.evaluation.protocol import PromptPlan, evaluate_automatic, evaluate_interactive
from peft_export.evaluation.tables import format_table, plot_curves, summary_rows, to_markdown


def blob_sample(seed, shape=(64, 72), name=None):
    """Separated disks of random size on a jittered 3x3 grid, and an image that shows them."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ch, cw = shape[0] // 3, shape[1] // 3
    k = 0
    for i in range(3):
        for j in range(3):
            if rng.random() < 0.2:
                continue
            k += 1
            r = rng.integers(4, min(ch, cw) // 2 - 1)
            cy = i * ch + ch // 2 + rng.integers(-1, 2)
            cx = j * cw + cw // 2 + rng.integers(-1, 2)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    gray = np.where(labels > 0, 180.0, 40.0) + rng.normal(0, 10, shape)
    image = np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    return image, labels, name or f"img{seed}"


def logits_of(masks):
    return np.where(masks, 8.0, -8.0).astype(np.float32)


class OraclePredictor:
    """A SamPredictor-shaped predictor that knows the ground truth.

    It finds the prompted object from the box (matched exactly to the object boxes)
    or else from the first positive point. ``first`` decides what the first
    prediction (no mask_input) is: the true mask, or the mask eroded by
    ``erode`` pixels. With ``mask_input`` it starts from those logits (so the
    protocol must feed back the right ones) and corrects the pixels within
    ``radius`` of every prompt point: positives add ground truth, negatives
    remove background. Every call is logged.
    """

    def __init__(self, labels_by_shape, erode=0, radius=4):
        self.labels_by_shape = labels_by_shape
        self.erode = erode
        self.radius = radius
        self.calls = []

    def set_image(self, image):
        assert image.ndim == 3 and image.shape[-1] == 3
        self.labels = self.labels_by_shape[image.shape[:2]]
        self.boxes = {tuple(float(v) for v in box_from_mask(self.labels == i)): i
                      for i in np.unique(self.labels)[1:]}

    def _object(self, point_coords, point_labels, box):
        if box is not None:
            return self.boxes[tuple(float(v) for v in box)]
        x, y = point_coords[list(point_labels).index(1)]
        return self.labels[int(round(y)), int(round(x))]

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True):
        self.calls.append({
            "points": None if point_coords is None else point_coords.tolist(),
            "labels": None if point_labels is None else point_labels.tolist(),
            "box": None if box is None else box.tolist(),
            "mask_input_shape": None if mask_input is None else mask_input.shape,
            "multimask": multimask_output,
        })
        gt = self.labels == self._object(point_coords, point_labels, box)
        if mask_input is None:
            mask = ndimage.binary_erosion(gt, iterations=self.erode) if self.erode else gt
        else:
            mask = mask_input[0] > 0
            yy, xx = np.mgrid[: gt.shape[0], : gt.shape[1]]
            for (x, y), lab in zip(point_coords if point_coords is not None else [], point_labels
                                   if point_labels is not None else []):
                disk = (yy - y) ** 2 + (xx - x) ** 2 <= self.radius ** 2
                if lab == 1:
                    mask = mask | (disk & gt)
                elif lab == 0:
                    mask = mask & ~(disk & ~gt)
        if multimask_output:
            # The right answer is the middle one and has the highest score.
            masks = np.stack([ndimage.binary_dilation(gt, iterations=3), mask, np.zeros_like(gt)])
            scores = np.array([0.6, 0.9, 0.2], np.float32)
        else:
            masks, scores = mask[None], np.array([0.9], np.float32)
        return masks, scores, logits_of(masks)


@pytest.fixture(scope="module")
def samples():
    return [blob_sample(s) for s in (0, 1, 2)]


def by_shape(samples):
    # sample shapes differ so the oracle can find its labels from the image alone
    return {img.shape[:2]: lab for img, lab, _ in samples}


@pytest.fixture(scope="module")
def shaped_samples():
    return [blob_sample(s, shape=(60 + 4 * s, 70 + 2 * s)) for s in range(3)]


def test_perfect_predictor_scores_one(shaped_samples):
    pred = OraclePredictor(by_shape(shaped_samples))
    res = evaluate_interactive(pred, shaped_samples, iterations=8, progress=False)
    n_obj = sum(len(np.unique(lab)) - 1 for _, lab, _ in shaped_samples)
    assert res["n_images"] == 3 and res["n_objects"] == n_obj
    for key in ("point", "box", "iterative_point", "iterative_box"):
        assert res["metrics"][key]["dice"] == 1.0 and res["metrics"][key]["iou"] == 1.0
    for key in ("iterative_point", "iterative_box"):
        assert res["metrics"][key]["dice_curve"] == [1.0] * 9
    # a perfect result leaves nothing to correct: one point call and one box call per object
    assert len(pred.calls) == 2 * n_obj
    point_calls = [c for c in pred.calls if c["box"] is None]
    box_calls = [c for c in pred.calls if c["box"] is not None]
    assert all(c["multimask"] and c["labels"] == [1] for c in point_calls)
    assert all(not c["multimask"] and c["points"] is None for c in box_calls)
    json.dumps(res)  # JSON-able as it is


def test_iterative_prompting_improves_eroded_start(shaped_samples):
    pred = OraclePredictor(by_shape(shaped_samples), erode=2, radius=4)
    res = evaluate_interactive(pred, shaped_samples, prompts=("iterative",), iterations=8,
                               start="both", progress=False)
    assert set(res["metrics"]) == {"iterative_point", "iterative_box"}
    for key in ("iterative_point", "iterative_box"):
        curve = res["metrics"][key]["dice_curve"]
        assert len(curve) == 9
        assert curve[0] < 0.9
        assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
        assert curve[-1] > curve[0] + 0.05
        assert res["metrics"][key]["dice"] == curve[-1]
        for img in res["per_image"]:
            for obj in img["objects"]:
                c = obj[key]["dice_curve"]
                assert all(b >= a - 1e-12 for a, b in zip(c, c[1:]))
    # corrective calls: single output, previous logits fed back, one point more each call
    followups = [c for c in pred.calls if c["mask_input_shape"] is not None]
    assert followups and all(not c["multimask"] for c in followups)
    assert all(c["mask_input_shape"][0] == 1 for c in followups)
    for obj in res["per_image"][0]["objects"]:
        pts = obj["iterative_point"]["points"]
        assert pts[0] == obj["prompt_point"] and obj["iterative_point"]["point_labels"][0] == 1
        assert set(obj["iterative_point"]["point_labels"][1:]) <= {0, 1}
    box_followups = [c for c in followups if c["box"] is not None]
    assert box_followups and all(c["labels"] and len(c["points"]) == len(c["labels"]) for c in box_followups)


def test_prompts_identical_across_runs_and_models(shaped_samples):
    shapes = by_shape(shaped_samples)
    run = partial(evaluate_interactive, samples=shaped_samples, iterations=3, progress=False, seed=7)
    a = run(OraclePredictor(shapes, erode=2))
    b = run(OraclePredictor(shapes, erode=2))
    c = run(OraclePredictor(shapes, erode=0))
    assert a == b  # everything, corrective points included
    initial = lambda r: [(o["object_id"], o["prompt_point"], o["prompt_box"]) for im in r["per_image"] for o in im["objects"]]
    assert initial(a) == initial(c)  # another model sees the same initial prompts
    d = run(OraclePredictor(shapes, erode=2), seed=8)
    assert [p for _, p, _ in initial(d)] != [p for _, p, _ in initial(a)]
    # the plan itself is reproducible and independent of the predictor
    _, lab, name = shaped_samples[0]
    p1 = PromptPlan.from_labels(lab, name, seed=7)
    assert [o.point for o in p1.objects] == [tuple(o["prompt_point"]) for o in a["per_image"][0]["objects"]]
    for o in p1.objects:
        assert lab[int(round(o.point[1])), int(round(o.point[0]))] == o.object_id


def test_max_objects_and_options(shaped_samples):
    shapes = by_shape(shaped_samples)
    res = evaluate_interactive(OraclePredictor(shapes), shaped_samples, prompts=("point",),
                               max_objects_per_image=2, progress=False)
    assert res["n_objects"] == 6 and set(res["metrics"]) == {"point"}
    again = evaluate_interactive(OraclePredictor(shapes), shaped_samples, prompts=("point",),
                                 max_objects_per_image=2, progress=False)
    assert again == res
    with pytest.raises(PeftExportError):
        evaluate_interactive(OraclePredictor(shapes), shaped_samples, prompts=("points",), progress=False)
    with pytest.raises(PeftExportError):
        evaluate_interactive(OraclePredictor(shapes), shaped_samples, start="mask", progress=False)
    img, lab, _ = shaped_samples[0]
    with pytest.raises(PeftExportError, match="bad"):
        evaluate_interactive(OraclePredictor(shapes), [(img, lab[:-1], "bad")], progress=False)
    empty = evaluate_interactive(OraclePredictor(shapes), [(img, np.zeros_like(lab), "e")], progress=False)
    assert empty["n_images"] == 0 and empty["n_images_without_objects"] == 1


def test_evaluate_automatic(samples):
    def threshold_segment(image):
        return ndimage.label(image[..., 0] > 110)[0]

    res = evaluate_automatic(threshold_segment, samples, progress=False)
    assert res["n_images"] == 3 and res["msa"] == pytest.approx(1.0)
    assert res["sa50"] == 1.0 and len(res["sa"]) == 10
    bad = evaluate_automatic(lambda im: np.zeros(im.shape[:2], np.int32), samples, progress=False)
    assert bad["msa"] == 0.0
    # each object eroded by 1 px: some matches survive low thresholds, none the high ones
    coarse = evaluate_automatic(lambda im: ndimage.grey_erosion(threshold_segment(im), size=3),
                                samples, progress=False)
    sa = list(coarse["sa"].values())
    assert sa[0] > 0.5 and sa[-1] == 0.0 and 0 < coarse["msa"] < 1
    assert all(b <= a for a, b in zip(sa, sa[1:]))
    assert coarse["msa"] == pytest.approx(np.mean([e["msa"] for e in coarse["per_image"]]))


def test_tables_and_plot(shaped_samples, tmp_path):
    shapes = by_shape(shaped_samples)
    results = {
        "perfect": evaluate_interactive(OraclePredictor(shapes), shaped_samples, iterations=4, progress=False),
        "eroded": evaluate_interactive(OraclePredictor(shapes, erode=2), shaped_samples, iterations=4,
                                       progress=False),
    }
    rows = summary_rows(results)
    assert [r["model"] for r in rows] == ["perfect", "eroded"]
    assert rows[0]["dice_point"] == 1.0 and rows[1]["dice_iterative_box"] < 1.0
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("model") and "1.0000" in lines[2]
    assert lines[1].replace(" ", "").strip("-") == ""
    # numeric columns right-aligned: every row ends at the same column
    assert len({len(line) for line in lines[2:]}) == 1
    md = to_markdown(rows)
    assert md.splitlines()[0].startswith("| model |") and "---:" in md.splitlines()[1]
    out = tmp_path / "curves.png"
    plot_curves(results, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(PeftExportError):
        plot_curves(results, out)
    plot_curves(results, out, overwrite=True)


def build_tiny_sam():
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=4, embed_dim=64, img_size=256, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=4, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1, 3), window_size=7, out_chans=256,
        ),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(16, 16),
                                     input_image_size=(256, 256), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def test_real_sam_predictor_tiny():
    import torch
    from segment_anything import SamPredictor

    predictor = SamPredictor(build_tiny_sam())
    sample = blob_sample(5, shape=(48, 64))
    with torch.no_grad():
        res = evaluate_interactive(predictor, [sample], iterations=2, max_objects_per_image=2, progress=False)
    assert res["n_images"] == 1 and res["n_objects"] == 2
    assert set(res["metrics"]) == {"point", "box", "iterative_point", "iterative_box"}
    for key, m in res["metrics"].items():
        assert 0.0 <= m["dice"] <= 1.0 and 0.0 <= m["iou"] <= m["dice"] + 1e-12
        if key.startswith("iterative"):
            assert len(m["dice_curve"]) == 3 and len(m["iou_curve"]) == 3
            assert all(0.0 <= v <= 1.0 for v in m["dice_curve"])
    for obj in res["per_image"][0]["objects"]:
        # iteration 0 of the iterative run is the single-prompt result
        assert obj["iterative_point"]["dice_curve"][0] == pytest.approx(obj["point"]["dice"])
        assert obj["iterative_box"]["dice_curve"][0] == pytest.approx(obj["box"]["dice"])
    json.dumps(res)
    # a float 0..255 grayscale image (as intensity normalisation gives) is the same input
    image, labels, name = sample
    with torch.no_grad():
        res_float = evaluate_interactive(predictor, [(image[..., 0].astype(np.float32), labels, name)],
                                         prompts=("point", "box"), max_objects_per_image=2, progress=False)
    assert res_float["metrics"]["point"] == pytest.approx(res["metrics"]["point"])
    assert res_float["metrics"]["box"] == pytest.approx(res["metrics"]["box"])
