"""predict: the runtime on a REAL export (merge_and_export) against segment_anything, the
``peftexport predict`` command (outputs, overlays, bad input), the example app."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from peft_export.cli.main import app
from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.errors import PeftExportError
from peft_export.predict.overlay import (
    BOX,
    MASK,
    MIN_CANVAS_WIDTH,
    NEGATIVE,
    POSITIVE,
    annotate,
    label_colors,
    render_overlay,
    save_png,
)
from peft_export.predict import parse_box, parse_points, predict_images
from peft_export.runtime import SamSession
from peft_export.runtime.intensity import normalize_intensity
from peft_export.runtime.preprocess import to_uint8

ROOT = Path(__file__).resolve().parents[1]
BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "segment_anything", "onnx", "scipy"):
            raise ImportError(f"{name} is blocked")
        return None
sys.meta_path.insert(0, _Block())
"""
# Thresholds relaxed so the random model yields masks.
RELAXED = dict(points_per_side=8, points_per_batch=64, pred_iou_thresh=0.0, stability_score_thresh=0.6,
               box_nms_thresh=0.7)


def adapted_model():
    """Tiny SAM + LoRA with random non-zero weights. Random decoders give logits of about +-1,
    so the hypernetwork outputs are scaled: masks and stability scores then mean something."""
    import torch

    adapted = make_adapted(MERGEABLE_CONFIGS["lora"])
    with torch.no_grad():
        for mlp in adapted.model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
            mlp.layers[-1].bias.mul_(30.0)
    return adapted


def real_export(tmp_path_factory) -> Path:
    """One export through the real exporter per test session (shared with test_runtime_torchfree.py)."""
    from peft_export.export import merge_and_export

    out = tmp_path_factory.getbasetemp() / "real_export_lora_x30"
    if not (out / "manifest.json").is_file():
        merge_and_export(adapted_model(), out, precisions=("fp32",), progress=False)
    return out


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return real_export(tmp_path_factory)


@pytest.fixture(scope="module")
def merged_sam():
    from peft_export.peft import merge_peft

    return merge_peft(adapted_model().model).eval()


@pytest.fixture(scope="module")
def session(export) -> SamSession:
    return SamSession(export)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - h * 0.45) ** 2 + (xx - w * 0.6) ** 2 < (min(h, w) * 0.25) ** 2) * 150.0
    im = np.stack([40 + (yy * 1.1) % 90, 60 + (xx * 0.7) % 80, 30 + disc], -1) + rng.normal(0, 12, (h, w, 3))
    return np.clip(im, 0, 255).astype(np.uint8)


