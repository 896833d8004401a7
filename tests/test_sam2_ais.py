"""Automatic instance segmentation (AIS) on SAM 2: micro-sam's instance decoder trained with the Hiera adapter on
SAM 2's still-image embedding (``finetune --instance-decoder``, saved and resumed like SAM runs), merged beside
sam2's ``{"model": ...}`` state, exported as SAM's ``ais_decoder`` graph (verified against torch), and
``Sam2Session.segment_instances`` / ``predict --instances`` equal to the torch decoder + the same watershed
(random hiera_t at 128 px)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

pytest.importorskip("sam2", reason="sam2 is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)")
pytest.importorskip("skimage", reason="scikit-image is not installed (pip install 'peftexport[ais]')")

from helpers import randomize_trainables  # noqa: E402
from peft_export.cli.main import app  # noqa: E402
from peft_export.data import make_demo_data  # noqa: E402
from peft_export.errors import PeftExportError  # noqa: E402
from peft_export.evaluation import mean_segmentation_accuracy  # noqa: E402
from peft_export.models import random_instance_decoder  # noqa: E402
from peft_export.models.sam2 import sam2_predictor  # noqa: E402
from peft_export.peft import save_adapter  # noqa: E402
from peft_export.peft.adapters import load_adapter  # noqa: E402
from peft_export.runtime import SamSession  # noqa: E402
from peft_export.runtime.instances import segment_from_maps  # noqa: E402
from peft_export.models.family import predictor_input  # noqa: E402
from peft_export.training.ais import predict_maps  # noqa: E402
from peft_export.training.checkpoint import load_checkpoint  # noqa: E402
from test_ais_runtime import (ais_maps_error, check_no_instance_decoder, check_predict_instances,  # noqa: E402
                              int8_ais_session, nuclei_image)
from test_sam2_export import export, lora_sam2  # noqa: E402

pytestmark = pytest.mark.slow  # trains and exports

ARGS = ["--model", "sam2.1_hiera_t", "--image-size", "128", "--patch-size", "128", "--peft", "lora", "--blocks",
        "late", "--rank", "4", "--lr", "1e-3", "--objects-per-image", "3", "--sub-iterations", "1", "--val-objects",
        "3", "--val-fraction", "0.25", "--val-every", "2", "--seed", "1", "-q", "--instance-decoder"]
STEPS = 2


def finetune(out, data, *extra: str) -> str:
    res = CliRunner().invoke(app, ["finetune", "--data", str(data), "--out", str(out), *ARGS, *extra])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("sam2aisdemo")
    make_demo_data(out, n_images=4, size=128, seed=3)
    return out


@pytest.fixture(scope="module")
def trained(demo, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sam2aisruns") / "run"
    return out, finetune(out, demo, "--iterations", str(STEPS))


@pytest.fixture(scope="module")
def ais_export(trained, tmp_path_factory):
    """The trained run with random non-zero LoRA weights and a decoder whose output layer is scaled and centred
    (each map half above 0.5 on the test image, so the watershed finds objects), saved as a run and exported from
    it (fp32, int8; the int8 with ONNX Runtime's plain dynamic recipe, as ``test_sam2_export``'s)."""
    from peft_export.peft.adapters import load_model_source

    run, _ = trained
    adapted = load_adapter(run)
    randomize_trainables(adapted.model, seed=7, scale=0.02)
    adapted.model.eval()
    out_conv = adapted.instance_decoder.eval().out_conv
    with torch.no_grad():
        out_conv.weight.mul_(25)
        median = np.clip(np.median(torch_pipeline(adapted, nuclei_image())[0].reshape(3, -1), axis=1), 1e-4, 1 - 1e-4)
        out_conv.bias.sub_(torch.from_numpy(np.log(median / (1 - median))).float())  # logit of the median -> 0
    root = tmp_path_factory.mktemp("sam2aisexport")
    save_adapter(adapted, root / "run")
    adapted = load_model_source(adapter=root / "run")
    manifest = export(adapted, root / "export", ("fp32", "int8"))
    return adapted, root / "export", manifest


# ---- training ------------------------------------------------------------------------------------


def test_finetune_trains_and_saves_the_decoder_with_the_hiera_adapter(trained):
    out, output = trained
    assert "AIS decoder 9,591,235" in output and "AIS mSA" in output
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if e["type"] == "step"]
    assert len(steps) == STEPS and all(np.isfinite(e["instance_loss"]) and e["instance_loss"] > 0 for e in steps)
    m = [e for e in log if e["type"] == "val"][-1]["metrics"]
    assert 0 <= m["ais_msa"] <= 1
    assert m["selection_score"] == pytest.approx(np.mean([m["point_dice"], m["box_dice"], m["ais_msa"]]))
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["base"]["model_type"] == "sam2.1_hiera_t" and meta["instance_decoder"]["num_parameters"] == 9591235
    tensors = load_file(str(out / "adapter.safetensors"))
    dec = {k[len("instance_decoder."):]: v for k, v in tensors.items() if k.startswith("instance_decoder.")}
    assert len(dec) == 66 and any(k.startswith("image_encoder.trunk.blocks.") for k in tensors)
    # the decoder trained (moved from the seeded init) and the Hiera LoRA with it (zero-initialised B moved)
    last = load_checkpoint(out)
    assert not torch.equal(last["instance_decoder"]["out_conv.weight"], random_instance_decoder(1 + 3).out_conv.weight)
    assert any(v.abs().max() > 0 for k, v in last["trainables"].items() if "trunk" in k and "w_b_linear" in k)
    adapted = load_adapter(out)
    assert all(torch.equal(v, dec[k]) for k, v in adapted.instance_decoder.state_dict().items())


def test_resume_restores_the_decoder_and_adapter_exactly(trained, demo, tmp_path):
    straight, _ = trained
    finetune(tmp_path / "split", demo, "--iterations", "1")
    res = CliRunner().invoke(app, ["finetune", "--out", str(tmp_path / "split"), "--iterations", str(STEPS),
                                   "--resume", "-q"])
    assert res.exit_code == 0, res.output
    a, b = load_checkpoint(straight), load_checkpoint(tmp_path / "split")
    assert a["step"] == b["step"] == STEPS
    for part in ("instance_decoder", "trainables"):
        assert set(a[part]) == set(b[part])
        assert all(torch.equal(v, b[part][k]) for k, v in a[part].items()), part


def test_merge_keeps_the_decoder_beside_sam2s_state(trained, tmp_path):
    from peft_export.models import load_sam_and_decoder
    from peft_export.models.sam2 import build_sam2_model

    run, _ = trained
    res = CliRunner().invoke(app, ["merge", "--adapter", str(run), "--out", str(tmp_path / "merged.pt")])
    assert res.exit_code == 0, res.output
    assert "AIS maps" in res.output
    payload = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert set(payload) == {"model", "decoder_state"}
    build_sam2_model("sam2.1_hiera_t", 128, checkpoint=tmp_path / "merged.pt")  # sam2's own loader, strict
    _, _, decoder = load_sam_and_decoder(None, tmp_path / "merged.pt")  # --merged: the decoder comes back
    want = load_adapter(run).instance_decoder.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in decoder.state_dict().items())


# ---- export and runtime --------------------------------------------------------------------------


def test_export_writes_the_verified_ais_graph(ais_export):
    adapted, out, manifest = ais_export
    graph = manifest["graphs"]["ais_decoder"]
    assert set(graph) == {"fp32"}  # no int8 AIS decoder, as for SAM: int8 sessions run the fp32 one
    assert "not exported" in manifest["instance_segmentation"]["precision_notes"]["int8"]
    assert graph["fp32"]["parity"]["passed"] and graph["fp32"]["verified_on"][0] == "onnxruntime"
    assert graph["fp32"]["inputs"][0]["shape"] == [1, 256, 8, 8]
    assert graph["fp32"]["outputs"] == [{"name": "instance_maps", "shape": [1, 3, 128, 128], "dtype": "float32"}]
    assert "no_mem_embed" in manifest["instance_segmentation"]["input"]
    # recomputed here, SAM's tolerance: the graph vs the torch decoder
    assert ais_maps_error(out / graph["fp32"]["path"], adapted.instance_decoder, 128)[0] <= 1e-3


def torch_pipeline(adapted, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sam2's SAM2ImagePredictor on the unmerged model + the torch decoder: (maps (3, H, W), labels)."""
    from peft_export.runtime.intensity import normalize_intensity
    from peft_export.runtime.preprocess import to_uint8

    predictor = sam2_predictor(adapted.model)
    with torch.inference_mode():
        predictor.set_image(to_uint8(normalize_intensity(image, adapted.intensity)))
        maps = predict_maps(adapted.instance_decoder, *predictor_input(predictor))
    return maps, segment_from_maps(maps, {})[0]


