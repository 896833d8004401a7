"""PEFT on the mask decoder: the dec.* target names, which methods fit them, exact merge with random
non-zero adapters (alone and with encoder PEFT), parameter counts, adapter files holding both parts,
and micro-sam imports left as they were."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import hand_merge, make_adapted
from peft_export.errors import PeftExportError
from peft_export.merge import compare_models, merge_and_verify
from peft_export.models import build_sam_architecture, load_sam
from peft_export.peft import PeftConfig, apply_peft, parse_targets
from peft_export.peft.adapters import load_adapter, micro_sam_peft_config, save_adapter
from peft_export.peft.params import count_for_config

DECODER_CONFIGS = {
    "lora-decoder-only": dict(method="lora", rank=4, blocks="none", targets=("dec.all",), alpha=1.5),
    "lora-encoder+decoder": dict(method="lora", rank=3, blocks="late", targets=("q", "v", "mlp", "dec.attn", "dec.hyper")),
    "ssf-decoder": dict(method="ssf", blocks="1-2", targets=("dec.self", "dec.mlp", "dec.iou")),
    "fact-decoder": dict(method="fact", rank=4, blocks="all", targets=("dec.q", "dec.v", "dec.final.k")),
    "ssf-encoder+lora-decoder": dict(method="ssf", decoder_method="lora", rank=2, blocks="late", targets=("dec.t2i", "dec.i2t")),
    "freeze-encoder+lora-decoder": dict(method="freeze-encoder", decoder_method="lora", rank=2, targets=("dec.out",)),
}

# The decoder's attentions by the names segment_anything gives them (written out, not derived from the code).
ATTENTION_MODULES = [f"transformer.layers.{i}.{a}" for i in (0, 1)
                     for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")]
ATTENTION_MODULES.append("transformer.final_attn_token_to_image")


def test_target_names_expand_in_one_order_and_unknown_ones_are_named():
    assert parse_targets("dec.self") == ("dec.self.q", "dec.self.k", "dec.self.v", "dec.self.out")
    assert parse_targets("dec.v,q,dec.mlp") == ("q", "dec.self.v", "dec.t2i.v", "dec.i2t.v", "dec.final.v", "dec.mlp")
    assert len(parse_targets("dec.all")) == 16 + 3
    assert parse_targets("dec.hyper,dec.attn") == parse_targets("dec.attn,dec.hyper")
    with pytest.raises(PeftExportError, match="unknown dec.selff.*dec.all"):
        parse_targets("q,dec.selff")


@pytest.mark.slow  # a few seconds each (two probe runs of the tiny model)
@pytest.mark.parametrize("name", sorted(DECODER_CONFIGS))
def test_decoder_adapters_merge_exactly(name):
    config = DECODER_CONFIGS[name]
    adapted = make_adapted(config)
    merged, report = merge_and_verify(adapted)  # the merged model against the unmerged one on the probe
    errors = report["errors"]
    assert errors["mask_logits"]["max_rel"] <= 1e-5 and errors["embeddings"]["max_rel"] <= 1e-5, errors
    # The merged weights are the methods' formulas applied to the raw tensors, key by key ...
    expected = hand_merge(adapted.model.state_dict(), config)
    got = merged.state_dict()
    assert got.keys() == expected.keys()
    for k in got:
        assert (got[k].double() - expected[k]).abs().max() <= 1e-6 * float(expected[k].abs().max()) + 1e-12, k
    # ... segment_anything's plain Sam loads them strictly ...
    plain = build_sam_architecture("tiny")
    plain.load_state_dict(merged.state_dict(), strict=True)
    # ... and the decoder adapter really changed the decoder's weights (equality would prove nothing otherwise).
    base = load_sam("tiny", warn_random=False)[0].state_dict()
    changed = [k for k, v in got.items() if k.startswith("mask_decoder.") and (v - base[k]).abs().max() > 1e-3]
    assert changed


def test_decoder_targets_freeze_the_decoder_and_train_only_adapters():
    sam = apply_peft(build_sam_architecture("tiny"), PeftConfig(**DECODER_CONFIGS["lora-decoder-only"]))
    trainable = [n for n, p in sam.mask_decoder.named_parameters() if p.requires_grad]
    assert trainable and all(".w_a_linear." in n or ".w_b_linear." in n for n in trainable)
    assert not any(p.requires_grad for p in sam.image_encoder.parameters())
    # Every q/k/v/out projection of every attention, every MLP, hypernetwork and IoU-head Linear is wrapped.
    wrapped = {n.rsplit(".w_a_linear.", 1)[0] for n in trainable if ".w_a_linear." in n}
    attention = {f"{m}.{p}_proj" for m in ATTENTION_MODULES for p in ("q", "k", "v", "out")}
    heads = {f"output_hypernetworks_mlps.{i}.layers.{j}" for i in range(4) for j in range(3)}
    heads |= {f"iou_prediction_head.layers.{j}" for j in range(3)}
    mlps = {f"transformer.layers.{i}.mlp.lin{j}" for i in (0, 1) for j in (1, 2)}
    assert wrapped == attention | heads | mlps


def test_params_counts_decoder_adapters(tmp_path):
    """LoRA r on a Linear(i, o) adds r * (i + o); counted on vit_b without building weights."""
    from peft_export.cli.main import app

    rank = 4
    plain = build_sam_architecture("tiny").mask_decoder  # SAM's decoder is the same for every model type
    expected = sum(rank * (m.in_features + m.out_features) for n, m in plain.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(n == f"{a}.{p}_proj" for a in ATTENTION_MODULES
                                                              for p in ("q", "v")))
    counts = count_for_config("vit_b", PeftConfig("lora", blocks="none", rank=rank, targets=("dec.q", "dec.v"),
                                                  train_prompt_encoder=False))
    assert counts == {"image_encoder": 0, "prompt_encoder": 0, "mask_decoder": expected, "total": expected}
    result = CliRunner().invoke(app, ["params", "--model", "vit_b", "--blocks", "none", "--targets", "dec.q,dec.v",
                                      "--rank", "4", "--freeze-prompt-encoder", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["mask_decoder"] == expected


@pytest.mark.parametrize("config, match", [
    (dict(method="fact", targets=("dec.self.out",)), "fact on the mask decoder fits the q, k, v"),
    (dict(method="adaptformer", targets=("dec.hyper",)), "adaptformer on the mask decoder fits dec.mlp"),
    (dict(method="freeze-encoder", targets=("dec.all",)), "freeze-encoder has no mask-decoder form"),
    (dict(method="lora", decoder_method="ssf", targets=("q",)), "--decoder-peft ssf: give the decoder layers"),
])
def test_methods_that_do_not_fit_a_decoder_target_are_refused(config, match):
    with pytest.raises(PeftExportError, match=match):
        apply_peft(build_sam_architecture("tiny"), PeftConfig(**config))


def test_adaptformer_on_the_decoder_mlp_stays_in_the_graph():
    import torch.nn.functional as F

    from peft_export.peft import has_unmergeable_layers

    adapted = make_adapted(dict(method="adaptformer", blocks="none", bottleneck=8, targets=("dec.mlp",)))
    assert has_unmergeable_layers(adapted.model)
    layer = adapted.model.mask_decoder.transformer.layers[1].mlp
    w = {k: v.detach() for k, v in layer.state_dict().items()}
    x = torch.randn(2, 5, 256)
    mlp = F.linear(torch.relu(F.linear(x, w["mlp_proj.lin1.weight"], w["mlp_proj.lin1.bias"])),
                   w["mlp_proj.lin2.weight"], w["mlp_proj.lin2.bias"])
    branch = F.linear(torch.relu(F.linear(x, w["down_proj.weight"], w["down_proj.bias"])), w["up_proj.weight"], w["up_proj.bias"])
    assert torch.allclose(layer(x), mlp + w["alpha"] * branch, atol=1e-5)
    assert float(branch.abs().max()) > 1e-3


def test_adapter_file_holds_encoder_and_decoder_parts(tmp_path):
    adapted = make_adapted(DECODER_CONFIGS["lora-encoder+decoder"])
    save_adapter(adapted, tmp_path / "run")
    tensors = load_file(str(tmp_path / "run" / "adapter.safetensors"))
    assert any(k.startswith("image_encoder.") and "w_a_linear_q" in k for k in tensors)
    assert any(k.startswith("mask_decoder.") and k.endswith(".w_b_linear.weight") for k in tensors)
    assert not any(k.startswith("mask_decoder.") and k.endswith(".linear.weight") for k in tensors)  # frozen base
    meta = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert "dec.hyper" in meta["peft"]["targets"] and "q" in meta["peft"]["targets"]
    loaded = load_adapter(tmp_path / "run")
    errors = compare_models(adapted.model, loaded.model, 256)
    assert errors["mask_logits"]["max_abs"] == 0.0 and errors["embeddings"]["max_abs"] == 0.0


def test_micro_sam_imports_refuse_decoder_targets_and_keep_their_config(tmp_path):
    with pytest.raises(PeftExportError, match="micro-sam has no mask-decoder PEFT"):
        micro_sam_peft_config(tmp_path / "x.pt", "lora", 4, "all", "q,v,dec.all")
    cfg = micro_sam_peft_config(tmp_path / "x.pt", "lora", 4, "all", "q,v")
    assert cfg.targets == ("q", "v") and "decoder_method" not in cfg.to_dict()


def test_decoder_lora_beside_an_encoder_adaptformer_is_folded_for_the_export_graphs():
    """The decoder graphs read the projections' weights: a decoder LoRA must be folded even when an
    AdaptFormer branch keeps the model from merging as a whole (it stays, in the graph)."""
    from peft_export.export.click_decoder import ClickDecoderGraph
    from peft_export.export.pipeline import merge_for_export
    from peft_export.export.split_decoder import SplitImageGraph
    from peft_export.export.verify import _torch_decode, meta_prompt
    from peft_export.peft import has_unmergeable_layers, merge_peft

    adapted = make_adapted(dict(method="adaptformer", bottleneck=8, blocks="late", decoder_method="lora", rank=3,
                                targets=("dec.attn",)))
    with pytest.raises(PeftExportError, match="non-linear"):
        merge_peft(adapted.model)
    folded, merged, in_graph, _ = merge_for_export(adapted, lambda line: None)  # what merge-and-export exports
    assert not merged and in_graph == ["adaptformer"] and has_unmergeable_layers(folded)  # the branch stays
    assert not any(".w_a_linear." in n for n, _ in folded.named_parameters())  # the decoder LoRA is folded
    emb = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(4))
    points, labels = torch.tensor([[[60.0, 90.0], [150.0, 40.0]]]), torch.tensor([[1, 0]])
    want, iou = _torch_decode(adapted.model, emb, points, labels, None, None)
    coords, labs = meta_prompt(points, labels, None)
    with torch.no_grad():
        context = SplitImageGraph(folded).eval()(emb)
        low, _, index = ClickDecoderGraph(folded).eval()(*context, torch.from_numpy(coords), torch.from_numpy(labs),
                                                          torch.zeros(1, 1, 64, 64), torch.zeros(1))
    got, ref = low[0, 0], want[0, int(index[0])]
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