def _gray16(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    blobs = sum(((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) * a for cy, cx, r, a in
                [(0.3 * h, 0.3 * w, 20, 9000), (0.7 * h, 0.6 * w, 28, 15000), (0.4 * h, 0.8 * w, 12, 6000)])
    return np.clip(1200 + blobs + rng.normal(0, 400, (h, w)), 0, 65535).astype(np.uint16)


IMAGES = {"rgb_200x137": lambda: _rgb(137, 200, 1), "gray16_211x150": lambda: _gray16(150, 211, 2)}
PROMPTS = [
    dict(point_coords=np.array([[120.0, 60.0]]), point_labels=np.array([1])),
    dict(point_coords=np.array([[30.0, 40.0], [150.0, 100.0], [118.0, 64.0]]), point_labels=np.array([1, 0, 1])),
    dict(box=np.array([60.0, 25.0, 170.0, 120.0])),
    dict(point_coords=np.array([[118.0, 64.0], [8.0, 8.0]]), point_labels=np.array([1, 0]), box=np.array([50, 20, 180, 130])),
]


def _iou(a, b):
    union = (a | b).sum()
    return 1.0 if union == 0 else (a & b).sum() / union


# ---- the runtime on the real export against segment_anything -------------------------------


@pytest.mark.parametrize("name", list(IMAGES))
def test_runtime_on_real_export_matches_sampredictor(session, merged_sam, name):
    from segment_anything import SamPredictor

    image = IMAGES[name]()
    rule = session.manifest["preprocessing"]["intensity"]
    predictor = SamPredictor(merged_sam)
    # What the runtime feeds the model: the intensity rule, then uint8 RGB.
    predictor.set_image(to_uint8(normalize_intensity(image, rule)))
    session.set_image(image)
    ref_emb = predictor.get_image_embedding().numpy()
    assert np.abs(session.get_image_embedding() - ref_emb).max() < 1e-3 * np.abs(ref_emb).max()
    for kwargs in PROMPTS:
        for multimask in (True, False):
            ref, ref_iou, ref_low = predictor.predict(**kwargs, multimask_output=multimask)
            masks, iou, low = session.predict(**kwargs, multimask_output=multimask)
            assert masks.shape == ref.shape == (len(iou),) + image.shape[:2]
            assert np.abs(iou - ref_iou).max() < 1e-3
            for m, r in zip(masks, ref):
                assert _iou(m, r) >= 0.99
            # mask input: the previous low-res logits fed back
            ref2, ref_iou2, _ = predictor.predict(**kwargs, mask_input=ref_low[:1], multimask_output=multimask)
            masks2, iou2, _ = session.predict(**kwargs, mask_input=low[:1], multimask_output=multimask)
            assert np.abs(iou2 - ref_iou2).max() < 1e-3
            for m, r in zip(masks2, ref2):
                assert _iou(m, r) >= 0.99


def test_segment_everything_matches_amg_on_real_export(session, merged_sam):
    """A random model cannot find real objects, so the same merged model through
    SamAutomaticMaskGenerator is the reference: same records, same masks."""
    from segment_anything import SamAutomaticMaskGenerator

    image = _rgb(137, 200, 3)
    # This random model gives nearly the same mask for every point: a high NMS threshold keeps several.
    kw = {**RELAXED, "box_nms_thresh": 0.98}
    ref = SamAutomaticMaskGenerator(merged_sam, **kw).generate(image)
    labels, records = session.segment_everything(**kw, embedding=session.encode(image))
    assert len(ref) >= 2 and labels.shape == image.shape[:2] and len(records) == len(ref)
    for r, rec in zip(ref, records):
        assert np.abs(np.array(rec["bbox"]) - np.array(r["bbox"])).max() <= 1
        assert abs(rec["area"] - r["area"]) <= max(3, r["area"] // 100)
        assert rec["predicted_iou"] == pytest.approx(r["predicted_iou"], abs=1e-3)
        assert rec["stability_score"] == pytest.approx(r["stability_score"], abs=1e-2)
    # The reference painted like the runtime: largest first, smaller ones on top; match by IoU.
    expected = np.zeros(image.shape[:2], np.int32)
    for k in np.argsort([-r["area"] for r in ref], kind="stable"):
        expected[ref[k]["segmentation"]] = k + 1
    for k in range(len(ref)):
        if (expected == k + 1).any():
            assert _iou(labels == k + 1, expected == k + 1) >= 0.9
    assert np.mean(labels == expected) > 0.99


# ---- prompt strings ----------------------------------------------------------------------


def test_parse_points_and_box():
    coords, labels = parse_points(" 10,20 ; 30.5,40,0;7,8,1;")
    np.testing.assert_array_equal(coords, [[10, 20], [30.5, 40], [7, 8]])
    np.testing.assert_array_equal(labels, [1, 0, 1])
    np.testing.assert_array_equal(parse_box("1, 2,30,40.5"), [1, 2, 30, 40.5])
    for bad, match in [("", "no points"), ("10", "not a point"), ("1,2,3,4", "not a point"), ("a,2", "'a'"),
                       ("1,2,5", "label '5'"), ("1,nan", "finite")]:
        with pytest.raises(PeftExportError, match=match):
            parse_points(bad)
    for bad, match in [("1,2,3", "4 numbers"), ("1,2,3,x", "'x'"), ("5,5,1,1", "x0 <= x1"), ("1,,3,4", "4 numbers")]:
        with pytest.raises(PeftExportError, match=match):
            parse_box(bad)


# ---- overlay ---------------------------------------------------------------------------------


def test_render_overlay_draws_masks_prompts_and_labels(tmp_path, monkeypatch):
    image = _gray16(90, 120, 4)
    mask = np.zeros((90, 120), bool)
    mask[20:60, 30:80] = True
    pic = render_overlay(image, masks=mask[None], points=[[40, 30], [100, 70]], point_labels=[1, 0],
                         box=[10, 5, 110, 85])
    assert pic.shape == (90, 120, 3) and pic.dtype == np.uint8
    assert tuple(pic[30, 40]) == POSITIVE and tuple(pic[70, 100]) == NEGATIVE
    assert tuple(pic[5, 60]) == BOX and tuple(pic[50, 110]) == BOX
    plain = render_overlay(image)
    assert (pic[40, 50] != plain[40, 50]).any() and (pic[75, 20] == plain[75, 20]).all()
    labels = np.zeros((90, 120), np.int32)
    labels[10:30, 10:40], labels[50:80, 60:100] = 3, 7
    pic = render_overlay(image, labels=labels)
    colors = label_colors(2)
    assert tuple(pic[10, 20]) == tuple(colors[0]) and tuple(pic[50, 80]) == tuple(colors[1])  # outlines
    assert (pic[0, 0] == plain[0, 0]).all()
    save_png(pic, tmp_path / "a.tmp")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.tmp")), pic)
    monkeypatch.setitem(sys.modules, "PIL", None)  # no Pillow (hence no matplotlib): the zlib writer
    save_png(pic, tmp_path / "b.png")
    assert annotate(pic, "no text without Pillow") is pic
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), pic)


# ---- the CLI ---------------------------------------------------------------------------------


def _run(*args):
    res = CliRunner().invoke(app, ["predict", *map(str, args)])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("inputs")
    rgb, gray = _rgb(137, 200, 5), _gray16(150, 211, 6)
    Image.fromarray(rgb).save(d / "cells.png")
    tifffile.imwrite(d / "nuclei.tif", gray)
    flt = (gray.astype(np.float32) / 65535.0)[:120, :160]
    np.save(d / "float.npy", flt)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return {"dir": d, "cells.png": rgb, "nuclei.tif": gray, "float.npy": flt}


def test_cli_prompts_write_masks_scores_overlays(export, session, inputs, tmp_path):
    d, out = inputs["dir"], tmp_path / "out"
    files = [d / "cells.png", d / "nuclei.tif", d / "float.npy"]
    code, output = _run(export, *files, "--points", "100,60;20,15,0", "--box", "40,20,150,110", "--out", out,
                        "--overlay", "-q")
    assert code == 0, output
    assert "wrote 3 result(s)" in output
    for f in files:
        stem = f.name.split(".")[0]
        image = inputs[f.name]
        mask = tifffile.imread(out / f"{stem}_mask.tif")
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 1}
        rec = json.loads((out / f"{stem}_scores.json").read_text())
        masks, iou, _ = session.predict(point_coords=np.array([[100.0, 60], [20, 15]]), point_labels=np.array([1, 0]),
                                        box=np.array([40.0, 20, 150, 110]), embedding=session.encode(image))
        assert rec["best"] == int(np.argmax(iou)) and np.allclose(rec["scores"], iou, atol=1e-6)
        np.testing.assert_array_equal(mask, masks[rec["best"]])
        assert rec["points"] == [[100.0, 60.0, 1], [20.0, 15.0, 0]] and rec["box"] == [40.0, 20.0, 150.0, 110.0]
        assert rec["shape"] == list(image.shape[:2]) and rec["mask_area"] == int(mask.sum())
        full = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        h, w = image.shape[:2]
        # a header with title and legend above the picture; the picture itself bottom-left
        # at least the image's size, and no empty strip beside the picture
        assert full.shape[0] > h + 20 and full.shape[1] == max(w, MIN_CANVAS_WIDTH) >= w
        header = full[: full.shape[0] - h]
        for color in (MASK, BOX, POSITIVE, NEGATIVE):  # the legend's swatches
            assert (header == color).all(axis=-1).sum() >= 25, color
        pic = full[-h:, :w]
        assert tuple(pic[60, 100]) == POSITIVE and tuple(pic[15, 20]) == NEGATIVE and tuple(pic[20, 90]) == BOX
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_all_masks_and_single_mask(export, inputs, tmp_path):
    f = inputs["dir"] / "nuclei.tif"
    assert _run(export, f, "--box", "40,20,150,110", "--out", tmp_path / "a", "--all-masks", "-q")[0] == 0
    assert tifffile.imread(tmp_path / "a" / "nuclei_mask.tif").shape == (3, 150, 211)
    assert _run(export, f, "--points", "100,60", "--out", tmp_path / "b", "--single-mask", "-q")[0] == 0
    rec = json.loads((tmp_path / "b" / "nuclei_scores.json").read_text())
    assert len(rec["scores"]) == 1 and rec["multimask"] is False and rec["box"] is None


