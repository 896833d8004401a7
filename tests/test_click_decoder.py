"""The click decoder (split_image once per image, click_decoder per click) equals segment_anything's decoder.

Reference: segment_anything's own ``MaskDecoder.predict_masks`` per prompt on a decoder and prompt
encoder with random non-zero weights (biases included: the mask-input terms exist only through
``mask_downscaling``'s last bias and ``no_mask_embed``), then Meta's ``select_masks`` rule; the
export's verification chain and the web rewrite of the graph run on ONNX Runtime.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from peft_export.export.click_decoder import ClickDecoderGraph, export_click_graph, shown_mask_index
from peft_export.export.split_decoder import SplitImageGraph, export_split_graph
from peft_export.web.decoder_check import shown_mask_index as page_rule
from tests.test_folded_decoder import assert_close, prompts, random_decoder_sam, reference


def shown(ref_low, ref_iou, labels):
    """The reference's shown mask per prompt, by the page's own rule (web.decoder_check)."""
    index = torch.tensor([page_rule(iou.numpy(), labels.shape[1]) for iou in ref_iou])
    return ref_low[torch.arange(len(index)), index].unsqueeze(1), index


@pytest.mark.parametrize("image_size", [256, 320])
@pytest.mark.parametrize("num_points", [2, 3, 9])  # 2 decoder points: a multimask choice; more: output 0
def test_click_decoder_graph_equals_segment_anything(image_size, num_points):
    sam = random_decoder_sam(image_size, seed=num_points)
    g = image_size // 16
    embedding = torch.randn(1, 256, g, g, generator=torch.Generator().manual_seed(1))
    coords, labels, mask_input, has_mask = prompts(sam, num_points, batch=4, seed=num_points)
    with torch.no_grad():
        context = SplitImageGraph(sam).eval()(embedding)
        low, iou, index = ClickDecoderGraph(sam).eval()(*context, coords, labels, mask_input, has_mask)
    ref_low, ref_iou = reference(sam, embedding, coords, labels, mask_input, has_mask)
    want_low, want_index = shown(ref_low, ref_iou, labels)
    assert low.shape == (4, 1, 4 * g, 4 * g)
    assert ref_low.abs().max() > 1  # a decoder that does something
    assert torch.equal(index, want_index)
    assert_close(low, want_low)
    assert_close(iou, ref_iou)


def test_mask_input_changes_the_mask():
    """has_mask_input switches the mask terms on: a click decoder that ignored them would fail here."""
    sam = random_decoder_sam(256, seed=5)
    embedding = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(2))
    coords, labels, mask_input, _ = prompts(sam, 2, batch=1, seed=5)
    with torch.no_grad():
        context = SplitImageGraph(sam).eval()(embedding)
        graph = ClickDecoderGraph(sam).eval()
        off, _, _ = graph(*context, coords, labels, mask_input, torch.zeros(1))
        on, _, _ = graph(*context, coords, labels, mask_input, torch.ones(1))
    assert (on - off).abs().max() > 1e-2 * off.abs().max()
    ref_low, ref_iou = reference(sam, embedding, coords, labels, mask_input, torch.ones(1))
    assert_close(on, shown(ref_low, ref_iou, labels)[0])


def test_shown_mask_index_is_the_page_rule():
    iou = torch.tensor([[0.9, 0.1, 0.7, 0.3], [0.2, 0.5, 0.4, 0.6]])
    for n in (1, 2, 3, 6):
        got = shown_mask_index(iou, torch.zeros(2, n))
        assert got.tolist() == [page_rule(row.numpy(), n) for row in iou]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    sam = random_decoder_sam(256, seed=7)
    folder = tmp_path_factory.mktemp("click")
    export_split_graph(sam, folder / "split_image.onnx", "split_image")
    export_click_graph(sam, folder / "click_decoder.onnx")  # traced with 2 points, batch 1
    return sam, folder


def test_exported_click_decoder_any_point_count_and_batch(exported):
    sam, folder = exported
    image = ort.InferenceSession(str(folder / "split_image.onnx"), providers=["CPUExecutionProvider"])
    click = ort.InferenceSession(str(folder / "click_decoder.onnx"), providers=["CPUExecutionProvider"])
    embedding = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(3))
    context = dict(zip([o.name for o in image.get_outputs()], image.run(None, {"image_embeddings": embedding.numpy()})))
    for num_points, batch in [(1, 1), (2, 1), (5, 2), (12, 3)]:
        coords, labels, mask_input, has_mask = prompts(sam, num_points, batch, seed=num_points)
        low, iou, index = click.run(None, {**context, "point_coords": coords.numpy(), "point_labels": labels.numpy(),
                                           "mask_input": mask_input.numpy(), "has_mask_input": has_mask.numpy()})
        ref_low, ref_iou = reference(sam, embedding, coords, labels, mask_input, has_mask)
        want_low, want_index = shown(ref_low, ref_iou, labels)
        assert index.dtype == np.int64 and index.tolist() == want_index.tolist()
        assert_close(torch.from_numpy(low), want_low)
        assert_close(torch.from_numpy(iou), ref_iou)


def test_verify_click_decoder_passes_and_catches_a_wrong_graph(exported, tmp_path):
    from peft_export.export.click_decoder import verify_click_decoder
    from peft_export.export.verify import build_reference

    sam, folder = exported
    reference = build_reference(sam)
    assert any(p.mask is not None for p in reference.prompts)  # the corrective click with a mask input
    stats = verify_click_decoder(folder / "click_decoder.onnx", reference)
    assert stats["passed"], stats["failures"]
    assert stats["mask_logits_max_rel"] < 1e-5 and stats["mask_index_agrees"]
    # The same graph with the mask terms' shift dropped (a constant the rewrite adds): refused.
    model = onnx.load(str(folder / "click_decoder.onnx"))
    for init in model.graph.initializer:
        if init.name.endswith("shift"):
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(init)), init.name))
            break
    else:
        pytest.fail("no shift initializer in the exported graph")
    (tmp_path / "split_image.onnx").write_bytes((folder / "split_image.onnx").read_bytes())
    onnx.save(model, str(tmp_path / "click_decoder.onnx"))
    assert not verify_click_decoder(tmp_path / "click_decoder.onnx", reference)["passed"]
