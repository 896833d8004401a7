"""Data reading, validation, patches, prompts, synthetic data and intensity normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from peft_export.data import (
    PatchSampler,
    augment_pair,
    box_from_mask,
    corrective_point,
    corrective_points,
    find_pairs,
    find_pairs_glob,
    load_samples,
    make_demo_data,
    object_sizes,
    objects_in_label,
    read_image_planes,
    read_label_planes,
    relabel_consecutive,
    remove_small_objects,
    sample_patch,
    sample_positive_point,
    split_by_file,
    synthetic_sample,
    validate_pairs,
)
from peft_export.errors import PeftExportError
from peft_export.runtime.intensity import DEFAULT_INTENSITY_RULE, normalize_intensity

RNG = np.random.default_rng(1234)


def _random_labels(h: int, w: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros((h, w), np.int32)
    for i in range(1, n + 1):
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        lab[y:y + rng.integers(4, 9), x:x + rng.integers(4, 9)] = i
    return lab


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("shape,dtype", [((40, 52), np.uint16), ((40, 52), np.uint8), ((40, 52), np.float32),
                                         ((40, 52, 3), np.uint8), ((40, 52, 3), np.uint16)])
def test_tiff_image_roundtrip(tmp_path, shape, dtype):
    arr = (RNG.random(shape) * (200 if dtype == np.uint8 else 60000)).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", arr)
    planes = read_image_planes(tmp_path / "a.tif")
    assert len(planes) == 1
    assert planes[0].dtype == dtype
    np.testing.assert_array_equal(planes[0], arr)


@pytest.mark.parametrize("shape,dtype", [((30, 41), np.uint8), ((30, 41), np.uint16), ((30, 41, 3), np.uint8),
                                         ((30, 41, 4), np.uint8)])
def test_png_image_roundtrip(tmp_path, shape, dtype):
    arr = (RNG.random(shape) * (255 if dtype == np.uint8 else 60000)).astype(dtype)
    Image.fromarray(arr).save(tmp_path / "a.png")
    (plane,) = read_image_planes(tmp_path / "a.png")
    np.testing.assert_array_equal(plane, arr)


def test_jpeg_and_npy_images(tmp_path):
    smooth = np.tile(np.linspace(0, 250, 48, dtype=np.float32), (32, 1))
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "a.jpg", quality=95)
    (plane,) = read_image_planes(tmp_path / "a.jpg")
    assert plane.shape == (32, 48) and np.abs(plane.astype(float) - smooth).mean() < 3
    for arr in (RNG.random((20, 30)).astype(np.float32), RNG.integers(0, 255, (20, 30, 3)).astype(np.uint8)):
        np.save(tmp_path / "b.npy", arr)
        (plane,) = read_image_planes(tmp_path / "b.npy")
        np.testing.assert_array_equal(plane, arr)


def test_label_roundtrip_all_formats(tmp_path):
    lab = _random_labels(36, 44, 12, seed=3)
    tifffile.imwrite(tmp_path / "l.tif", lab)
    Image.fromarray(lab.astype(np.uint16)).save(tmp_path / "l.png")
    np.save(tmp_path / "l.npy", lab.astype(np.int64))
    np.save(tmp_path / "lf.npy", lab.astype(np.float32))  # whole-number floats are fine
    for name in ("l.tif", "l.png", "l.npy", "lf.npy"):
        (plane,) = read_label_planes(tmp_path / name)
        assert plane.dtype == np.int32
        np.testing.assert_array_equal(plane, lab)


def test_z_stack_slices(tmp_path):
    stack = RNG.integers(0, 4000, (6, 24, 28)).astype(np.uint16)
    labels = np.stack([_random_labels(24, 28, 3, seed=z) for z in range(6)])
    tifffile.imwrite(tmp_path / "s.tif", stack)
    planes = read_image_planes(tmp_path / "s.tif")
    assert len(planes) == 6
    for z in range(6):
        np.testing.assert_array_equal(planes[z], stack[z])
    # an ImageJ ZYX stack is a stack even with few planes
    tifffile.imwrite(tmp_path / "z3.tif", stack[:3], imagej=True, metadata={"axes": "ZYX"})
    assert len(read_image_planes(tmp_path / "z3.tif")) == 3
    # a 3-plane first axis without Z is channels-first RGB
    np.save(tmp_path / "c.npy", stack[:3])
    (rgb,) = read_image_planes(tmp_path / "c.npy")
    np.testing.assert_array_equal(rgb, np.moveaxis(stack[:3], 0, -1))

    (tmp_path / "d/images").mkdir(parents=True)
    (tmp_path / "d/labels").mkdir()
    tifffile.imwrite(tmp_path / "d/images/s.tif", stack)
    tifffile.imwrite(tmp_path / "d/labels/s.tif", labels)
    samples = load_samples(find_pairs(tmp_path / "d"))
    assert [s.name for s in samples] == [f"s[{z}]" for z in range(6)]
    for z, s in enumerate(samples):
        np.testing.assert_array_equal(s.label, labels[z])
        np.testing.assert_allclose(s.image[..., 0], normalize_intensity(stack[z])[..., 0])


def test_semantic_to_instance(tmp_path):
    sem = np.zeros((30, 30), np.uint8)
    sem[2:8, 2:8] = 1
    sem[2:8, 20:26] = 1
    sem[15:25, 5:12] = 2
    sem[15:25, 12:20] = 1  # touches class 2: still a separate object
    np.save(tmp_path / "s.npy", sem)
    (inst,) = read_label_planes(tmp_path / "s.npy", labels_are="semantic")
    assert sorted(object_sizes(inst).values()) == sorted([36, 36, 70, 80])
    for i in objects_in_label(inst):
        assert ndimage.label(inst == i)[1] == 1
        assert len(np.unique(sem[inst == i])) == 1
    assert ((inst > 0) == (sem > 0)).all()
    (as_instance,) = read_label_planes(tmp_path / "s.npy", labels_are="instance")
    assert len(objects_in_label(as_instance)) == 2


# ---------------------------------------------------------------- pairing and validation


def _write_pair(d, name, image, label):
    tifffile.imwrite(d / "images" / f"{name}.tif", image)
    if label is not None:
        np.save(d / "labels" / f"{name}.npy", label)


def test_validation_reports_every_problem(tmp_path):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    img = RNG.integers(0, 1000, (32, 32)).astype(np.uint16)
    good = _random_labels(32, 32, 4)
    _write_pair(tmp_path, "good", img, good)
    _write_pair(tmp_path, "nolabel", img, None)
    np.save(tmp_path / "labels" / "noimage.npy", good)
    _write_pair(tmp_path, "mismatch", img, good[:30])
    _write_pair(tmp_path, "empty", img, np.zeros_like(good))
    (tmp_path / "images" / "corrupt.tif").write_bytes(b"II*\x00garbage that is not a tiff")
    np.save(tmp_path / "labels" / "corrupt.npy", good)
    neg = good.copy()
    neg[0, 0] = -3
    _write_pair(tmp_path, "negative", img, neg)
    _write_pair(tmp_path, "floaty", img, good.astype(np.float32) + 0.5 * (good > 0))

    pairs = find_pairs(tmp_path)
    assert len(pairs) == 8
    with pytest.raises(PeftExportError) as err:
        validate_pairs(pairs)
    lines = str(err.value).splitlines()
    assert lines[0] == "7 problems in training data:"
    assert len(lines) == 8
    report = "\n".join(lines[1:])
    for name, words in [("nolabel.tif", "no label"), ("noimage.npy", "no image"), ("mismatch.npy", "shape"),
                        ("empty.npy", "empty"), ("corrupt.tif", "cannot read"), ("negative.npy", "negative"),
                        ("floaty.npy", "non-integer")]:
        line = next(li for li in lines[1:] if name in li)
        assert words in line, line
    assert "good" not in report

    # the good pair alone passes and loads
    good_pair = [p for p in pairs if p.name == "good"]
    assert validate_pairs(good_pair) == good_pair
    (sample,) = load_samples(good_pair)
    assert sample.image.shape == (32, 32, 3) and sample.image.dtype == np.float32
    np.testing.assert_array_equal(sample.label, good)


def test_find_pairs_glob(tmp_path):
    pairs = make_demo_data(tmp_path, n_images=3, size=64, n_objects=2, radius=(5, 8))
    found = find_pairs_glob(str(tmp_path / "images" / "*.tif"), str(tmp_path / "labels" / "*.tif"))
    assert [(p.image, p.label) for p in found] == [(p.image, p.label) for p in pairs]
    with pytest.raises(PeftExportError):
        find_pairs(tmp_path / "nothing")


def test_split_by_file():
    items = [f"f{i}" for i in range(10)]
    train, val = split_by_file(items, 0.2, seed=5)
    assert len(val) == 2 and sorted(train + val) == sorted(items)
    assert split_by_file(items, 0.2, seed=5) == (train, val)
    assert split_by_file(list(reversed(items)), 0.2, seed=5)[1] == sorted(val, reverse=True)
    assert {tuple(split_by_file(items, 0.2, seed=s)[1]) for s in range(10)} != {tuple(val)}
    tr, va = split_by_file(items[:2], 0.01, seed=0)
    assert len(tr) == 1 and len(va) == 1
    tr, va = split_by_file(items[:3], 0.9, seed=0)
    assert len(tr) == 1 and len(va) == 2
    assert split_by_file(items[:1], 0.5) == (items[:1], [])
    with pytest.raises(PeftExportError):
        split_by_file(items, 1.0)


# ---------------------------------------------------------------- patches


def _patch_data():
    images, labels = [], []
    for k, (h, w) in enumerate([(90, 120), (40, 50), (70, 64)]):
        lab = _random_labels(h, w, 6, seed=k)
        lab[lab == 2] = 0
        lab[5, 5] = 77  # a one-pixel object: never allowed into a patch
        images.append(normalize_intensity(RNG.integers(0, 4000, (h, w)).astype(np.uint16)))
        labels.append(lab)
    return images, labels


def test_patch_sampler_objects_and_determinism():
    images, labels = _patch_data()
    sampler = PatchSampler(images, labels, patch_size=64, min_object_size=20, seed=7, samples_per_epoch=30)
    assert len(sampler) == 30
    seen = set()
    for i in range(len(sampler)):
        img, lab = sampler[i]
        assert img.shape == (64, 64, 3) and img.dtype == np.float32
        assert lab.shape == (64, 64) and lab.dtype == np.int32
        assert 0 <= img.min() and img.max() <= 255
        sizes = object_sizes(lab)
        assert sizes and min(sizes.values()) >= 20
        assert sorted(sizes) == list(range(1, len(sizes) + 1))  # consecutive ids
        seen.add(sampler.image_index(i))
    assert seen == {0, 1, 2}
    again = PatchSampler(images, labels, patch_size=64, min_object_size=20, seed=7, samples_per_epoch=30)
    other = PatchSampler(images, labels, patch_size=64, min_object_size=20, seed=8, samples_per_epoch=30)
    diffs = 0
    for i in range(10):
        a, b, c = sampler[i], again[i], other[i]
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        diffs += not np.array_equal(a[1], c[1])
    assert diffs > 0
    sampler.set_epoch(2)
    np.testing.assert_array_equal(sampler[3][1], again.sample(63)[1])
    with pytest.raises(IndexError):
        sampler[30]


def test_small_image_is_zero_padded():
    lab = np.zeros((20, 30), np.int32)
    lab[4:14, 6:18] = 5
    img = np.full((20, 30, 3), 100.0, np.float32)
    out_img, out_lab = sample_patch(img, lab, np.random.default_rng(0), patch_size=48, min_object_size=10,
                                    augment=False)
    assert out_img.shape == (48, 48, 3)
    assert (out_img[:20, :30] == 100).all() and (out_img[20:] == 0).all() and (out_img[:, 30:] == 0).all()
    assert (out_lab[20:] == 0).all() and (out_lab[:, 30:] == 0).all()
    np.testing.assert_array_equal(out_lab[:20, :30], (lab > 0).astype(np.int32))


def test_augmentation_keeps_image_and_label_aligned():
    # the image encodes the label id, so any misalignment shows
    lab = np.zeros((64, 64), np.int32)
    lab[3:20, 5:30] = 1
    lab[30:60, 40:50] = 2
    lab[40:45, 2:20] = 3
    img = np.repeat((lab * 60.0 + 10)[..., None], 3, axis=-1).astype(np.float32)
    variants = set()
    for seed in range(16):
        a_img, a_lab = augment_pair(img, lab, np.random.default_rng(seed))
        np.testing.assert_array_equal(a_img[..., 0], a_lab * 60.0 + 10)
        variants.add(a_lab.tobytes())
        p_img, p_lab = sample_patch(img, lab, np.random.default_rng(seed), patch_size=40, min_object_size=0)
        for obj in objects_in_label(p_lab):
            assert len(np.unique(p_img[..., 0][p_lab == obj])) == 1
        np.testing.assert_array_equal(p_lab > 0, p_img[..., 0] > 10)
    assert len(variants) >= 6  # flips and rotations really vary


def test_label_helpers():
    lab = np.array([[0, 4, 4, 9], [0, 4, 0, 9], [7, 0, 0, 0]])
    assert object_sizes(lab) == {4: 3, 7: 1, 9: 2}
    assert objects_in_label(lab, min_size=2) == [4, 9]
    np.testing.assert_array_equal(remove_small_objects(lab, 2), np.where(lab == 7, 0, lab))
    np.testing.assert_array_equal(relabel_consecutive(lab), np.array([[0, 1, 1, 3], [0, 1, 0, 3], [2, 0, 0, 0]]))


# ---------------------------------------------------------------- synthetic data


def test_synthetic_sample_objects():
    for seed in range(3):
        image, label = synthetic_sample(256, seed=seed, n_objects=10)
        assert image.dtype == np.uint16 and image.shape == (256, 256) and label.dtype == np.int32
        sizes = object_sizes(label)
        assert sorted(sizes) == list(range(1, 11))
        for obj, size in sizes.items():
            assert 0.75 * np.pi * 8 * 8 <= size <= np.pi * 20 * 20 + 50
            assert ndimage.label(label == obj)[1] == 1
        fg, bg = image[label > 0].mean(), image[label == 0].mean()
        assert fg > 3 * bg
        assert image[label == 0].std() > 0  # noisy background
    ranged = [len(object_sizes(synthetic_sample(256, seed=s)[1])) for s in range(4)]
    assert all(8 <= n <= 16 for n in ranged)
    a, b = synthetic_sample(128, seed=9, n_objects=3), synthetic_sample(128, seed=9, n_objects=3)
    np.testing.assert_array_equal(a[0], b[0])


def test_synthetic_has_touching_objects():
    touching = 0
    for seed in range(4):
        _, label = synthetic_sample(256, seed=seed)
        grown = ndimage.grey_dilation(label, size=3)
        touching += len(np.unique(label[(grown != label) & (label > 0) & (grown > 0)]))
    assert touching > 0


def test_make_demo_data(tmp_path):
    pairs = make_demo_data(tmp_path / "demo", n_images=3, size=96, seed=1, n_objects=(2, 4), radius=(6, 10))
    assert len(pairs) == 3
    assert sorted(p.name for p in (tmp_path / "demo" / "images").iterdir()) == [f"demo_00{i}.tif" for i in range(3)]
    samples = load_samples(validate_pairs(find_pairs(tmp_path / "demo")))
    for s in samples:
        assert 2 <= len(objects_in_label(s.label)) <= 4
    with pytest.raises(PeftExportError):
        make_demo_data(tmp_path / "demo", n_images=3, size=96, seed=1)
    make_demo_data(tmp_path / "demo", n_images=3, size=96, seed=1, overwrite=True)


# ---------------------------------------------------------------- prompts


def test_box_from_mask():
    m = np.zeros((20, 30), bool)
    m[3:8, 10:22] = True
    np.testing.assert_array_equal(box_from_mask(m), [10, 3, 21, 7])
    m2 = np.zeros((20, 30), bool)
    m2[0, 29] = True
    m2[19, 0] = True
    np.testing.assert_array_equal(box_from_mask(m2), [0, 0, 29, 19])
    one = np.zeros((5, 5), bool)
    one[2, 3] = True
    np.testing.assert_array_equal(box_from_mask(one), [3, 2, 3, 2])
    np.testing.assert_array_equal(box_from_mask(one, margin=2), [1, 0, 4, 4])
    with pytest.raises(ValueError):
        box_from_mask(np.zeros((4, 4)))


def test_sample_positive_point_inside_interior():
    m = np.zeros((40, 60), bool)
    m[10:30, 5:45] = True  # 20 rows x 40 cols
    for seed in range(20):
        x, y = sample_positive_point(m, np.random.default_rng(seed))
        assert m[y, x]
        assert 14 <= y <= 25  # interior band: at least half the maximal distance from the edge
    x, y = sample_positive_point(m, np.random.default_rng(3), interior=False)
    assert m[y, x]
    assert sample_positive_point(m, np.random.default_rng(4)) == sample_positive_point(m, np.random.default_rng(4))


def test_corrective_point_false_negative_and_positive():
    gt = np.zeros((50, 50), bool)
    gt[10:31, 10:31] = True
    pred = np.zeros_like(gt)
    x, y, label = corrective_point(pred, gt, np.random.default_rng(0))
    assert (x, y, label) == (20, 20, 1)  # centre: farthest from the boundary
    gt[:] = False
    gt[10:31, 10:21] = True  # 21 rows x 11 cols: the farthest pixels form the middle column's ridge
    ridge = {corrective_point(pred, gt, np.random.default_rng(s))[:2] for s in range(30)}
    assert {x for x, _ in ridge} == {15} and all(15 <= y <= 25 for _, y in ridge) and len(ridge) > 1

    pred = gt.copy()
    pred[35:45, 30:48] = True  # large false positive
    pred[10:12, 10:12] = False  # small false negative
    x, y, label = corrective_point(pred, gt, np.random.default_rng(0))
    assert label == 0 and pred[y, x] and not gt[y, x]
    x, y, label = corrective_point(pred, gt, np.random.default_rng(0), kind="positive")
    assert label == 1 and gt[y, x] and not pred[y, x]
    assert corrective_point(gt, gt, np.random.default_rng(0)) is None
    assert corrective_points(gt, gt, np.random.default_rng(0)) == [(0, 0, -1), (0, 0, -1)]
    pts = corrective_points(pred, gt, np.random.default_rng(0))
    assert [p[2] for p in pts] == [1, 0]


def test_corrective_point_random_masks_deterministic():
    rng = np.random.default_rng(5)
    for _ in range(20):
        gt = ndimage.binary_dilation(rng.random((40, 40)) > 0.97, iterations=3)
        pred = ndimage.binary_dilation(rng.random((40, 40)) > 0.97, iterations=3)
        if (gt == pred).all():
            continue
        seed = int(rng.integers(1000))
        x, y, label = corrective_point(pred, gt, np.random.default_rng(seed))
        assert corrective_point(pred, gt, np.random.default_rng(seed)) == (x, y, label)
        if label == 1:
            assert gt[y, x] and not pred[y, x]
        else:
            assert pred[y, x] and not gt[y, x]
        # the chosen region is the largest error component
        err = (gt & ~pred) if label == 1 else (pred & ~gt)
        comps, _ = ndimage.label(err)
        largest = max(np.bincount(ndimage.label(gt & ~pred)[0].ravel())[1:].max(initial=0),
                      np.bincount(ndimage.label(pred & ~gt)[0].ravel())[1:].max(initial=0))
        assert (comps == comps[y, x]).sum() == largest


# ---------------------------------------------------------------- intensity


def test_normalize_uint8_kept():
    img = RNG.integers(0, 256, (16, 20)).astype(np.uint8)
    out = normalize_intensity(img)
    assert out.shape == (16, 20, 3) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], img.astype(np.float32))
    rgb = RNG.integers(0, 256, (16, 20, 3)).astype(np.uint8)
    np.testing.assert_array_equal(normalize_intensity(rgb), rgb.astype(np.float32))


def test_normalize_uint16_percentile():
    img = RNG.integers(100, 5000, (32, 32)).astype(np.uint16)
    lo, hi = np.percentile(img, [DEFAULT_INTENSITY_RULE["low"], DEFAULT_INTENSITY_RULE["high"]])
    expected = np.clip((img.astype(np.float64) - lo) / (hi - lo) * 255, 0, 255)
    out = normalize_intensity(img)
    np.testing.assert_allclose(out[..., 1], expected, atol=1e-3)
    assert out.min() == 0 and out.max() == 255
    # uint8 with the "normalize" option is stretched like any other dtype
    dim = RNG.integers(10, 40, (16, 16)).astype(np.uint8)
    assert normalize_intensity(dim, {"name": "percentile", "low": 0, "high": 100}).max() == 255


def test_normalize_float_constant_rgba_and_rules():
    f = RNG.normal(0.0, 1.0, (24, 24)).astype(np.float32)
    out = normalize_intensity(f, {"name": "percentile", "low": 0.0, "high": 100.0})
    np.testing.assert_allclose(out[..., 0], (f - f.min()) / (f.max() - f.min()) * 255, atol=1e-3)
    np.testing.assert_array_equal(normalize_intensity(np.full((8, 8), 7.5, np.float32)), np.zeros((8, 8, 3)))
    np.testing.assert_array_equal(normalize_intensity(np.full((8, 8), 300, np.uint16)), np.zeros((8, 8, 3)))

    rgba = RNG.integers(0, 256, (10, 12, 4)).astype(np.uint8)
    np.testing.assert_array_equal(normalize_intensity(rgba), rgba[..., :3].astype(np.float32))
    rgba16 = RNG.integers(0, 60000, (10, 12, 4)).astype(np.uint16)
    other_alpha = rgba16.copy()
    other_alpha[..., 3] = 0
    np.testing.assert_array_equal(normalize_intensity(rgba16), normalize_intensity(other_alpha))
    np.testing.assert_array_equal(normalize_intensity(rgba16), normalize_intensity(rgba16[..., :3]))

    raw = np.array([[-5.0, 100.0], [300.0, 12.5]], np.float32)
    np.testing.assert_array_equal(normalize_intensity(raw, {"name": "none"})[..., 2], [[0, 100], [255, 12.5]])
    with pytest.raises(PeftExportError):
        normalize_intensity(raw, {"name": "zscore"})
    with pytest.raises(PeftExportError):
        normalize_intensity(np.zeros((4, 4, 5)))
