"""Propagation through z against micro-sam's own ``segment_mask_in_volume`` run on segment_anything's
SamPredictor with the same merged weights (a tiny LoRA model at 1024 px, the size micro-sam's mask
prompt assumes): every projection mode, one annotated slice carried outwards (with and without a
stop by IoU), two annotated slices filled in between (odd and even gaps), stop_lower/stop_upper.

Both run on the same plane embeddings (the export's; that the export's encoder matches torch's is
``test_predict``'s claim), so what is compared is the propagation itself: prompts derived from
masks, the decoder, the IoU stop, the order of slices."""

from __future__ import annotations

import numpy as np
import pytest

from peft_export.runtime import SamSession
from peft_export.volume import VolumeEmbeddings, segment_object_in_volume, stack_from_array
from helpers import MERGEABLE_CONFIGS, make_adapted

pytestmark = pytest.mark.slow  # a tiny export at 1024 px


def _adapted_1024():
    import torch

    adapted = make_adapted(MERGEABLE_CONFIGS["lora"], image_size=1024)
    with torch.no_grad():  # random decoders give logits of about +-1: scaled so masks mean something
        for mlp in adapted.model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
            mlp.layers[-1].bias.mul_(30.0)
    return adapted


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    mds = pytest.importorskip("micro_sam.multi_dimensional_segmentation",
                              reason="micro-sam (its multi_dimensional_segmentation) is not installed")
    import torch
    from segment_anything import SamPredictor

    from peft_export.data.synthetic_volume import synthetic_volume
    from peft_export.export import merge_and_export
    from peft_export.peft import merge_peft

    torch.set_num_threads(1)
    adapted = _adapted_1024()
    out = tmp_path_factory.mktemp("fid") / "export"
    merge_and_export(adapted, out, precisions=("fp32",), progress=False)
    image, gt = synthetic_volume((5, 96, 96), seed=2, n_objects=(3, 4), radius=(10.0, 16.0))
    scale = np.percentile(image, 99.9) - 100
    planes = (np.clip((image.astype(np.float64) - 100) / scale, 0, 1) * 255).astype(np.uint8)
    vol = VolumeEmbeddings(SamSession(out), stack_from_array(planes))
    vol.compute()
    predictor = SamPredictor(merge_peft(adapted.model).eval())
    e = vol.embedding(0)
    embeddings = {"features": np.stack([vol.embedding(z).embedding for z in range(len(planes))]),
                  "input_size": e.input_size, "original_size": e.original_size}
    return mds, vol, predictor, embeddings, planes


def _iou(a, b):
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def _start_mask(setup, z, box):
    _, vol, _, _, _ = setup
    masks, _, _ = vol.session.predict(box=np.array(box, float), multimask_output=False, embedding=vol.embedding(z))
    return masks[0].astype(np.uint8)


@pytest.mark.parametrize("projection", ["box", "mask", "points", "points_and_mask", "single_point"])
def test_propagation_equals_micro_sam(setup, projection):
    m = {z: _start_mask(setup, z, box) for z, box in ((0, [20, 25, 70, 80]), (2, [25, 20, 75, 75]),
                                                       (4, [30, 20, 75, 70]))}
    cases = [
        ({2: m[2]}, dict(iou_threshold=0.9)),  # outwards from one slice, stopped where the masks change
        ({0: m[0], 4: m[4]}, dict(iou_threshold=0.5)),  # a gap of 4: from both ends, the middle from the OR
        ({0: m[0], 2: m[2], 4: m[4]}, dict(iou_threshold=0.5, stop_lower=True, stop_upper=True)),  # gaps of 2
    ]
    if projection in ("points", "points_and_mask"):  # a random model's ragged masks give many points: slow
        cases = cases[1:2]
    stops = []
    for annotations, kw in cases:
        mds, vol, predictor, embeddings, planes = setup
        seg = np.zeros(planes.shape, np.uint8)
        for z, m in annotations.items():
            seg[z] = m
        ref, ref_span = mds.segment_mask_in_volume(
            seg, predictor, embeddings, np.array(sorted(annotations)), kw.get("stop_lower", False),
            kw.get("stop_upper", False), kw["iou_threshold"], projection, box_extension=0.05)
        ours, span = segment_object_in_volume(vol, annotations, projection=projection, box_extension=0.05, **kw)
        assert span == tuple(int(v) for v in ref_span), (kw, span, ref_span)
        for z in range(len(planes)):
            assert _iou(ours[z] == 1, ref[z] == 1) >= 0.99, (kw, z)
        stops.append(span)
    assert stops[-1] == (0, 4)


@pytest.mark.parametrize("box_extension", [0.0, 0.05, 3])
def test_prompts_from_a_mask_equal_micro_sams(box_extension):
    """The box and the points (every point, and the single point) a mask gives equal micro-sam's
    ``_compute_box_from_mask`` / ``_compute_points_from_mask`` on blobs of every shape, touching the
    border too (our outer boundary is computed without scikit-image's morphology)."""
    psg = pytest.importorskip("micro_sam.prompt_based_segmentation", reason="micro-sam is not installed")
    from scipy import ndimage as ndi

    from peft_export.volume.mask_prompts import box_from_mask, points_from_mask

    rng = np.random.default_rng(7)
    for i in range(40):
        h, w = (int(v) for v in rng.integers(8, 90, 2))
        mask = ndi.gaussian_filter(rng.random((h, w)), sigma=float(rng.uniform(1, 4))) > rng.uniform(0.45, 0.55)
        if not mask.any():
            continue
        mask = mask.astype(np.uint8)
        np.testing.assert_array_equal(box_from_mask(mask, box_extension),
                                      psg._compute_box_from_mask(mask, box_extension=box_extension))
        for single in (False, True):
            ours, our_labels = points_from_mask(mask, box_extension, single)
            theirs, their_labels = psg._compute_points_from_mask(mask, None, box_extension, use_single_point=single)
            np.testing.assert_array_equal(ours, theirs, err_msg=f"blob {i}, single_point={single}")
            np.testing.assert_array_equal(our_labels, their_labels)
