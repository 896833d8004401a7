import time

import numpy as np
import pytest

from peft_export.errors import PeftExportError
from peft_export.evaluation.metrics import (
    _count_tp,
    dice,
    iou,
    iou_matrix,
    matching,
    mean_segmentation_accuracy,
    segmentation_accuracy,
)
from peft_export.bench.stats import RssSampler, device_info, library_versions, peak_rss_mb, summarize_timings

THRESHOLDS = np.arange(0.5, 1.0, 0.05)


def random_blobs(rng, shape=(48, 64), n=6):
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for i in range(1, n + 1):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = rng.integers(3, 10)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return labels


def test_dice_iou_known_masks():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b = np.zeros((4, 4), bool)
    b[:2, :] = True  # 8 px, contains a
    assert dice(a, b) == pytest.approx(2 * 4 / 12)
    assert iou(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0 and iou(a, a) == 1.0
    empty = np.zeros((4, 4), bool)
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(a, empty) == 0.0 and iou(empty, a) == 0.0
    with pytest.raises(ValueError):
        dice(a, np.zeros((3, 4), bool))


def test_perfect_segmentation_with_permuted_large_ids():
    gt = random_blobs(np.random.default_rng(1))
    ids = np.unique(gt)[1:]
    perm = dict(zip(ids, np.random.default_rng(2).permutation(ids) * 1000 + 7))
    pred = np.zeros_like(gt, dtype=np.int64)
    for old, new in perm.items():
        pred[gt == old] = new
    msa, per = mean_segmentation_accuracy(pred, gt)
    assert msa == 1.0
    assert len(per) == 10 and all(v == 1.0 for v in per.values())
    assert list(per)[0] == 0.5 and list(per)[-1] == 0.95
    m = matching(pred, gt, 0.5)
    assert m == {"tp": len(ids), "fp": 0, "fn": 0, "n_pred": len(ids), "n_gt": len(ids)}


def test_empty_prediction_and_both_empty():
    gt = random_blobs(np.random.default_rng(3))
    empty = np.zeros_like(gt)
    assert mean_segmentation_accuracy(empty, gt)[0] == 0.0
    assert mean_segmentation_accuracy(gt, empty)[0] == 0.0
    assert segmentation_accuracy(empty, empty) == 1.0
    assert mean_segmentation_accuracy(empty, empty)[0] == 1.0
    m = matching(empty, gt)
    assert m["tp"] == 0 and m["fp"] == 0 and m["fn"] == m["n_gt"] > 0


def test_shifted_object_known_iou():
    gt = np.zeros((20, 20), np.int32)
    gt[2:12, 2:12] = 1
    pred = np.zeros_like(gt)
    pred[2:12, 4:14] = 5  # shifted by 2 columns: inter 80, union 120 -> IoU 2/3
    scores, p_ids, g_ids = iou_matrix(pred, gt)
    assert scores.shape == (1, 1) and scores[0, 0] == pytest.approx(2 / 3)
    assert list(p_ids) == [5] and list(g_ids) == [1]
    msa, per = mean_segmentation_accuracy(pred, gt)
    expected = {round(float(t), 4): (1.0 if t <= 2 / 3 else 0.0) for t in THRESHOLDS}
    assert per == expected
    assert msa == pytest.approx(0.4)  # 0.5, 0.55, 0.6, 0.65 pass
    assert segmentation_accuracy(pred, gt, 0.7) == 0.0  # tp 0, fp 1, fn 1


def test_merged_objects():
    gt = np.zeros((20, 30), np.int32)
    gt[0:10, 0:10] = 1  # 100 px
    gt[0:10, 10:15] = 2  # 50 px
    pred = np.zeros_like(gt)
    pred[0:10, 0:15] = 3  # IoU 100/150 with 1, 50/150 with 2
    assert matching(pred, gt, 0.5) == {"tp": 1, "fp": 0, "fn": 1, "n_pred": 1, "n_gt": 2}
    assert segmentation_accuracy(pred, gt, 0.5) == pytest.approx(0.5)
    assert matching(pred, gt, 0.7) == {"tp": 0, "fp": 1, "fn": 2, "n_pred": 1, "n_gt": 2}
    # one-to-one: at a low threshold both gt overlap the one prediction, still one TP
    assert matching(pred, gt, 0.3)["tp"] == 1
    assert mean_segmentation_accuracy(pred, gt)[0] == pytest.approx(4 * 0.5 / 10)


def test_split_object():
    gt = np.zeros((10, 40), np.int32)
    gt[:, 0:30] = 4
    pred = np.zeros_like(gt)
    pred[:, 0:20] = 1  # IoU 2/3
    pred[:, 20:30] = 2  # IoU 1/3
    assert matching(pred, gt, 0.5) == {"tp": 1, "fp": 1, "fn": 0, "n_pred": 2, "n_gt": 1}
    assert segmentation_accuracy(pred, gt, 0.5) == pytest.approx(0.5)
    assert segmentation_accuracy(pred, gt, 0.95) == 0.0


def test_optimal_not_greedy_matching():
    # Greedy by IoU would pair p0-g0 (0.6) and leave p1 unmatched; optimal pairs p0-g1, p1-g0.
    scores = np.array([[0.6, 0.35], [0.4, 0.0]])
    assert _count_tp(scores, 0.3) == 2
    assert _count_tp(scores, 0.5) == 1
    assert _count_tp(np.zeros((0, 3)), 0.5) == 0


def test_iou_matrix_matches_brute_force():
    rng = np.random.default_rng(4)
    gt = random_blobs(rng, n=8)
    pred = np.roll(random_blobs(rng, n=7), 3, axis=1)
    scores, p_ids, g_ids = iou_matrix(pred, gt)
    for i, p in enumerate(p_ids):
        for j, g in enumerate(g_ids):
            assert scores[i, j] == pytest.approx(iou(pred == p, gt == g))
    # np.unique fallback (negative ids) gives the same matrix
    scores2, _, _ = iou_matrix(np.where(pred > 0, -pred, 0), gt)
    assert np.allclose(scores2[::-1], scores)


def test_summarize_timings_known_values():
    s = summarize_timings([i / 1000 for i in range(1, 101)], batch_size=4)
    assert s["n"] == 100
    assert s["median_ms"] == pytest.approx(50.5)
    assert s["p90_ms"] == pytest.approx(float(np.percentile(np.arange(1, 101), 90)))
    assert s["p90_ms"] == pytest.approx(90.1)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert s["mean_ms"] == pytest.approx(50.5)
    assert s["std_ms"] == pytest.approx(float(np.std(np.arange(1, 101))))
    assert s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(100.0)
    assert s["throughput_per_s"] == pytest.approx(4 * 1000 / 50.5)
    with pytest.raises(PeftExportError):
        summarize_timings([])


def test_rss_sampler_sees_allocation():
    import mmap

    size = 200 * 1024 * 1024
    with RssSampler() as s:
        # A fresh anonymous mapping: new pages for sure (numpy/malloc may reuse memory
        # freed by earlier tests, which raises no RSS), touched page by page.
        block = mmap.mmap(-1, size)
        block.write(b"\x01" * size)
        time.sleep(0.05)
        block.close()
    assert s.delta_mb > 150
    assert s.peak_mb >= s.baseline_mb + s.delta_mb - 1e-6
    assert peak_rss_mb() >= s.peak_mb - 1  # lifetime peak can only be higher
    assert set(s.as_dict()) == {"peak_rss_mb", "baseline_rss_mb", "delta_rss_mb"}


def test_device_and_library_info():
    info = device_info()
    assert info["cpu"] and info["cpu_count"] >= 1 and info["ram_gb"] > 0
    assert "gpu" in info
    versions = library_versions()
    assert {"torch", "onnx", "onnxruntime", "tensorrt", "numpy"} <= set(versions)
    assert versions["numpy"] == np.__version__
