"""The export-only attention rewrites: exact on every backend, the fused op really in the graph, gated in merge-and-export."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch

from helpers import MERGEABLE_CONFIGS, make_adapted
from peft_export.errors import PeftExportError
from peft_export.export import merge_and_export
from peft_export.export.fused_attention import attention_form
from peft_export.export.onnx_graphs import export_encoder_onnx
from peft_export.export.verify import graph_runner
from peft_export.peft import merge_peft

BACKENDS = ["onnxruntime"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


@pytest.fixture(scope="module")
def merged():
    return merge_peft(make_adapted(MERGEABLE_CONFIGS["lora"], image_size=128).model).eval()


@pytest.mark.parametrize("form", ["folded", "fused"])
def test_rewritten_encoder_graph_matches_sam(merged, form, tmp_path):
    # Non-zero relative-position tables, or the folded bias terms would prove nothing.
    with torch.no_grad():
        for blk in merged.image_encoder.blocks:
            assert blk.attn.use_rel_pos and float(blk.attn.rel_pos_h.abs().sum()) > 0
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = merged.image_encoder(x).numpy()
        with attention_form(merged, form):
            eager = merged.image_encoder(x).numpy()
    assert np.abs(eager - ref).max() <= 1e-5 * np.abs(ref).max()
    assert type(merged.image_encoder.blocks[0].attn).__name__ == "Attention"  # put back after the context
    path = tmp_path / "encoder.onnx"
    export_encoder_onnx(merged, path, attention=form)
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    blocks = len(merged.image_encoder.blocks)
    if form == "fused":
        assert ops.count("MultiHeadAttention") == blocks and "Softmax" not in ops
    else:
        assert ops.count("Softmax") == blocks and "MultiHeadAttention" not in ops
    for backend in BACKENDS:
        out = graph_runner(path, backend)({"image": x.numpy()})["image_embeddings"]
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), backend


@pytest.mark.slow  # worker processes / full exports
def test_merge_and_export_gates_the_fused_form_and_records_it(tmp_path):
    adapted = make_adapted(MERGEABLE_CONFIGS["lora-qv-alpha"], image_size=128)
    manifest = merge_and_export(adapted, tmp_path / "e", precisions=["fp32", "int8"], attention="fused", progress=False)
    enc = manifest["graphs"]["encoder"]
    assert enc["fp32"]["attention"] == enc["int8"]["attention"] == "fused"
    assert enc["fp32"]["verified_on"] == BACKENDS
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = adapted.model.image_encoder(x).numpy()
    for backend in BACKENDS:  # the written fused graph computed again here, on every backend
        out = graph_runner(tmp_path / "e" / enc["fp32"]["path"], backend)({"image": x.numpy()})["image_embeddings"]
        assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max(), backend
    with pytest.raises(PeftExportError, match="--attention: unknown 'flash'"):
        merge_and_export(adapted, tmp_path / "x", attention="flash", progress=False)
    assert not (tmp_path / "x").exists()
