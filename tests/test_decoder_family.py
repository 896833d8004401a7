"""The decoder family (split_image once per image, split_prompts with the mask input, split_masks) serves
SamSession.predict (the previous mask fed back), predict_batch and segment-everything of a real export,
against segment_anything's SamPredictor; exports from before the family still run as they did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from peft_export.runtime import SamSession

pytestmark = pytest.mark.slow  # a real export of the tiny model (about half a minute)

PROMPTS = [
    dict(point_coords=np.array([[120.0, 90.0]]), point_labels=np.array([1])),
    dict(point_coords=np.array([[60.0, 40.0], [200.0, 150.0], [121.0, 95.0]]), point_labels=np.array([1, 0, 1])),
    dict(box=np.array([70.0, 40.0, 175.0, 140.0])),
]


@pytest.fixture(autouse=True)
def torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    from test_everything import _random_model  # tiny SAM + random LoRA, decoder outputs that mean something

    return _random_model()


@pytest.fixture(scope="module")
def export(model, tmp_path_factory):
    from peft_export.export import merge_and_export

    out = tmp_path_factory.mktemp("family") / "export"
    merge_and_export(model, out, precisions=("fp32",), progress=False, meta_decoder=False)
    return out


@pytest.fixture(scope="module")
def predictor_and_image(model):
    from peft_export.peft import merge_peft

    rng = np.random.default_rng(10)
    yy, xx = np.mgrid[0:181, 0:250]
    image = np.stack([(yy * 1.3) % 256, (xx * 0.9) % 256, ((yy - 90) ** 2 + (xx - 120) ** 2 < 50**2) * 200.0], -1)
    image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
    predictor = SamPredictor(merge_peft(model.model).eval())
    predictor.set_image(image)
    return predictor, image


class CountingRun:
    """The session's real backend, with a count of the runs of each graph."""

    def __init__(self, backend):
        self.backend, self.calls = backend, {}
        self._run = backend.run

    def __call__(self, name, feeds):
        self.calls[name] = self.calls.get(name, 0) + 1
        return self._run(name, feeds)


def _count_runs(session: SamSession) -> dict:
    counter = CountingRun(session._backend)
    session._backend.run = counter
    session._families.clear()  # FamilyDecoders hold the run function they were made with
    return counter.calls


def test_split_prompts_takes_the_mask_input(export):
    graphs = json.loads((export / "manifest.json").read_text())["graphs"]
    names = [i["name"] for i in graphs["split_prompts"]["fp32"]["inputs"]]
    assert names[-2:] == ["mask_input", "has_mask_input"]
    # what it computes with a mask input: test_predict_with_mask_input_matches_predictor_through_the_family
    assert SamSession(export).describe()["decoder_used"] == "family"
    assert not {"decoder", "decoder_lowres"} & set(graphs) and not (export / "decoder.onnx").exists()


@pytest.mark.parametrize("multimask", [True, False])
def test_predict_with_mask_input_matches_predictor_through_the_family(export, predictor_and_image, multimask):
    predictor, image = predictor_and_image
    session = SamSession(export)
    calls = _count_runs(session)
    session.set_image(image)
    for kwargs in PROMPTS:
        ref, ref_iou, ref_low = predictor.predict(**kwargs, multimask_output=multimask, return_logits=True)
        logits, iou, low = session.predict(**kwargs, multimask_output=multimask, return_logits=True)
        assert np.abs(logits - ref).max() < 1e-3 and np.abs(iou - ref_iou).max() < 1e-4
        for _ in range(2):  # SamPredictor's iterative loop: the last low-res logits fed back
            ref, ref_iou, ref_low = predictor.predict(**kwargs, mask_input=ref_low[:1], multimask_output=multimask,
                                                      return_logits=True)
            logits, iou, low = session.predict(**kwargs, mask_input=low[:1], multimask_output=multimask,
                                               return_logits=True)
            assert np.abs(logits - ref).max() < 1e-3 and np.abs(iou - ref_iou).max() < 1e-4
    # The image side ran once for the image: every prompt (and mask input) after it only the prompt side.
    assert calls.get("split_image") == 1 and calls.get("split_prompts") == 3 * 3
    assert "decoder_lowres" not in calls and "decoder" not in calls


