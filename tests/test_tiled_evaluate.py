"""mSA of large label images block by block equals the whole-image mSA."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from peft_export.errors import PeftExportError
from peft_export.evaluation import mean_segmentation_accuracy
from peft_export.evaluation.large import mean_segmentation_accuracy_large
from tiled_helpers import nuclei_mosaic


def test_blockwise_msa_equals_whole_image_msa(tmp_path):
    from scipy import ndimage

    _, gt = nuclei_mosaic(300, 520, seed=2)
    rng = np.random.default_rng(0)
    pred = ndimage.grey_dilation(gt, size=3)  # objects grown: IoUs spread over the thresholds
    pred[rng.random(gt.shape) < 0.02] = 0
    pred[200:230, 100:160] = 9999  # a false positive
    pred[pred == 5] = 0  # a false negative
    z = zarr.open_array(str(tmp_path / "pred.zarr"), mode="w", shape=pred.shape, chunks=(64, 64), dtype="uint32",
                        zarr_format=2)
    z[:] = pred
    ref, ref_per = mean_segmentation_accuracy(pred, gt)
    got, per = mean_segmentation_accuracy_large(z, gt, block=64)
    assert abs(got - ref) < 1e-12 and per == ref_per and 0.05 < got < 0.95
    assert mean_segmentation_accuracy_large(gt, gt, block=50)[0] == 1.0
    with pytest.raises(PeftExportError, match="differ"):
        mean_segmentation_accuracy_large(pred[:10], gt)
