"""The whole model in the browser (`peftexport web --encoder-in-browser`): encoder.js preprocesses an
image bit for bit as the runtime (in node), and in headless Chromium a person's own image, opened with
the file input or dropped on the page, is encoded on onnxruntime-web and clicked like SamSession does."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from peft_export.errors import PeftExportError
from peft_export.evaluation.metrics import iou
from peft_export.predict import read_image
from peft_export.runtime import SamSession
from peft_export.runtime.preprocess import prepare_image
from peft_export.web import build_site, browser_encoder
from peft_export.web.serve import make_server

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "web" / "drive_encoder.mjs"
ENCODER_JS = ROOT / "peft_export" / "web" / "assets" / "encoder.js"
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def _needs(*what: str) -> str | None:
    """Skip naming what is missing (.ci/run installs node, chromium and `npm ci`); chromium's path."""
    from peft_export.web import ortweb

    if "node" in what and not shutil.which("node"):
        pytest.skip("node is not installed (apt-get install nodejs npm)")
    if "chromium" in what:
        chromium = os.environ.get("PEFTEXPORT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
        if not chromium:
            pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
        if not (ROOT / "node_modules" / "puppeteer-core").is_dir():
            pytest.skip("puppeteer-core is not installed (run `npm ci` in the repository)")
        try:
            ortweb.find_ort_files()
        except PeftExportError as exc:
            pytest.skip(f"onnxruntime-web (npm) is not installed: {exc}")
        return chromium
    return None


# ---- encoder.js in node: prepare_image's arithmetic, bit for bit ----------------------------------

PREPARE_CHECK = """
import { readFileSync, writeFileSync } from 'node:fs';
const enc = await import(process.argv[1]);
const cases = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const sizes = [];
for (const c of cases) {
  const r = enc.prepareInput(new Uint8Array(readFileSync(c.rgb)), c.h, c.w, c.enc);
  writeFileSync(c.out, r.input);
  sizes.push(r.inputSize);
}
console.log(JSON.stringify(sizes));
"""

RULES = {"keep": {"name": "percentile", "low": 1.0, "high": 99.8, "uint8": "keep"},
         "normalize": {"name": "percentile", "low": 2.0, "high": 98.0, "uint8": "normalize"},
         "default-percentile": {"name": "percentile", "low": 1.0, "high": 99.8}, "none": {"name": "none"}}


@pytest.mark.parametrize("image_size,hw", [(256, (150, 211)), (256, (190, 133)), (256, (37, 500)), (256, (300, 40)),
                                           (256, (100, 80)), (256, (1000, 900)), (1024, (700, 1024)), (1024, (512, 384))])
def test_encoder_js_prepares_images_exactly_as_the_runtime(image_size, hw, tmp_path):
    """Shrinking and enlarging, either side longest, vertical-first passes (1000x900), both PIL filters,
    every intensity rule, RGB and gray: encoder.js's input tensor equals prepare_image's bit for bit."""
    _needs("node")
    h, w = hw
    rng = np.random.default_rng(h * w)
    cases, wants = [], []
    for i, (rule, interp, gray) in enumerate([("keep", "bilinear", False), ("normalize", "bilinear", False),
                                              ("normalize", "bicubic", True), ("default-percentile", "bilinear", True),
                                              ("none", "bicubic", False)]):
        rgb = (rng.random((h, w, 3)) * 140 + np.linspace(0, 110, w)[None, :, None]).astype(np.uint8)
        if gray:
            rgb = np.repeat(rgb[..., :1], 3, axis=-1)
        rgb.tofile(tmp_path / f"rgb{i}.u8")
        enc = {"image_size": image_size, "intensity": RULES[rule], "interpolation": interp, "pixel_mean": MEAN,
               "pixel_std": STD}
        cases.append({"rgb": str(tmp_path / f"rgb{i}.u8"), "h": h, "w": w, "out": str(tmp_path / f"x{i}.f32"), "enc": enc})
        # The runtime reads a gray PNG as HxW: its percentiles count each pixel once.
        wants.append(prepare_image(rgb[..., 0] if gray else rgb, RULES[rule], image_size, MEAN, STD, interp))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    shutil.copyfile(ENCODER_JS, tmp_path / "encoder.mjs")
    proc = subprocess.run(["node", "--input-type=module", "-e", PREPARE_CHECK, "--", (tmp_path / "encoder.mjs").as_uri(),
                           str(tmp_path / "cases.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for case, size, (x, _, input_size) in zip(cases, json.loads(proc.stdout), wants):
        assert tuple(size) == input_size
        got = np.fromfile(case["out"], np.float32).reshape(x.shape)
        np.testing.assert_array_equal(got, x, err_msg=str(case["enc"]))


# ---- a vit_t export and its sites ---------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A vit_t export at image size 256 with random weights and a merged random late LoRA, fp32 and int8
    (its int8 gate passes with margin: prompt mask IoU mean 0.998)."""
    import warnings

    import torch

    from peft_export.export import merge_and_export
    from test_vit_t_peft import adapted_vit_t

    warnings.filterwarnings("ignore", message="no checkpoint given")
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("vit_t_web") / "export"
    adapted = adapted_vit_t(dict(method="lora", rank=4, targets=("q", "v"), blocks="late"))
    merge_and_export(adapted, out, precisions=("fp32", "int8"), progress=False)
    return out


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    """An RGB PNG taller than wide and a gray PNG wider than tall (both resized up to 256, padded)."""
    d = tmp_path_factory.mktemp("web_encoder_images")
    rng = np.random.default_rng(6)
    h, w = 190, 133
    yy, xx = np.mgrid[0:h, 0:w]
    blob = (((yy - 110) / 45.0) ** 2 + ((xx - 60) / 30.0) ** 2) < 1
    rgb = np.stack([40 + 150 * blob, 60 + (xx % 50), 90 + 100 * blob], -1) + rng.normal(0, 10, (h, w, 3))
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(d / "cells.png")
    h, w = 120, 301
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - 60) ** 2 + (xx - 200) ** 2) < 35**2
    Image.fromarray((30 + 170 * disc + rng.normal(0, 12, (h, w))).clip(0, 255).astype(np.uint8)).save(d / "nuclei.png")
    return [d / "cells.png", d / "nuclei.png"]


@pytest.mark.slow
def test_vit_t_site_carries_the_encoder_by_default(export, pictures, tmp_path):
    _needs("node", "chromium")
    out = tmp_path / "site"
    summary = build_site(export, [], out, progress=False)  # no IMAGES: people open their own
    manifest = json.loads((export / "manifest.json").read_text())
    entry = manifest["graphs"]["encoder"]["fp32"]
    site = json.loads((out / "site.json").read_text())
    assert site["images"] == [] and site["encoder"] == summary["encoder"]
    enc = site["encoder"]
    assert enc["path"] == "encoder.onnx" and enc["external_data"] == ["encoder.onnx.data"]
    for name in [enc["path"]] + enc["external_data"]:
        assert (out / name).read_bytes() == (export / name).read_bytes()
    assert (enc["input"], enc["output"], enc["image_size"]) == ("image", "image_embeddings", 256)
    assert enc["intensity"] == manifest["preprocessing"]["intensity"] and enc["bytes"] == entry["bytes"]
    assert (out / "encoder.js").is_file()
    # Off by request, off by the size rule, refused where the page cannot run it.
    off = build_site(export, pictures[:1], tmp_path / "off", encoder_in_browser=False, progress=False)
    assert off["encoder"] is None and not (tmp_path / "off" / "encoder.onnx").exists()
    assert browser_encoder.browser_encoder_entry(export, dict(manifest, model_type="vit_b"), "fp32", None, None) is None
    assert browser_encoder.browser_encoder_entry(export, manifest, "fp32", None, True) == entry  # any model when asked
    small = browser_encoder.AUTO_MAX_BYTES
    try:
        browser_encoder.AUTO_MAX_BYTES = entry["bytes"] - 1
        assert browser_encoder.browser_encoder_entry(export, manifest, "fp32", None, None) is None
    finally:
        browser_encoder.AUTO_MAX_BYTES = small
    with pytest.raises(PeftExportError, match="IMAGES: give at least one image file"):
        build_site(export, [], tmp_path / "none", encoder_in_browser=False, progress=False)
    with pytest.raises(PeftExportError, match="--precision int8: the int8 decoder is checked on the site's IMAGES"):
        build_site(export, [], tmp_path / "none", precision="int8", progress=False)
    with_fp16 = dict(manifest, graphs=dict(manifest["graphs"], encoder={"fp32": entry, "fp16": entry}))
    with pytest.raises(PeftExportError, match="--encoder-in-browser: the page runs the fp32 or int8 encoder, not fp16"):
        browser_encoder.browser_encoder_entry(export, with_fp16, "fp16", None, True)
    assert browser_encoder.browser_encoder_entry(export, with_fp16, "fp16", None, None) is None
    fp32_only = dict(manifest, graphs=dict(manifest["graphs"], encoder={"fp32": entry}))
    with pytest.raises(PeftExportError, match="--encoder-in-browser: .* no verified int8 encoder"):
        browser_encoder.browser_encoder_entry(export, fp32_only, "int8", None, True)
    with pytest.raises(PeftExportError, match="--encoder-in-browser: not for an export of several adapters"):
        browser_encoder.browser_encoder_entry(export, dict(manifest, adapters={"a": {}}), "fp32", None, True)
    assert not (tmp_path / "none").exists()


def drive(site: Path, steps: list, work: Path, tag: str, chromium: str, isolate: bool = True,
          timeout_ms: int = 180_000) -> dict:
    """Serve ``site`` (peft_export.web.serve's handler: COOP/COEP with ``isolate``) and run
    drive_encoder.mjs's steps in headless Chromium; the driver's JSON result."""
    httpd = make_server(site, port=0, isolate=isolate, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        plan = {"url": url + "index.html", "chromium": chromium, "userDataDir": str(work / f"profile-{tag}"),
                "steps": steps, "timeoutMs": timeout_ms}
        (work / f"{tag}.json").write_text(json.dumps(plan))
        proc = subprocess.run(["node", str(DRIVER), str(work / f"{tag}.json")], capture_output=True, text=True,
                              cwd=ROOT, timeout=timeout_ms / 1000 * (len(steps) + 2))
    finally:
        httpd.shutdown()
        httpd.server_close()
    if proc.returncode != 0:
        raise RuntimeError(f"drive_encoder.mjs failed: {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    result["url"] = url
    return result


def _tensor(step: dict, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(step["base64"]), "<f4").reshape(shape)


def _mask(state: dict) -> np.ndarray:
    counts = state["rle"]
    return np.repeat(np.arange(len(counts)) % 2, counts).astype(bool).reshape(state["height"], state["width"])


@pytest.mark.slow
def test_page_encodes_an_opened_image_and_segments_like_sam_session(export, pictures, tmp_path):
    """Open (file input) an RGB image, click, drag a box; drop a gray image on the page and click; go back
    to the first. Each mask against SamSession.predict on the same image and prompt, the encoder's input
    and embedding against the runtime's."""
    chromium = _needs("node", "chromium")
    site = tmp_path / "site"
    build_site(export, [], site, progress=False)
    cells, nuclei = pictures
    steps = [{"open": str(cells)}, {"tensor": "input"}, {"tensor": "embedding"}, {"click": [60, 110]},
             {"drag": [20, 50, 110, 170]}, {"drop": str(nuclei)}, {"tensor": "embedding"}, {"click": [200, 60]},
             {"open": str(cells)}, {"click": [60, 110]}]
    result = drive(site, steps, tmp_path, "open", chromium)
    assert result["consoleErrors"] == [] and result["failedRequests"] == [], result
    assert all(u.startswith(result["url"]) for u in result["requests"]), "the page asked another host"
    assert result["openVisible"] is True
    s = result["steps"]
    assert s[0]["state"]["image"] == "cells" and s[5]["state"]["image"] == "nuclei" and s[8]["state"]["image"] == "cells-2"
    assert s[0]["state"]["isolated"] is True and s[0]["state"]["threads"] == max(1, min(os.cpu_count() or 1, 8))
    assert result["options"] == ["cells (133x190, opened)", "nuclei (301x120, opened)", "cells-2 (133x190, opened)"]
    assert len(result["encodes"]) == 3 and all(e["encoderMs"] > 0 for e in result["encodes"])

    session = SamSession(export)
    g = session.image_size // 16
    rule = session.manifest["preprocessing"]["intensity"]
    image = read_image(cells)
    x, _, input_size = prepare_image(image, rule, session.image_size)
    np.testing.assert_array_equal(_tensor(s[1], x.shape), x)  # the encoder's input, bit for bit
    assert tuple(s[0]["state"]["inputSize"]) == input_size
    # wasm and native ONNX Runtime sum in other orders: not bit-equal; measured ~1e-6 of the largest value.
    for step, path in ((s[2], cells), (s[6], nuclei)):
        want = session.encode(read_image(path)).embedding
        got = _tensor(step, (1, 256, g, g))
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), np.abs(got - want).max()

    # Masks: the page's decoder on its own embedding vs SamSession on the runtime's. The existing web tests'
    # tolerance (IoU >= 0.99): logits within ~1e-5 of 0 may flip between wasm and native float order.
    session.set_image(image)
    masks, scores, low = session.predict(point_coords=[[60, 110]], point_labels=[1], multimask_output=True)
    k = int(np.argmax(scores))
    assert s[3]["state"]["index"] == k + 1 and masks[k].any()
    assert iou(_mask(s[3]["state"]), masks[k]) >= 0.99
    assert iou(_mask(s[9]["state"]), masks[k]) >= 0.99  # the same file opened again
    box, _, _ = session.predict(point_coords=[[60, 110]], point_labels=[1], box=[20, 50, 110, 170],
                                mask_input=low[k][None], multimask_output=False)
    assert iou(_mask(s[4]["state"]), box[0]) >= 0.99
    session.set_image(read_image(nuclei))  # gray PNG: HxW in the runtime, R=G=B in the browser
    masks, scores, _ = session.predict(point_coords=[[200, 60]], point_labels=[1], multimask_output=True)
    k = int(np.argmax(scores))
    assert s[7]["state"]["index"] == k + 1 and iou(_mask(s[7]["state"]), masks[k]) >= 0.99


@pytest.mark.slow
def test_site_with_images_and_the_encoder_keeps_both(export, pictures, tmp_path):
    """Precomputed IMAGES still work as before next to opened ones (one wasm thread: python -m http.server-like)."""
    chromium = _needs("node", "chromium")
    site = tmp_path / "site"
    build_site(export, pictures[1:], site, progress=False)
    result = drive(site, [{"click": [200, 60]}, {"open": str(pictures[0])}, {"click": [60, 110]}], tmp_path, "mixed",
                   chromium, isolate=False)
    assert result["consoleErrors"] == [] and result["failedRequests"] == [], result
    s = result["steps"]
    assert s[0]["state"]["image"] == "nuclei" and s[0]["state"]["threads"] == 1 and s[2]["state"]["image"] == "cells"
    assert result["options"] == ["nuclei (301x120)", "cells (133x190, opened)"]
    session = SamSession(export)
    for state, path, point in ((s[0]["state"], pictures[1], [200, 60]), (s[2]["state"], pictures[0], [60, 110])):
        session.set_image(read_image(path))
        masks, scores, _ = session.predict(point_coords=[point], point_labels=[1], multimask_output=True)
        k = int(np.argmax(scores))
        assert state["index"] == k + 1 and iou(_mask(state), masks[k]) >= 0.99


@pytest.mark.slow
def test_cli_web_without_images_for_vit_t(export, tmp_path):
    _needs("node", "chromium")
    from typer.testing import CliRunner

    from peft_export.cli.main import app

    out = tmp_path / "site"
    result = CliRunner().invoke(app, ["web", str(export), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    mb = json.loads((out / "site.json").read_text())["encoder"]["bytes"] / 1e6
    assert f"encoder in the browser: encoder.onnx fp32 {mb:.1f} MB" in result.output
    none = CliRunner().invoke(app, ["web", str(export), "--no-encoder-in-browser", "--out", str(tmp_path / "x"), "-q"])
    assert none.exit_code == 2 and "IMAGES: give at least one image file" in none.output


@pytest.mark.slow
def test_int8_encoder_runs_in_the_page(export, pictures, tmp_path):
    """--encoder-precision int8: the page runs the export's int8 encoder (dynamic quantisation:
    DynamicQuantizeLinear, MatMulInteger) on wasm as ONNX Runtime runs it."""
    chromium = _needs("node", "chromium")
    site = tmp_path / "site8"
    summary = build_site(export, [], site, encoder_precision="int8", progress=False)
    assert (summary["encoder"]["path"], summary["encoder"]["precision"]) == ("encoder.int8.onnx", "int8")
    result = drive(site, [{"open": str(pictures[0])}, {"tensor": "embedding"}, {"click": [60, 110]}], tmp_path, "int8",
                   chromium)
    assert result["consoleErrors"] == [] and result["failedRequests"] == [], result
    names = {u.rsplit("/", 1)[-1] for u in result["requests"]}
    assert "encoder.int8.onnx" in names and "encoder.onnx" not in names
    session = SamSession(export, precision="int8")
    image = read_image(pictures[0])
    want = session.encode(image).embedding
    got = _tensor(result["steps"][1], want.shape)
    # wasm and native sum in other orders, so an activation on a rounding boundary is quantised one int8
    # step apart: measured 0.55 % of the largest value (int8 against fp32: 0.85 %).
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max(), np.abs(got - want).max()
    session.set_image(image)
    masks, scores, _ = session.predict(point_coords=[[60, 110]], point_labels=[1], multimask_output=True)
    k = int(np.argmax(scores))
    state = result["steps"][2]["state"]
    assert state["index"] == k + 1 and iou(_mask(state), masks[k]) >= 0.98  # measured 0.992 (int8 steps, above)