def test_family_sessions_stop_spinning_after_a_run(export):
    """split_prompts and split_masks run back to back: a pool left spinning by the first takes a core
    from the second (one click 38 vs 20 ms on 2 cores). The encoder keeps ONNX Runtime's default."""
    def entry(sess, key: str) -> str:
        try:
            return sess.get_session_options().get_session_config_entry(key)
        except RuntimeError:  # not set: ONNX Runtime's default
            return "default"

    sessions = SamSession(export)._backend.sessions
    family = ("split_image", "split_prompts", "split_masks")
    assert {name: entry(sessions[name], "session.force_spinning_stop") for name in family} == dict.fromkeys(family, "1")
    assert entry(sessions["encoder"], "session.force_spinning_stop") == "default"
    assert entry(sessions["split_prompts"], "session.intra_op.allow_spinning") == "default"  # spins within a run


def test_predict_batch_and_everything_use_the_family(export, predictor_and_image):
    predictor, image = predictor_and_image
    session = SamSession(export)
    calls = _count_runs(session)
    session.set_image(image)
    boxes = np.array([[70.0, 40.0, 175.0, 140.0], [10.0, 10.0, 120.0, 90.0], [100, 60, 240, 170]])
    _, iou, low = session.predict_batch(boxes=boxes, masks=False)
    for box, i, lo in zip(boxes, iou, low):
        _, ref_iou, ref_low = predictor.predict(box=box, multimask_output=False, return_logits=True)
        assert np.abs(lo - ref_low).max() < 1e-3 and np.abs(i - ref_iou).max() < 1e-4
    labels, records = session.segment_everything(points_per_side=6, pred_iou_thresh=0.3, stability_score_thresh=0.8)
    assert labels.shape == image.shape[:2] and len(records) > 0
    assert calls["split_image"] == 1  # predict_batch and segment-everything share the image's context
    assert "decoder_lowres" not in calls


class OldSplitPrompts(torch.nn.Module):
    """split_prompts as exports wrote it before it took the mask input: the same graph without the
    mask input's terms (the code of then, over today's modules)."""

    def __init__(self, sam) -> None:
        from peft_export.export.split_decoder import SplitPromptsGraph

        super().__init__()
        self.graph = SplitPromptsGraph(sam)

    def forward(self, image_keys, layer0_k, layer0_v, layer0_q, point_coords, point_labels):
        from peft_export.export.folded_decoder import decoder_tokens, mask_weights

        g = self.graph
        tokens = decoder_tokens(g.dec, g.meta._embed_points(point_coords, point_labels))
        queries, keys = g.transformer(image_keys, tokens, layer0=(layer0_k, layer0_v, layer0_q))
        return g.dec.iou_prediction_head(queries[:, 0, :]), mask_weights(g.dec, queries), keys


def _old_split_prompts(model, path: Path) -> list:
    """Write the old split_prompts to ``path``; returns its manifest inputs of then."""
    from peft_export.export.onnx_graphs import _export
    from peft_export.export.split_decoder import SPLIT_IO, split_examples, split_graph_io

    inputs, outputs, dynamic = SPLIT_IO["split_prompts"]
    _export(OldSplitPrompts(model).eval(), split_examples(model)["split_prompts"][:6], path, 17, inputs[:6], outputs,
            {k: v for k, v in dynamic.items() if k not in inputs[6:]}, exporter="torchscript", external=False)
    return split_graph_io("split_prompts", model.image_encoder.img_size)[0][:6]