def test_cli_everything_writes_instance_labels(export, session, inputs, tmp_path):
    f = inputs["dir"] / "cells.png"
    code, output = _run(export, f, "--everything", "--points-per-side", "8", "--pred-iou-thresh", "0",
                        "--stability-thresh", "0.5", "--out", tmp_path, "--overlay", "-q")
    assert code == 0, output
    labels = tifffile.imread(tmp_path / "cells_labels.tif")
    ref, recs = session.segment_everything(**RELAXED, embedding=session.encode(inputs["cells.png"]))
    assert labels.dtype == np.uint16 and labels.max() > 0
    np.testing.assert_array_equal(labels, ref)
    rec = json.loads((tmp_path / "cells_scores.json").read_text())
    assert rec["n_objects"] == len(recs) and rec["mode"] == "everything"
    assert (tmp_path / "cells_overlay.png").is_file()


def test_cli_bad_input_is_one_line_exit_2(export, inputs, tmp_path):
    d = inputs["dir"]
    out = tmp_path / "out"
    newer = tmp_path / "newer"
    newer.mkdir()
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["format_version"], manifest["peftexport_version"] = 3, "9.0.0"
    (newer / "manifest.json").write_text(json.dumps(manifest))
    cells, nuclei = d / "cells.png", d / "nuclei.tif"
    cases = [
        ((export, d / "broken.png", "--points", "5,5"), "broken.png: cannot read"),
        ((export, d / "missing.tif", "--points", "5,5"), "missing.tif: file not found"),
        ((export, nuclei, cells, "--points", "205,20"), "cells.png: point 205,20 is outside the image (width 200"),
        ((export, cells, "--box", "10,10,50,140"), "cells.png: box 10,10,50,140 is outside the image"),
        ((tmp_path, cells, "--points", "5,5"), "no manifest.json"),
        ((newer, cells, "--points", "5,5"), "made by peftexport 9.0.0, format 3; this runtime reads formats up to 2"),
        ((export, cells, "--points", "5;6"), "--points: '5' is not a point"),
        ((export, cells, "--points", "5,x"), "--points: cannot parse 'x'"),
        ((export, cells, "--box", "1,2,3"), "--box: expected 'x0,y0,x1,y1'"),
        ((export, cells, "--everything", "--box", "1,2,3,4"), "cannot be combined"),
        ((export, cells), "give --points and/or --box, or --everything"),
        ((export, cells, "--points", "5,5", "--precision", "int8"), "no int8 encoder"),
        ((export, cells, "--points", "5,5", "--precision", "fp64"), "precision: unknown 'fp64'"),
        ((export, cells, d / "sub" / "cells.tif", "--points", "5,5"), "same name as"),
    ]
    (d / "sub").mkdir(exist_ok=True)
    tifffile.imwrite(d / "sub" / "cells.tif", inputs["cells.png"])
    for args, message in cases:
        code, output = _run(*args, "--out", out, "-q")
        assert code == 2, (args, output)
        lines = [ln for ln in output.strip().splitlines() if ln]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, output)
    assert not out.exists()  # nothing ran, nothing written
    # Existing outputs are refused (before any work) unless --overwrite.
    assert _run(export, cells, "--points", "5,5", "--out", out, "-q")[0] == 0
    before = (out / "cells_mask.tif").read_bytes()
    code, output = _run(export, nuclei, cells, "--points", "5,5", "--out", out, "-q")
    assert code == 2 and "cells_mask.tif: already exists (pass --overwrite" in output
    assert not (out / "nuclei_mask.tif").exists() and (out / "cells_mask.tif").read_bytes() == before
    code, output = _run(export, nuclei, cells, "--points", "6,6", "--out", out, "--overwrite", "-q")
    assert code == 0, output
    assert (out / "nuclei_mask.tif").exists()
    assert json.loads((out / "cells_scores.json").read_text())["points"] == [[6.0, 6.0, 1]]


