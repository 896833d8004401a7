"""peftexport web: the site builder on a real export, and the page in a real browser (Debian's
chromium driven by puppeteer-core) against SamSession.predict on the same prompts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from peft_export.cli.main import app
from peft_export.errors import PeftExportError
from peft_export.evaluation.metrics import iou
from peft_export.predict import read_image
from peft_export.predict.overlay import display_image
from peft_export.runtime import SamSession
from peft_export.runtime.backends.ort import OrtBackend
from peft_export.web import ORT_FILES, ORT_WEB_VERSION, build_site, decode_shown, ortweb, site as site_module
from peft_export.web.serve import make_server
from test_predict import real_export

# Each test exports or trains (tiny models, seconds to a minute): slow, still run in CI.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "web" / "drive_page.mjs"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return real_export(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """A 16-bit gray TIFF (wider than tall) and an RGB PNG (taller than wide): both aspect ratios."""
    d = tmp_path_factory.mktemp("web_images")
    rng = np.random.default_rng(6)
    h, w = 150, 211
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - 70) ** 2 + (xx - 120) ** 2) < 40**2
    gray = (1000 + 20000 * disc + rng.normal(0, 800, (h, w))).clip(0, 65535).astype(np.uint16)
    tifffile.imwrite(d / "nuclei.tif", gray)
    h, w = 190, 133
    yy, xx = np.mgrid[0:h, 0:w]
    blob = (((yy - 110) / 45.0) ** 2 + ((xx - 60) / 30.0) ** 2) < 1
    rgb = np.stack([40 + 150 * blob, 60 + (xx % 50), 90 + 100 * blob], -1) + rng.normal(0, 10, (h, w, 3))
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(d / "cells.png")
    return [d / "nuclei.tif", d / "cells.png"]


def _needs_ort_web() -> None:
    """Sites need onnxruntime-web's files (npm); without them skip, naming the package."""
    try:
        ortweb.find_ort_files()
    except PeftExportError as exc:
        pytest.skip(f"onnxruntime-web (npm) is not installed: {exc}")


@pytest.fixture(scope="module")
def site(export, images, tmp_path_factory) -> Path:
    _needs_ort_web()
    out = tmp_path_factory.mktemp("web") / "site"
    build_site(export, images, out, progress=False)
    return out


# ---- the site on disk ----------------------------------------------------------------------


def test_site_holds_page_decoder_images_embeddings_and_ort(site, export, images):
    meta = json.loads((site / "site.json").read_text())
    for name in ("index.html", "app.js", "sam.js", "style.css", "click_decoder.onnx", "split_image.onnx", "site.json"):
        assert (site / name).is_file(), name
    for name in ORT_FILES:
        assert (site / "ort" / name).stat().st_size > 10_000, name
    assert f"onnxruntime-web {ORT_WEB_VERSION}" in (site / "ort" / "NOTICE.txt").read_text()
    # The page imports onnxruntime-web from the site, never from another host.
    html_js = (site / "index.html").read_text() + (site / "app.js").read_text() + (site / "sam.js").read_text()
    assert "http://" not in html_js.replace("http://127.0.0.1", "") and "https://" not in html_js
    assert "./ort/ort.wasm.min.mjs" in (site / "app.js").read_text()

    session = SamSession(export)
    decoder = meta["decoder"]
    assert {k: decoder[k] for k in ("path", "graph", "precision", "check", "context_graph", "context_file")} == {
        "path": "click_decoder.onnx", "graph": "click_decoder", "precision": "fp32", "check": None,
        "context_graph": "split_image.onnx", "context_file": "context.bin"}
    assert (site / "split_image.onnx").read_bytes() == (export / "split_image.onnx").read_bytes()
    assert not (site / "decoder.onnx").exists() and not (site / "context.bin").exists()  # made per image, in the page
    assert meta["image_size"] == session.image_size and meta["low_res_size"] == session.low_res_size
    assert meta["random_weights"] is True
    g = session.image_size // 16
    for rec, path in zip(meta["images"], images):
        image = read_image(path)
        emb = session.encode(image)
        assert (rec["height"], rec["width"]) == image.shape[:2] == emb.original_size
        assert tuple(rec["input_size"]) == emb.input_size
        stored = np.fromfile(site / rec["embedding"], dtype="<f4").reshape(1, 256, g, g)
        np.testing.assert_array_equal(stored, emb.embedding)  # the runtime's embedding, bit for bit
        shown = np.asarray(Image.open(site / rec["image"]).convert("RGB"))
        np.testing.assert_array_equal(shown, display_image(image, json.loads((export / "manifest.json").read_text())
                                                           ["preprocessing"]["intensity"]))