def test_segment_instances_equals_the_torch_decoder_and_the_same_watershed(ais_export):
    adapted, out, _ = ais_export
    image = nuclei_image()  # 150 x 110, 16-bit: resized to 128 x 128 without keeping the aspect ratio
    session = SamSession(out)
    assert type(session).__name__ == "Sam2Session" and session.has_instance_decoder
    labels, records = session.segment_instances(image)
    assert labels.dtype == np.int32 and labels.shape == image.shape
    assert len(records) == labels.max() >= 3
    # the labels are the torch decoder's on the session's embedding + the same watershed: the same objects, but
    # for pixels where the graph's float rounding (maps within 3e-5 here, the output layer scaled 25x) tips a
    # watershed tie (measured: 2 of 16,500 pixels)
    emb = session.encode(image)
    assert np.array_equal(session.segment_instances(embedding=emb)[0], labels)
    with torch.no_grad():
        torch_maps = predict_maps(adapted.instance_decoder, torch.from_numpy(emb.embedding.copy()), (128, 128),
                                  image.shape)
    maps = session.instance_maps(emb)
    assert maps.shape == torch_maps.shape == (3,) + image.shape
    assert np.abs(maps - torch_maps).max() <= 1e-3  # SAM's AIS export tolerance
    same_decoder = segment_from_maps(torch_maps, {})[0]
    assert same_decoder.max() == labels.max() and (same_decoder != labels).mean() <= 5e-4
    assert mean_segmentation_accuracy(labels, same_decoder)[0] >= 0.99
    # ... and the whole export (encoder graph, resize, AIS graph) against torch end to end (SAM2ImagePredictor +
    # the torch decoder), as SAM's test: mSA >= 0.99
    want_maps, want = torch_pipeline(adapted, image)
    assert np.abs(maps - want_maps).max() <= 5e-3
    msa, _ = mean_segmentation_accuracy(labels, want)
    assert msa >= 0.99, msa
    # on the image of set_image, and with parameters as documented
    session.set_image(image)
    assert np.array_equal(session.segment_instances()[0], labels)
    big = min(r["area"] for r in records) + 1
    _, fewer = session.segment_instances(min_size=big)
    assert len(fewer) < len(records) and all(r["area"] >= big for r in fewer)