def test_predict_images_library_api(export, inputs, tmp_path):
    recs = predict_images(export, [inputs["dir"] / "float.npy"], tmp_path,
                          points=np.array([[50.0, 40.0, 1], [10, 10, 0]]), box=[20, 10, 120, 100])
    assert len(recs) == 1 and recs[0]["points"] == [[50.0, 40.0, 1], [10.0, 10.0, 0]]
    assert Path(recs[0]["outputs"]["mask"]).is_file() and "overlay" not in recs[0]["outputs"]
    with pytest.raises(PeftExportError, match="everything_options: unknown option 'bogus'"):
        predict_images(export, [inputs["dir"] / "float.npy"], tmp_path, everything=True,
                       everything_options={"bogus": 1})


# ---- the example app -------------------------------------------------------------------------


def test_example_segment_folder(export, session, inputs, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(inputs["cells.png"]).save(folder / "cells.png")
    tifffile.imwrite(folder / "nuclei.tif", inputs["nuclei.tif"])
    boxes = {"cells.png": [[40, 20, 150, 110], [0, 0, 60, 50]], "nuclei.tif": [[100, 60, 180, 140]]}
    with open(tmp_path / "boxes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "x0", "y0", "x1", "y1"])
        for name, bs in boxes.items():
            for b in bs:
                w.writerow([name, *b])
    script = str(ROOT / "examples" / "segment_folder.py")

    def run(*args):
        # Run with torch, scipy, onnx, segment_anything made unimportable: the example must not need them.
        code = BLOCKER + "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
        res = subprocess.run([sys.executable, "-c", code, script, str(export), str(folder), *map(str, args)],
                             capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
        assert res.returncode == 0, res.stderr
        return res.stdout

    out = run(tmp_path / "csv", "--boxes", tmp_path / "boxes.csv")
    assert "cells.png: 2 objects" in out and "nuclei.tif: 1 objects" in out
    for name, bs in boxes.items():
        labels = tifffile.imread(tmp_path / "csv" / f"{Path(name).stem}_labels.tif")
        image = inputs[name]
        masks, _, _ = session.predict_batch(boxes=np.asarray(bs, float), embedding=session.encode(image))
        assert labels.dtype == np.uint16 and labels.shape == image.shape[:2]
        for i, m in enumerate(masks[:, 0]):
            # Where objects overlap the smaller one wins; the rest of each mask carries its id.
            others = np.any([masks[j, 0] for j in range(len(bs)) if j != i and masks[j, 0].sum() < m.sum()], axis=0)
            np.testing.assert_array_equal(labels[m & ~others], i + 1)
        assert (labels[~masks[:, 0].any(0)] == 0).all()
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    run(tmp_path / "json", "--boxes", tmp_path / "boxes.json")
    for name in boxes:
        stem = Path(name).stem
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "json" / f"{stem}_labels.tif"),
                                      tifffile.imread(tmp_path / "csv" / f"{stem}_labels.tif"))
    run(tmp_path / "one", "--box", "40,20,150,110")
    one = tifffile.imread(tmp_path / "one" / "cells_labels.tif")
    assert set(np.unique(one)) <= {0, 1}
    run(tmp_path / "all", "--everything", "--points-per-side", "8", "--pred-iou-thresh", "0",
        "--stability-thresh", "0.5")
    ref, _ = session.segment_everything(**RELAXED, embedding=session.encode(inputs["cells.png"]))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "all" / "cells_labels.tif"), ref)


