"""vit_t exports: merge-and-export writes verified graphs (encoder, decoders, ais_decoder, shared trunk)
and the torch-free runtime predicts, segments everything and segments instances on them."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch

from peft_export.data import synthetic_sample
from peft_export.errors import PeftExportError
from peft_export.evaluation import TorchPredictor, mean_segmentation_accuracy
from peft_export.export import merge_and_export, merge_and_export_adapters
from peft_export.models import random_instance_decoder
from peft_export.runtime import SamSession
from test_vit_t_peft import adapted_vit_t

pytestmark = pytest.mark.slow  # each export takes seconds to tens of seconds

warnings.filterwarnings("ignore", message="no checkpoint given")

LATE_LORA = dict(method="lora", rank=4, targets=("q", "k", "v", "mlp"), blocks="late")


def nuclei_image() -> np.ndarray:
    image, _ = synthetic_sample(256, seed=31)
    return np.ascontiguousarray(image[:240, :200])  # portrait: resize + pad


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.set_num_threads(1)
    adapted = adapted_vit_t(LATE_LORA)
    adapted.instance_decoder = random_instance_decoder(3)
    out = tmp_path_factory.mktemp("vit_t") / "export"
    manifest = merge_and_export(adapted, out, precisions=("fp32", "fp16"), progress=False)
    return adapted, out, manifest


def _probe(size: int = 256, seed: int = 12) -> np.ndarray:
    """A probe image of another seed than the export's own checks use."""
    from peft_export.merge import probe_inputs

    return probe_inputs(size, seed)[0].numpy()


def test_manifest_holds_verified_vit_t_graphs(export):
    # The written graphs computed again here on every CPU backend (not the export's recorded parity):
    # fp32 = torch to float rounding, fp16 close, the AIS decoder's maps on the torch embedding.
    from peft_export.export.gates import graph_runner, verify_backends

    adapted, out, manifest = export
    assert manifest["model_type"] == "vit_t" and manifest["image_size"] == 256
    graphs = manifest["graphs"]
    assert graphs["encoder"]["fp32"]["outputs"][0]["shape"] == [1, 256, 16, 16]
    x = _probe()
    with torch.no_grad():
        want = adapted.model.image_encoder(torch.from_numpy(x)).numpy()
        maps = adapted.instance_decoder.eval()(torch.from_numpy(want)).numpy()
    if importlib.util.find_spec("openvino"):
        assert "openvino" in graphs["encoder"]["fp32"]["parity_by_backend"]
    for backend in verify_backends():
        got = {p: graph_runner(out / graphs["encoder"][p]["path"], backend)({"image": x})["image_embeddings"]
               for p in ("fp32", "fp16")}
        assert np.abs(got["fp32"] - want).max() <= 1e-4 * np.abs(want).max(), backend
        cos = float((got["fp16"] * want).sum() / np.linalg.norm(got["fp16"]) / np.linalg.norm(want))
        assert cos >= 0.99, (backend, cos)
        run = graph_runner(out / graphs["ais_decoder"]["fp32"]["path"], backend)
        assert np.abs(next(iter(run({"image_embeddings": want}).values())) - maps).max() <= 5e-3, backend


def test_runtime_predicts_like_torch(export):
    adapted, out, _ = export
    image = nuclei_image()
    session = SamSession(out)
    torch_pred = TorchPredictor(adapted.model, adapted.intensity, instance_decoder=adapted.instance_decoder)
    session.set_image(image)
    torch_pred.set_image(image)
    points, labels = np.array([[100.0, 120.0], [40.0, 60.0]]), np.array([1, 0])
    masks, scores, _ = session.predict(point_coords=points, point_labels=labels)
    want, want_scores, _ = torch_pred.predict(point_coords=points, point_labels=labels)
    assert masks.shape == want.shape == (3, 240, 200)
    agree = (masks == want).mean()
    assert agree >= 0.995, agree
    assert np.abs(scores - want_scores).max() <= 1e-3


def test_segment_everything_and_instances(export):
    adapted, out, _ = export
    image = nuclei_image()
    session = SamSession(out)
    everything, records = session.segment_everything(points_per_side=8, pred_iou_thresh=0.0,
                                                     stability_score_thresh=0.0, embedding=session.encode(image))
    assert everything.shape == image.shape and len(records) == everything.max() > 0
    labels, recs = session.segment_instances(image)
    assert labels.shape == image.shape and labels.dtype == np.int32
    torch_pred = TorchPredictor(adapted.model, adapted.intensity, instance_decoder=adapted.instance_decoder)
    torch_pred.set_image(image)
    want, _ = torch_pred.segment_instances()
    if want.max() == 0:
        assert labels.max() == 0
    else:
        assert mean_segmentation_accuracy(labels, want)[0] >= 0.99