def test_int8_session_runs_the_fp32_instance_decoder(ais_export):
    out = ais_export[1]
    session = int8_ais_session(out)  # the int8 encoder, then the fp32 AIS graph
    image = nuclei_image()
    maps8 = session.instance_maps(session.encode(image))
    labels, _ = session.segment_instances(image)
    fp32 = SamSession(out)
    maps32 = fp32.instance_maps(fp32.encode(image))
    # ONNX Runtime's plain dynamic int8 encoder (passed the prompt-mask gate) moves the maps by 0.010 on average
    # here (SAM's tiny test model: 0.008), with the maps centred on 0.5; the watershed still finds objects
    assert np.abs(maps8 - maps32).mean() <= 0.02
    assert labels.shape == image.shape and labels.max() >= 3


def test_predict_instances_command(ais_export, tmp_path):
    out = ais_export[1]
    labels = check_predict_instances(out, tmp_path)  # SAM's checks of the command
    assert np.array_equal(labels, SamSession(out).segment_instances(nuclei_image(), min_size=5)[0])


def test_bad_input_is_one_clear_error(ais_export, tmp_path):
    _, out, _ = ais_export
    session = SamSession(out)
    with pytest.raises(PeftExportError, match="no image set"):
        session.segment_instances()
    emb = session.encode(nuclei_image())
    with pytest.raises(PeftExportError, match="give an image or embedding=, not both"):
        session.segment_instances(nuclei_image(), embedding=emb)
    with pytest.raises(PeftExportError, match="min_size: must be a whole number >= 0"):
        session.segment_instances(embedding=emb, min_size=-1)
    with pytest.raises(PeftExportError, match="foreground_smoothing: must be >= 0"):
        session.segment_instances(embedding=emb, foreground_smoothing=-1.0)
    # a missing AIS graph is named at open
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "ais_decoder.onnx").unlink()
    with pytest.raises(PeftExportError, match="ais_decoder.onnx: ais_decoder file listed in manifest.json is missing"):
        SamSession(broken)