# ---- frictions a new user met (issues 24 §4, 25 §3) ---------------------------------------------


@pytest.mark.parametrize("n, says", [("100000", "100000 is too large"), ("2000", "2000 is too large"),
                                     ("-4", "must be >= 1, got -4")])
def test_points_per_side_bounded_before_any_work(export, inputs, tmp_path, n, says):
    out = tmp_path / "never"
    code, output = _run(export, inputs["dir"] / "cells.png", "--everything", "--points-per-side", n, "--out", out, "-q")
    assert code == 2 and f"--points-per-side: {says}" in output and "points_per_side" not in output
    assert len(output.strip().splitlines()) == 1 and not out.exists()  # one line, nothing created


def test_resume_skips_complete_images_and_redoes_the_rest(export, inputs, tmp_path):
    d, out = inputs["dir"], tmp_path / "out"
    files = [d / "cells.png", d / "nuclei.tif"]
    assert _run(export, files[0], "--box", "40,20,150,110", "--out", out, "-q")[0] == 0
    first = (out / "cells_mask.tif").stat().st_mtime_ns
    (out / "nuclei_mask.tif").write_bytes(b"torn")  # a stopped run: mask written, no scores.json
    code, output = _run(export, *files, "--box", "40,20,150,110", "--out", out, "-q")
    assert code == 2 and "--resume" in output  # without --resume an existing output still blocks
    code, output = _run(export, *files, "--box", "40,20,150,110", "--out", out, "--resume", "-q")
    assert code == 0, output
    assert "skipped 1 image(s)" in output and "wrote 1 result(s)" in output
    assert (out / "cells_mask.tif").stat().st_mtime_ns == first  # not redone
    assert tifffile.imread(out / "nuclei_mask.tif").shape == inputs["nuclei.tif"].shape  # redone whole
    assert "--resume" in CliRunner().invoke(app, ["predict", "--help"]).output
    # a folder: its images; the finished ones skipped
    folder = tmp_path / "folder"
    folder.mkdir()
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    code, output = _run(export, folder, "--box", "40,20,150,110", "--out", out, "--resume", "-q")
    assert code == 0 and "skipped 2 image(s)" in output and "wrote 0 result(s)" in output, output


