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


@pytest.mark.slow  # one tiny export with an instance decoder
def test_cli_evaluate_scores_tiled_ais_on_large_labelled_images(tmp_path_factory, tmp_path):
    import json

    import tifffile
    from typer.testing import CliRunner

    from peft_export.cli.main import app
    from peft_export.runtime import SamSession
    from tiled_helpers import ais_export_dir

    export = ais_export_dir(tmp_path_factory)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    expected = []
    for i, (h, w) in enumerate([(300, 270), (200, 330)]):
        image, gt = nuclei_mosaic(h, w, seed=40 + i)
        tifffile.imwrite(data / "images" / f"slide{i}.tif", image)
        z = zarr.open_array(str(data / "labels" / f"slide{i}.zarr"), mode="w", shape=gt.shape, chunks=(100, 100),
                            dtype="uint32", zarr_format=2)
        z[:] = gt
        pred, _ = SamSession(export).tiled(image, tile=96, halo=24).segment_instances()
        expected.append(mean_segmentation_accuracy(pred, gt)[0])
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", str(export), "--data", str(data), "--ais", "--tile", "96", "--halo", "24",
                              "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    (row,) = report["rows"]
    got = [r["msa"] for r in row["images"]]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert abs(row["msa"] - np.mean(expected)) < 1e-12 and row["images"][0]["tiles"] == 42
    assert f"{row['msa']:.3f}" in res.output and (tmp_path / "out" / "evaluation.md").is_file()
    for args, says in [(["random:tiny", "--ais", "--tile", "96"], "evaluated with export dirs"),
                       ([str(export), "--tile", "96"], "evaluated with --ais")]:
        res = runner.invoke(app, ["evaluate", *args, "--data", str(data), "-o", str(tmp_path / "bad"), "-q"])
        assert res.exit_code == 2 and says in res.output and not (tmp_path / "bad").exists(), res.output