def test_a_sam2_export_without_decoder_says_so(tmp_path):
    out = tmp_path / "export"
    export(lora_sam2(128), out)
    check_no_instance_decoder(out, tmp_path, " .*--instance-decoder")  # SAM's checks: session and command


def test_tiled_ais_assembles_each_tiles_maps_and_equals_the_session_on_the_tile(ais_export):
    """AIS on a SAM 2 image larger than the model input, tile by tile (as SAM's tiled AIS): the assembled maps are
    each tile's own maps on its inner area (a tile's embedding is ``encode_tile``'s, which
    ``test_sam2_tiled`` holds to the session on the crop), and the block-wise watershed equals the whole
    image's; ``session.set_image(image, tile=...)`` + ``segment_instances`` is that."""
    from tiled_helpers import nuclei_mosaic

    from peft_export.runtime.instances import check_ais_params, instances_from_maps
    from volume_helpers import same_up_to_renumbering

    _, export_dir, _ = ais_export
    session = SamSession(export_dir)
    image, _ = nuclei_mosaic(260, 200, seed=4)
    tiled = session.tiled(image, tile=128, halo=32)
    assert len(tiled.grid) > 1
    maps = tiled.instance_maps()
    for tile in (tiled.grid.tiles[0], tiled.grid.tiles[-1]):
        y0, y1, x0, x1 = tile.inner
        np.testing.assert_array_equal(maps[:, y0:y1, x0:x1], tiled.tile_maps(tile))
    labels, records = tiled.segment_instances(block=96, halo=32)
    assert labels.shape == image.shape[:2] and len(records) == labels.max() > 0
    assert same_up_to_renumbering(labels, instances_from_maps(*maps, **check_ais_params({})))
    session.set_image(image, tile=128, halo=32)
    np.testing.assert_array_equal(session.segment_instances()[0], tiled.segment_instances()[0])


def test_automatic_3d_on_a_sam2_ais_export_merges_each_planes_segment_instances(ais_export):
    """``segment_volume`` mode "auto" on a SAM 2 export with the instance decoder is AIS: the 3D labels are the
    project's merge of each plane's ``Sam2Session.segment_instances`` (computed here, plane by plane)."""
    pytest.importorskip("bioimage_cpp", reason="the 3D merge needs bioimage-cpp (pip install '.[volume]')")
    from peft_export import volume as V
    from peft_export.volume.merge import merge_instance_segmentation_3d, relabel_volume

    _, export_dir, _ = ais_export
    session = SamSession(export_dir)
    image = nuclei_image(120, 100).astype(np.float64)  # within the 128-px input: one tile a plane
    stack = np.stack([image, np.roll(image, 3, axis=1), image])  # alike but not equal, as neighbouring z-planes
    stack = np.round(stack / stack.max() * 255).astype(np.uint8)  # uint8: a plane normalises as the stack does
    planes = np.zeros(stack.shape[:3], np.uint32)
    offset = 0
    for z, plane in enumerate(stack):
        labels = relabel_volume(np.asarray(session.segment_instances(embedding=session.encode(plane))[0]))
        planes[z] = np.where(labels > 0, labels + offset, 0)
        offset += int(labels.max())
    assert offset > 0
    got, got_planes = V.segment_volume(session, stack, return_planes=True)
    np.testing.assert_array_equal(got_planes, planes)
    np.testing.assert_array_equal(got, merge_instance_segmentation_3d(planes))