def test_progress_bar_ends_before_the_result_lines(export, inputs, tmp_path):
    code = "import sys; from peft_export.cli.main import app; sys.argv=['peftexport']+sys.argv[1:]; app()"
    args = [sys.executable, "-c", code, "predict", str(export), str(inputs["dir"] / "cells.png"), "--everything",
            "--points-per-side", "4", "--out", str(tmp_path / "o")]
    log = tmp_path / "log.txt"
    with open(log, "wb") as f:  # one stream, unbuffered: the order a user's terminal shows
        subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    text = log.read_text(errors="replace")
    assert "objects ->" in text and "predict: 100%" in text, text
    assert text.rindex("predict:") < text.index("objects ->"), text


def test_predict_batch_refuses_a_huge_mask_stack_and_returns_low_res_without_it(session, monkeypatch):
    import peft_export.runtime.session as session_module

    emb = session.encode(_rgb(90, 120, 3))
    boxes = np.array([[10, 10, 60, 50], [30, 20, 100, 80]], np.float64)
    masks, iou, low = session.predict_batch(boxes=boxes, embedding=emb)
    assert masks.shape == (2, 1, 90, 120)
    monkeypatch.setattr(session_module, "MAX_BATCH_MASK_BYTES", 2 * 90 * 120 - 1)
    with pytest.raises(PeftExportError, match=r"predict_batch: 2 prompts x 1 masks x 90x120 bool .* masks=False"):
        session.predict_batch(boxes=boxes, embedding=emb)
    none, iou2, low2 = session.predict_batch(boxes=boxes, embedding=emb, masks=False)
    assert none is None and np.array_equal(low2, low) and np.array_equal(iou2, iou)