def test_shared_trunk_of_two_late_lora_adapters(tmp_path):
    torch.set_num_threads(1)
    a, b = adapted_vit_t(LATE_LORA, seed=0), adapted_vit_t(dict(LATE_LORA, blocks="7-9"), seed=0)
    out = tmp_path / "multi"
    manifest = merge_and_export_adapters({"a": a, "b": b}, out, progress=False)
    trunk = manifest["graphs"]["trunk"]["fp32"]  # its chain to torch: measured below, through the runtime
    assert trunk["outputs"][0]["shape"] == [1, 16, 16, 160]  # split at block 5: stage 2's grid and width
    image = nuclei_image()
    got = SamSession(out).encode(image, ["a"]).embedding("a").embedding
    single = tmp_path / "single"
    merge_and_export(a, single, progress=False)
    want = SamSession(single).encode(image).embedding
    assert got.shape == want.shape == (1, 256, 16, 16)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("attention", ["folded", "fused"])
def test_vit_b_attention_rewrites_are_refused_by_name(tmp_path, attention):
    adapted = adapted_vit_t(LATE_LORA)
    with pytest.raises(PeftExportError, match="--attention folded/fused: vit_t"):
        merge_and_export(adapted, tmp_path / "x", attention=attention, progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_exports_a_micro_sam_vit_t_model_with_its_decoder(tmp_path):
    """A fully fine-tuned micro-sam vit_t file (model_state with 'sam.' keys + decoder_state), exported by the CLI."""
    from typer.testing import CliRunner

    from peft_export.cli.main import app
    from peft_export.models import random_sam

    sam = random_sam("vit_t", 256, seed=8)
    decoder = random_instance_decoder(4)
    ckpt = tmp_path / "vit_t_lm.pt"
    torch.save({"model_state": {"sam." + k: v for k, v in sam.state_dict().items()},
                "decoder_state": decoder.state_dict()}, ckpt)
    out = tmp_path / "export"
    res = CliRunner().invoke(app, ["merge-and-export", "--merged", str(ckpt), "--model", "vit_t", "--image-size", "256",
                                   "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    session = SamSession(out)
    assert session.has_instance_decoder
    labels, _ = session.segment_instances(nuclei_image())
    assert labels.shape == (240, 200)
    res = CliRunner().invoke(app, ["merge-and-export", "--merged", str(ckpt), "--model", "vit_b", "-o",
                                   str(tmp_path / "no"), "-q"])
    assert res.exit_code == 2 and "checkpoint is vit_t" in res.output
    # --micro-sam with a method that adds no layer imports the same model (micro-sam files need --peft).
    from peft_export.peft import PeftConfig
    from peft_export.peft.adapters import load_model_source

    imported = load_model_source(micro_sam=ckpt, micro_sam_config=PeftConfig(method="freeze-encoder"), model_type="vit_t")
    assert imported.instance_decoder is not None
    assert all(torch.equal(v, sam.state_dict()[k]) for k, v in imported.model.state_dict().items())


def test_adaptformer_stays_in_the_vit_t_graph(tmp_path):
    adapted = adapted_vit_t(dict(method="adaptformer", blocks="8-9", bottleneck=8))
    manifest = merge_and_export(adapted, tmp_path / "af", precisions=("fp32",), progress=False)
    from peft_export.export.gates import graph_runner

    x = _probe()
    with torch.no_grad():
        want = adapted.model.image_encoder(torch.from_numpy(x)).numpy()
    got = graph_runner(tmp_path / "af" / manifest["graphs"]["encoder"]["fp32"]["path"])({"image": x})["image_embeddings"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()  # the branch computes what torch's does
    import onnx

    graph = onnx.load(str(tmp_path / "af" / "encoder.onnx"), load_external_data=False)
    assert any("down_proj" in n.name for n in graph.graph.node)  # the branch is in the graph


def test_int8_keeps_the_last_stage_mlps_in_fp32_and_passes_the_gate(tmp_path):
    """The default vit_t int8 recipe (measured on seed 0) on another random model and adapter."""
    adapted = adapted_vit_t(dict(LATE_LORA, blocks="6-9"), seed=1)
    manifest = merge_and_export(adapted, tmp_path / "q", precisions=("fp32", "int8"), progress=False)
    int8 = manifest["graphs"]["encoder"]["int8"]
    excluded = int8["int8_recipe"]["exclude"]
    assert len(excluded) == 4 and all("/layers.3/" in n and "/mlp/" in n for n in excluded)
    # the gate, measured again here on an image neither the recipe nor the export's gate saw
    from peft_export.export.agreement import mask_agreement
    from peft_export.export.gates import graph_runner

    x = _probe()
    with torch.no_grad():
        want = adapted.model.image_encoder(torch.from_numpy(x))
    got = graph_runner(tmp_path / "q" / int8["path"])({"image": x})["image_embeddings"]
    agreement = mask_agreement(adapted.model, want, got, 32)
    assert agreement["mask_iou_mean"] >= 0.99 and agreement["mask_iou_min"] >= 0.97