def test_site_click_decoder_with_its_context_equals_the_export(site, export, images, tmp_path):
    """The site's click decoder (web_graph's rewrite) fed context.bin as the page builds it (split_image's
    outputs at site.json's offsets) gives the export's click decoder's outputs on ONNX Runtime."""
    import onnxruntime as ort

    meta = json.loads((site / "site.json").read_text())
    layout = meta["decoder"]["context"]
    assert [p["name"] for p in layout] == ["image_keys", "layer0_k", "layer0_v", "layer0_q"]
    rec = meta["images"][0]
    embedding = np.fromfile(site / rec["embedding"], dtype="<f4").reshape(meta["embedding_shape"])
    image = ort.InferenceSession(str(site / "split_image.onnx"), providers=["CPUExecutionProvider"])
    context = dict(zip([o.name for o in image.get_outputs()], image.run(None, {"image_embeddings": embedding})))
    blob = bytearray(layout[-1]["offset"] + layout[-1]["length"])
    for part in layout:
        blob[part["offset"]:part["offset"] + part["length"]] = context[part["name"]].astype("<f4").tobytes()
    (tmp_path / "context.bin").write_bytes(bytes(blob))
    shutil.copyfile(site / meta["decoder"]["path"], tmp_path / "click_decoder.onnx")
    web = ort.InferenceSession(str(tmp_path / "click_decoder.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in web.get_inputs()} == {"point_coords", "point_labels", "mask_input", "has_mask_input"}
    assert "LayerNormalization" not in {n.op_type for n in __import__("onnx").load(
        str(tmp_path / "click_decoder.onnx"), load_external_data=False).graph.node}
    full = ort.InferenceSession(str(export / "click_decoder.onnx"), providers=["CPUExecutionProvider"])
    s = meta["low_res_size"]
    rng = np.random.default_rng(0)
    for n, has in [(2, 0.0), (2, 1.0), (5, 1.0)]:
        labels = np.array([[1] * (n - 1) + [-1]], np.float32)
        feeds = {"point_coords": (rng.random((1, n, 2)) * meta["image_size"]).astype(np.float32), "point_labels": labels,
                 "mask_input": rng.normal(0, 3, (1, 1, s, s)).astype(np.float32), "has_mask_input": np.array([has], np.float32)}
        want, got = full.run(None, {**feeds, **context}), web.run(None, feeds)
        assert got[2].tolist() == want[2].tolist()
        for a, b in zip(got[:2], want[:2]):
            assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_decoder_source_prefers_the_click_decoder_and_falls_back(export, tmp_path):
    """Exports made before the click decoder (no click_decoder, or no split_image) get decoder_lowres."""
    manifest = json.loads((export / "manifest.json").read_text())
    assert site_module.decoder_source(export, manifest) == ("click_decoder", export / "click_decoder.onnx")
    if "decoder_lowres" not in manifest["graphs"]:  # written only with --meta-decoder (or TensorRT) now
        from peft_export.export import export_decoder_onnx
        from peft_export.peft import merge_peft
        from test_predict import adapted_model

        export = Path(shutil.copytree(export, tmp_path / "with_lowres"))
        export_decoder_onnx(merge_peft(adapted_model().model), export / "decoder_lowres.onnx", "decoder_lowres")
        manifest["graphs"]["decoder_lowres"] = {"fp32": {"path": "decoder_lowres.onnx"}}
    older = dict(manifest, graphs={k: v for k, v in manifest["graphs"].items() if k != "click_decoder"})
    assert site_module.decoder_source(export, older) == ("decoder_lowres", export / "decoder_lowres.onnx")
    no_context = dict(manifest, graphs={k: v for k, v in manifest["graphs"].items() if k != "split_image"})
    assert site_module.decoder_source(export, no_context)[0] == "decoder_lowres"


def test_site_names_are_unique_and_url_safe(tmp_path):
    paths = [Path("a/my image.tif"), Path("b/my image.tif"), Path("c/é.png")]
    assert site_module._site_names(paths) == ["my_image", "my_image-2", "_"]


def test_bad_inputs_fail_with_one_line_and_write_nothing(export, images, tmp_path):
    _needs_ort_web()
    out = tmp_path / "site"
    with pytest.raises(PeftExportError, match="no_such.tif: no such image file"):
        build_site(export, [images[0], tmp_path / "no_such.tif"], out, progress=False)
    with pytest.raises(PeftExportError, match="--precision: the site's decoder is fp32 or int8"):
        build_site(export, images, out, precision="fp16", progress=False)
    with pytest.raises(PeftExportError, match="--adapter: .* holds one model"):
        build_site(export, images, out, adapter="nuclei", progress=False)
    with pytest.raises(PeftExportError, match="not an export directory"):
        build_site(tmp_path, images, out, progress=False)
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PeftExportError, match="not empty .*--overwrite"):
        build_site(export, images[:1], out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_onnxruntime_web_files_name_the_command(export, images, tmp_path, monkeypatch):
    monkeypatch.delenv(ortweb.ENV_VAR, raising=False)
    monkeypatch.setattr(ortweb, "PACKAGE_DIR", tmp_path / "pkg")
    monkeypatch.setattr(ortweb, "SOURCE_TREE_DIST", tmp_path / "node_modules" / "onnxruntime-web" / "dist")
    with pytest.raises(PeftExportError, match=r"onnxruntime-web: its files are not installed \(run `npm ci`"):
        build_site(export, images, tmp_path / "site", progress=False)
    monkeypatch.setenv(ortweb.ENV_VAR, str(tmp_path))
    with pytest.raises(PeftExportError, match="missing onnxruntime-web file"):
        ortweb.find_ort_files()
    assert not (tmp_path / "site").exists()


def test_package_json_pins_the_version_the_package_expects():
    pkg = json.loads((ROOT / "package.json").read_text())
    assert pkg["dependencies"] == {"onnxruntime-web": ORT_WEB_VERSION}
    assert set(pkg["devDependencies"]) == {"puppeteer-core"}
    lock = json.loads((ROOT / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/onnxruntime-web"]["version"] == ORT_WEB_VERSION


def test_int8_decoder_is_refused_when_its_masks_differ(export, images, tmp_path):
    # The tiny random decoder does not survive dynamic int8 (mean IoU ~0.93 to fp32): refused, nothing written.
    _needs_ort_web()
    with pytest.raises(PeftExportError, match=r"--precision int8: .* mean IoU 0\.\d+ \(< 0\.99\)"):
        build_site(export, images, tmp_path / "site8", precision="int8", progress=False)
    assert not (tmp_path / "site8").exists()


def test_cli_web_prints_sizes_and_how_to_serve(export, images, tmp_path):
    _needs_ort_web()
    out = tmp_path / "site"
    result = CliRunner().invoke(app, ["web", str(export), str(images[0]), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    decoder_mb = ((out / "click_decoder.onnx").stat().st_size + (out / "split_image.onnx").stat().st_size) / 1e6
    assert 15 < decoder_mb < 18  # the mask decoder weights (the same for every SAM encoder)
    assert f"wrote {out}: 1 image(s), click_decoder fp32 {decoder_mb:.1f} MB" in result.output
    assert f"python -m http.server -d {out}" in result.output
    again = CliRunner().invoke(app, ["web", str(export), str(images[0]), "--out", str(out), "-q"])
    assert again.exit_code == 2 and "error:" in again.output and "--overwrite" in again.output


def test_web_progress_bar_counts_the_sites_steps(export, images, tmp_path):
    # `peftexport web` once showed a bar over the embeddings only (empty with no IMAGES) and then sat
    # silent while the decoder, pictures and onnxruntime-web were written.
    _needs_ort_web()
    proc = subprocess.run([sys.executable, "-m", "peft_export.cli", "web", str(export), *map(str, images),
                           "--out", str(tmp_path / "site")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = 2 * len(images) + 2  # embedding + picture per image, the decoder, onnxruntime-web
    shown = [int(n) for n in re.findall(rf"\| *(\d+)/{steps} \[", proc.stderr)]
    assert shown and shown[-1] == steps, proc.stderr[-2000:]


def test_banner_calls_the_validation_dice_what_it_is(tmp_path):
    # The page's note on a random-base model quotes the adapter's validation Dice: the images that picked
    # the best training step, so not a held-out figure.
    from helpers import MERGEABLE_CONFIGS, make_adapted
    from peft_export.peft.adapters import save_adapter

    save_adapter(make_adapted(MERGEABLE_CONFIGS["lora"]), tmp_path / "run",
                 extra={"training": {"train_images": 8},
                        "validation": {"metrics": {"box_dice": 0.71, "point_dice": 0.52}, "files": ["a.tif", "b.tif"]}})
    manifest = {"base": {"sha256": "random-init"}, "source": {"kind": "adapter", "adapter": str(tmp_path / "run")}}
    note = site_module.model_note(manifest)
    assert "fine-tuned on 8 images; validation box Dice 0.71, point Dice 0.52 on 2 images" in note
    assert "held-out box Dice" not in note and "not a held-out test" in note


@pytest.mark.slow
def test_wheel_ships_the_page_and_onnxruntime_web(tmp_path):
    # The packaging step as documented: npm ci, copy onnxruntime-web into the package, build the wheel.
    src = ROOT / "node_modules" / "onnxruntime-web" / "dist"
    if not src.is_dir():
        pytest.skip("onnxruntime-web (npm) is not installed: run `npm ci` in the repository")
    try:
        from setuptools.command.bdist_wheel import bdist_wheel  # noqa: F401 - setuptools >= 70.1
    except ImportError:
        pytest.importorskip("wheel", reason="building a wheel needs setuptools >= 70.1 or the wheel package")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    tree = tmp_path / "tree"
    for rel in files:
        if (ROOT / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tree / rel)
    ortweb.vendor_into_package(src, tree / "peft_export" / "web" / "ort")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(tree)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("peftexport-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in site_module.ASSET_FILES:
        assert f"peft_export/web/assets/{name}" in names
    for name in ORT_FILES + ("NOTICE.txt",):
        assert f"peft_export/web/ort/{name}" in names
    assert wheel.stat().st_size < 6e6, f"wheel {wheel.stat().st_size / 1e6:.1f} MB"
    # Installed from the wheel (no node_modules anywhere), the package finds its own copy.
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    env = {k: v for k, v in os.environ.items() if k != ortweb.ENV_VAR}
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from peft_export.web import ortweb; "
            "folder, how = ortweb.find_ort_files(); print(folder, how)")
    proc = subprocess.run([sys.executable, "-c", code, str(unpacked)], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(unpacked / "peft_export" / "web" / "ort"), "package", "data"]


# ---- sam.js in node: the page's arithmetic against the runtime's, bit for bit ---------------------

SAM_JS_CHECK = """
import { readFileSync, writeFileSync } from 'node:fs';
const sam = await import(process.argv[1]);
const cases = JSON.parse(readFileSync(process.argv[2], "utf8"));
const out = [];
for (const c of cases) {
  const low = new Float32Array(readFileSync(c.low).buffer.slice(0));
  writeFileSync(c.logits, sam.logitsFromLowRes(low, c.s, c.imageSize, c.image));
  const p = sam.encodePrompt(c.points, c.box, c.image);
  out.push({ coords: Array.from(p.coords), labels: Array.from(p.labels), index: sam.shownMaskIndex(c.iou, p.n) });
}
console.log(JSON.stringify(out));
"""


@pytest.mark.parametrize("image_size,hw", [(256, (150, 211)), (256, (190, 133)), (256, (37, 500)),
                                           (256, (100, 80)), (1024, (700, 1024)), (1024, (512, 512))])
def test_sam_js_maps_coordinates_and_masks_exactly_as_the_runtime(image_size, hw, tmp_path):
    if not shutil.which("node"):
        pytest.skip("node is not installed (apt-get install nodejs)")
    from peft_export.runtime import postprocess_masks, preprocess_shape
    from peft_export.runtime.prompts import encode_prompts
    from peft_export.web import shown_mask_index

    h, w = hw
    s = 4 * (image_size // 16)
    rng = np.random.default_rng(h * w)
    image = {"width": w, "height": h, "input_size": list(preprocess_shape(h, w, image_size))}
    low = (rng.standard_normal((s, s)) * 3).astype(np.float32)
    (tmp_path / "low.f32").write_bytes(low.tobytes())
    points = [{"x": int(rng.integers(0, w)), "y": int(rng.integers(0, h)), "label": 1},
              {"x": w - 1, "y": h - 1, "label": 0}]
    cases = [{"low": str(tmp_path / "low.f32"), "logits": str(tmp_path / f"logits{i}.f32"), "s": s,
              "imageSize": image_size, "image": image, "points": pts, "box": box, "iou": [0.1, 0.5, 0.9, 0.3]}
             for i, (pts, box) in enumerate([(points[:1], None), (points, {"x0": 0, "y0": 3, "x1": w, "y1": h - 2}),
                                             ([], {"x0": 5, "y0": 0, "x1": w - 5, "y1": h})])]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    shutil.copyfile(ROOT / "peft_export" / "web" / "assets" / "sam.js", tmp_path / "sam.mjs")
    proc = subprocess.run(["node", "--input-type=module", "-e", SAM_JS_CHECK, "--", (tmp_path / "sam.mjs").as_uri(),
                           str(tmp_path / "cases.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    want_logits = postprocess_masks(low, tuple(image["input_size"]), (h, w), image_size)
    for i, (case, got) in enumerate(zip(cases, results)):
        logits = np.frombuffer((tmp_path / f"logits{i}.f32").read_bytes(), np.float32).reshape(h, w)
        np.testing.assert_array_equal(logits, want_logits)
        pts = lbl = box = None
        if case["points"]:
            pts = np.asarray([[[p["x"], p["y"]] for p in case["points"]]], np.float64)
            lbl = np.asarray([[p["label"] for p in case["points"]]], np.float32)
        if case["box"]:
            b = case["box"]
            box = np.asarray([[b["x0"], b["y0"], b["x1"], b["y1"]]], np.float64)
        coords, labels = encode_prompts(pts, lbl, box, (h, w), image_size)
        np.testing.assert_array_equal(np.asarray(got["coords"], np.float32), coords.reshape(-1))
        np.testing.assert_array_equal(np.asarray(got["labels"], np.float32), labels.reshape(-1))
        assert got["index"] == shown_mask_index(np.asarray(case["iou"]), coords.shape[1])


# ---- the page in headless Chromium ---------------------------------------------------------


def _browser_tools() -> str:
    """Path of chromium, or skip naming what is missing (.ci/run installs all three)."""
    chromium = os.environ.get("PEFTEXPORT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    if not shutil.which("node"):
        pytest.skip("node is not installed (apt-get install nodejs npm)")
    if not (ROOT / "node_modules" / "puppeteer-core").is_dir():
        pytest.skip("puppeteer-core is not installed (run `npm ci` in the repository)")
    return chromium


class _Server:
    """``python -m http.server -d SITE`` (the documented command: no COOP/COEP), or with ``isolate``
    ``peft_export.web.serve`` (COOP/COEP), on 127.0.0.1 and a free port."""

    def __init__(self, folder: Path, isolate: bool) -> None:
        self.folder, self.isolate = folder, isolate

    def __enter__(self) -> str:
        if self.isolate:
            self.httpd = make_server(self.folder, port=0, isolate=True, quiet=True)
            threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
            return "http://127.0.0.1:%d/" % self.httpd.server_address[1]
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "-d",
                                      str(self.folder)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
        port = int(line.split(" port ")[1].split()[0])
        return f"http://127.0.0.1:{port}/"

    def __exit__(self, *exc) -> None:
        if self.isolate:
            self.httpd.shutdown()
            self.httpd.server_close()
        else:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _drive(url: str, steps: list, tmp_path: Path, tag: str, chromium: str) -> dict:
    plan = {"url": url + "index.html", "chromium": chromium, "userDataDir": str(tmp_path / f"profile-{tag}"),
            "screenshot": str(tmp_path / f"{tag}.png"), "downloads": str(tmp_path / f"downloads-{tag}"),
            "steps": steps, "timeoutMs": 120_000}
    (tmp_path / f"{tag}.json").write_text(json.dumps(plan))
    proc = subprocess.run(["node", str(DRIVER), str(tmp_path / f"{tag}.json")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["consoleErrors"] == [] and result["failedRequests"] == [], result
    assert all(u.startswith(url) for u in result["requests"]), "the page asked another host: " + str(result["requests"])
    return result


def _rle_decode(counts: list[int], h: int, w: int) -> np.ndarray:
    values = np.arange(len(counts)) % 2
    return np.repeat(values, counts).astype(bool).reshape(h, w)


def _page_mask(state: dict) -> np.ndarray:
    return _rle_decode(state["rle"], state["height"], state["width"])


@pytest.mark.slow
def test_page_segments_like_sam_session(site, export, images, tmp_path):
    chromium = _browser_tools()
    # Image 1 (cells.png, 133x190): a positive click, a negative click, a box drag, then export.
    steps = [{"select": 1}, {"click": [60, 110]}, {"click": [20, 20], "button": "right"},
             {"drag": [25, 50, 110, 170]}, {"export": True}]
    with _Server(site, isolate=False) as url:  # python -m http.server: no COOP/COEP -> one thread
        result = _drive(url, steps, tmp_path, "plain", chromium)
    states = [s["state"] for s in result["steps"][1:4]]
    assert [s["image"] for s in states] == ["cells"] * 3
    # Coordinates: the page recorded exactly the image pixels that were clicked.
    assert states[0]["points"] == [{"x": 60, "y": 110, "label": 1}]
    assert states[1]["points"][1] == {"x": 20, "y": 20, "label": 0}
    assert states[2]["box"] == {"x0": 25, "y0": 50, "x1": 110, "y1": 170}
    assert states[0]["threads"] == 1 and states[0]["isolated"] is False

    session = SamSession(export)
    session.set_image(read_image(images[1]))
    masks, scores, low = session.predict(point_coords=[[60, 110]], point_labels=[1], multimask_output=True)
    k = int(np.argmax(scores))
    assert states[0]["index"] == k + 1  # multimask outputs are tokens 1..3 of the decoder
    expected = [masks[k]]
    pts, lbl = [[60, 110], [20, 20]], [1, 0]
    masks, _, low = session.predict(point_coords=pts, point_labels=lbl, mask_input=low[k][None],
                                    multimask_output=False)
    expected.append(masks[0])
    masks, _, _ = session.predict(point_coords=pts, point_labels=lbl, box=[25, 50, 110, 170],
                                  mask_input=low[0][None], multimask_output=False)
    expected.append(masks[0])
    for state, want in zip(states, expected):
        assert state["index"] in (0, 1, 2, 3) and want.any()
        assert iou(_page_mask(state), want) >= 0.99, (state["index"], iou(_page_mask(state), want))

    # "export mask" downloaded the shown mask as a PNG.
    assert result["steps"][4]["downloads"] == ["cells_mask.png"]
    png = np.asarray(Image.open(tmp_path / "downloads-plain" / "cells_mask.png").convert("L")) > 127
    np.testing.assert_array_equal(png, _page_mask(states[2]))
    assert result["status"].startswith("decoder ") and " ms" in result["status"]
    assert Image.open(tmp_path / "plain.png").size == (1100, 900)  # the screenshot (kept in tmp, not committed)


@pytest.mark.slow
def test_page_uses_threads_when_cross_origin_isolated(site, export, images, tmp_path):
    chromium = _browser_tools()
    with _Server(site, isolate=True) as url:  # python -m peft_export.web.serve: COOP/COEP headers
        result = _drive(url, [{"drag": [100, 30, 180, 120]}], tmp_path, "isolated", chromium)
    state = result["steps"][0]["state"]
    assert state["isolated"] is True
    assert state["threads"] == max(1, min(os.cpu_count() or 1, 8))
    session = SamSession(export)
    session.set_image(read_image(images[0]))
    masks, scores, _ = session.predict(box=[100, 30, 180, 120], multimask_output=True)
    assert state["index"] == int(np.argmax(scores)) + 1  # a box alone: best multimask output
    assert iou(_page_mask(state), masks[int(np.argmax(scores))]) >= 0.99


@pytest.mark.slow
def test_int8_site_runs_in_the_browser_like_onnxruntime(export, images, tmp_path, monkeypatch):
    # The gate is tested above; here the int8 graph (MatMulInteger, ConvInteger, DynamicQuantizeLinear)
    # must run in onnxruntime-web as it runs in ONNX Runtime, so the gate is lowered for this random
    # decoder. A trained decoder's int8 site clears the real gate: test_demo.py (trained export).
    chromium = _browser_tools()
    _needs_ort_web()
    monkeypatch.setattr(site_module, "INT8_MIN_IOU", 0.0)
    out = tmp_path / "site8"
    summary = build_site(export, images[:1], out, precision="int8", progress=False)
    assert summary["decoder"]["path"] == "click_decoder.int8.onnx"
    assert summary["int8_check"]["quantised"] == "output upscaling MatMuls"
    ops = [n.op_type for n in __import__("onnx").load(str(out / "click_decoder.int8.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("MatMul") > 20  # the upscaling's two products only
    with _Server(out, isolate=False) as url:
        result = _drive(url, [{"click": [120, 70]}], tmp_path, "int8", chromium)
    state = result["steps"][0]["state"]
    session = SamSession(export)
    emb = session.encode(read_image(images[0]))
    from peft_export.export.quantize import quantize_int8
    from peft_export.web.web_graph import web_int8_recipe

    source = export / "click_decoder.onnx"  # the site's graph before web_graph's rewrite:
    quantize_int8(source, tmp_path / "int8.onnx", web_int8_recipe(source))
    backend = OrtBackend({"int8": tmp_path / "int8.onnx", "split_image": export / "split_image.onnx"}, "cpu", None)
    mask, _, index = decode_shown(backend, "int8", emb, session.image_size, points=[[120, 70]], labels=[1])
    assert state["index"] == index
    assert iou(_page_mask(state), mask) >= 0.99


def test_site_of_one_adapter_of_a_shared_trunk_export(images, tmp_path):
    """--adapter: the site carries that adapter's decoder and embeddings (trunk + its head)."""
    _needs_ort_web()
    from helpers import make_adapted
    from peft_export.export import merge_and_export_adapters

    late = dict(method="lora", rank=4, targets=("q", "v"), blocks="late")
    adapters = {"nuclei": make_adapted(late, seed=0), "cells": make_adapted(dict(late, rank=2), seed=0)}
    export = tmp_path / "multi"
    manifest = merge_and_export_adapters(adapters, export, progress=False, meta_decoder=True)  # + decoder_lowres
    assert manifest["shared_trunk"] is not None
    with pytest.raises(PeftExportError, match="--adapter: .*cells, nuclei|--adapter: .*nuclei, cells"):
        build_site(export, images, tmp_path / "none", progress=False)  # two adapters: which one?
    with pytest.raises(PeftExportError, match="--adapter: .*'tissue'"):
        build_site(export, images, tmp_path / "none", adapter="tissue", progress=False)
    assert not (tmp_path / "none").exists()
    out = tmp_path / "site"
    build_site(export, images, out, adapter="cells", progress=False)
    site = json.loads((out / "site.json").read_text())
    assert site["adapter"] == "cells" and site["peft"] == "lora"
    entry = manifest["adapters"]["cells"]
    assert site["decoder"]["graph"] == "click_decoder" and site["decoder"]["context_graph"] == "split_image.onnx"
    assert entry["click_decoder"] == "click_decoder_cells" and entry["split_image"] == "split_image_cells"
    assert (out / "split_image.onnx").read_bytes() == (export / "split_image_cells.onnx").read_bytes()
    session = SamSession(export)
    for rec, path in zip(site["images"], images):
        got = np.frombuffer((out / rec["embedding"]).read_bytes(), "<f4")
        want = {n: session.encode(read_image(path)).embedding(n).embedding.ravel() for n in ("cells", "nuclei")}
        assert np.array_equal(got, want["cells"]) and not np.allclose(got, want["nuclei"])
    # The page's other decoder path: the same export as if made before click decoders existed.
    older = tmp_path / "multi_older"
    shutil.copytree(export, older)
    entry = {k: v for k, v in entry.items() if k not in ("click_decoder", "split_image")}
    old_manifest = dict(manifest, adapters=dict(manifest["adapters"], cells=entry))
    (older / "manifest.json").write_text(json.dumps(old_manifest))
    build_site(older, images, tmp_path / "site_older", adapter="cells", progress=False)
    out = tmp_path / "site_older"
    site = json.loads((out / "site.json").read_text())
    assert site["decoder"]["graph"] == "decoder_lowres" and "context_graph" not in site["decoder"]
    lowres_file = manifest["graphs"][entry["decoder_lowres"]]["fp32"]["path"]
    assert (out / "decoder.onnx").read_bytes() == (export / lowres_file).read_bytes()
    chromium = _browser_tools()
    with _Server(out, isolate=False) as url:
        result = _drive(url, [{"click": [120, 70]}], tmp_path, "adapter", chromium)
    state = result["steps"][0]["state"]
    emb = session.encode(read_image(images[0])).embedding("cells")
    backend = OrtBackend({"lowres": out / "decoder.onnx"}, "cpu", None)
    mask, _, index = decode_shown(backend, "lowres", emb, session.image_size, points=[[120, 70]], labels=[1])
    assert state["index"] == index and iou(_page_mask(state), mask) >= 0.99