def test_old_exports_run_as_before(export, model, predictor_and_image, tmp_path):
    """An export from before the family: split_prompts without the mask input (segment-everything runs
    it, predict runs decoder_lowres), and one from before the split graphs (decoder_lowres for all)."""
    from peft_export.export import export_decoder_onnx
    from peft_export.peft import merge_peft

    predictor, image = predictor_and_image
    merged = merge_peft(model.model).eval()
    old = tmp_path / "old"
    shutil.copytree(export, old)
    manifest = json.loads((old / "manifest.json").read_text())
    inputs = _old_split_prompts(merged, old / "split_prompts.onnx")
    assert "mask_input" not in [i["name"] for i in inputs]
    manifest["graphs"]["split_prompts"]["fp32"]["inputs"] = inputs
    if "decoder_lowres" not in manifest["graphs"]:  # written only with --meta-decoder / TensorRT now
        export_decoder_onnx(merged, old / "decoder_lowres.onnx", "decoder_lowres")
        manifest["graphs"]["decoder_lowres"] = {"fp32": {"path": "decoder_lowres.onnx"}}
    (old / "manifest.json").write_text(json.dumps(manifest))

    session, new = SamSession(old), SamSession(export)
    calls = _count_runs(session)
    session.set_image(image)
    new.set_image(image)
    ref, ref_iou, ref_low = predictor.predict(**PROMPTS[1], return_logits=True)
    logits, iou, low = session.predict(**PROMPTS[1], return_logits=True)
    assert np.abs(logits - ref).max() < 1e-3 and np.abs(iou - ref_iou).max() < 1e-4
    ref, ref_iou, _ = predictor.predict(**PROMPTS[1], mask_input=ref_low[:1], return_logits=True)
    logits, iou, _ = session.predict(**PROMPTS[1], mask_input=low[:1], return_logits=True)
    assert np.abs(logits - ref).max() < 1e-3 and np.abs(iou - ref_iou).max() < 1e-4
    assert calls["decoder_lowres"] == 2 and "split_prompts" not in calls
    options = dict(points_per_side=6, pred_iou_thresh=0.3, stability_score_thresh=0.8)
    old_labels, old_records = session.segment_everything(decoder="split", **options)
    assert calls["split_prompts"] >= 1
    # With no mask input the family's split_prompts adds exact zeros: the same records as the old graph.
    labels, records = new.segment_everything(decoder="split", **options)
    assert len(records) == len(old_records) > 0
    for a, b in zip(records, old_records):
        assert a["bbox"] == b["bbox"] and a["area"] == b["area"]
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-5
    np.testing.assert_array_equal(labels, old_labels)


def test_every_adapter_of_a_shared_trunk_export_has_the_family(tmp_path, predictor_and_image):
    """Each adapter gets its own split_image/split_prompts/split_masks: predict with a mask input matches
    SamPredictor on that adapter's model, and segment-everything runs the family (no fallback)."""
    from test_shared_trunk import make_run

    from peft_export.export import merge_and_export_adapters
    from peft_export.peft import merge_peft
    from peft_export.peft.adapters import load_adapter

    _, image = predictor_and_image
    runs = {name: make_run(tmp_path / "runs", name) for name in ("late", "dec")}
    out = tmp_path / "multi"
    manifest = merge_and_export_adapters({n: load_adapter(r) for n, r in runs.items()}, out, progress=False)
    session = SamSession(out)
    calls = _count_runs(session)
    session.set_image(image)
    for name, run in runs.items():
        entry = manifest["adapters"][name]
        assert [entry[g] for g in ("split_image", "split_prompts", "split_masks")] == [
            f"split_image_{name}", f"split_prompts_{name}", f"split_masks_{name}"]
        predictor = SamPredictor(merge_peft(load_adapter(run).model).eval())
        predictor.set_image(image)
        ref, ref_iou, ref_low = predictor.predict(**PROMPTS[0], return_logits=True)
        logits, iou, low = session.predict(**PROMPTS[0], return_logits=True, adapter=name)
        assert np.abs(logits - ref).max() < 1e-3 and np.abs(iou - ref_iou).max() < 1e-4
        ref, ref_iou, _ = predictor.predict(**PROMPTS[0], mask_input=ref_low[:1], return_logits=True)
        logits, iou, _ = session.predict(**PROMPTS[0], mask_input=low[:1], return_logits=True, adapter=name)
        assert np.abs(logits - ref).max() < 1e-3 and np.abs(iou - ref_iou).max() < 1e-4
        session.segment_everything(decoder="split", adapter=name, points_per_side=4, pred_iou_thresh=0.0,
                                   stability_score_thresh=0.0)
        assert calls[f"split_image_{name}"] == 1 and calls[f"split_masks_{name}"] >= 1  # segment-everything
    # predict ran each adapter's family too: the export has no other decoder, and none ran
    assert not any(k.startswith("decoder") for k in list(manifest["graphs"]) + list(calls))
    assert all(calls[f"split_prompts_{name}"] >= 3 for name in runs)  # 2 predicts + segment-everything
