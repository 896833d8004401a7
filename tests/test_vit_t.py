"""vit_t (MobileSAM): our TinyViT encoder against the ``mobile_sam`` package, checkpoints, image sizes."""

from __future__ import annotations

import warnings

import pytest
import torch

from peft_export.errors import PeftExportError
from peft_export.models import build_sam_architecture, infer_model_type, load_sam, random_sam
from peft_export.models.tiny_vit import window_offset_index

warnings.filterwarnings("ignore", message="no checkpoint given")


def mobile_sam_vit_t():
    """MobileSAM's own vit_t (the ``mobile_sam`` package: code only, no weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ms = pytest.importorskip("mobile_sam")
        return ms.sam_model_registry["vit_t"]()


@pytest.fixture(scope="module")
def reference():
    """MobileSAM's vit_t with our seeded random weights (every tensor non-zero), and ours."""
    ours = random_sam("vit_t", 1024, seed=3)
    theirs = mobile_sam_vit_t()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()  # MobileSAM caches its attention bias here, from the weights just loaded
    return ours, theirs


def test_state_dict_keys_and_shapes_equal_mobile_sam():
    ours = build_sam_architecture("vit_t").state_dict()
    theirs = mobile_sam_vit_t().state_dict()
    assert list(ours) == list(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    params = sum(p.numel() for p in build_sam_architecture("vit_t").image_encoder.parameters())
    assert params == 6_065_532


def test_window_offset_index_equals_mobile_sam():
    theirs = mobile_sam_vit_t()
    for layer in (1, 2, 3):
        attn = theirs.image_encoder.layers[layer].blocks[0].attn
        ws = int(attn.attention_biases.shape[1] ** 0.5)
        assert torch.equal(window_offset_index(ws), attn.attention_bias_idxs)


@pytest.mark.slow
def test_outputs_equal_mobile_sam_at_1024(reference):
    ours, theirs = reference
    assert ours.image_encoder.layers[1].blocks[0].attn.attention_biases.abs().min() > 0
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours.image_encoder(x), theirs.image_encoder(x)
        assert a.shape == (1, 256, 64, 64)
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max())
        pts = (torch.tensor([[[300.0, 500.0], [700.0, 200.0]]]), torch.tensor([[1, 0]]))
        outs = []
        for m, emb in ((ours, a), (theirs, b)):
            sparse, dense = m.prompt_encoder(points=pts, boxes=None, masks=None)
            outs.append(m.mask_decoder(emb, m.prompt_encoder.get_dense_pe(), sparse, dense, True)[0])
        assert (outs[0] - outs[1]).abs().max() <= 1e-4 * max(1.0, outs[1].abs().max())
    # the size-generic MobileSAM of the other sizes' test is MobileSAM's own here: its one changed line
    # (the 64 x 64 grid) changes nothing at 1024
    generic = mobile_sam_at(1024)
    generic.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(generic.eval().image_encoder(x), b)


@pytest.mark.slow
def test_weights_loaded_after_eval_are_used(reference):
    """MobileSAM caches its eval-mode attention bias in ``train(False)``; ours gathers it every forward."""
    ours, _ = reference
    model = build_sam_architecture("vit_t", 256).eval()  # eval first, weights after
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.image_encoder(x)
        model.load_state_dict(ours.state_dict())
        after = model.image_encoder(x)
        fresh = random_sam("vit_t", 256, seed=3).image_encoder(x)
    assert not torch.allclose(before, after)
    assert torch.equal(after, fresh)
    # The trap is real: MobileSAM's own model, loaded after eval(), keeps the stale bias.
    theirs = mobile_sam_vit_t()
    stale = theirs.image_encoder.layers[1].blocks[0].attn.ab.clone()
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(theirs.image_encoder.layers[1].blocks[0].attn.ab, stale)


def mobile_sam_at(size: int):
    """MobileSAM's own model for ``size``: its own classes with ``build_sam_vit_t``'s arguments, which fix
    1024 (copied here, the image size changed). Its ``TinyViT.forward_features`` also reshapes the last
    stage's tokens to a hard-coded 64 x 64 grid; that one constant becomes the grid TinyViT itself gives
    that stage (``layers[-1].input_resolution``, 64 x 64 at 1024), and nothing else of its forward changes."""
    import types

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("mobile_sam")
        from mobile_sam.modeling import MaskDecoder, PromptEncoder, Sam, TinyViT, TwoWayTransformer
    encoder = TinyViT(img_size=size, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
                      depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
                      drop_rate=0.0, drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0,
                      local_conv_size=3, layer_lr_decay=0.8)

    def forward_features(self, x):  # MobileSAM's, with its grid from the last stage instead of 64 x 64
        x = self.patch_embed(x)
        x = self.layers[0](x)
        for i in range(1, len(self.layers)):
            x = self.layers[i](x)
        b, _, c = x.size()
        h, w = self.layers[-1].input_resolution
        x = x.view(b, h, w, c)
        x = x.permute(0, 3, 1, 2)
        return self.neck(x)

    encoder.forward_features = types.MethodType(forward_features, encoder)
    grid = size // 16
    sam = Sam(image_encoder=encoder,
              prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                           input_image_size=(size, size), mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                  depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256,
                  iou_head_depth=3, iou_head_hidden_dim=256),
              pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam


@pytest.mark.slow
@pytest.mark.parametrize("size", [256, 512])
def test_outputs_equal_mobile_sam_at_other_sizes(size):
    # Not only finite shapes: the numbers of MobileSAM's own modules at this size, from the same weights.
    ours = random_sam("vit_t", size, seed=6)
    theirs = mobile_sam_at(size)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()  # MobileSAM caches its attention bias here, from the weights just loaded
    assert ours.image_encoder.layers[2].blocks[0].attn.attention_biases.abs().min() > 0  # random, non-zero
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    pts = (torch.tensor([[[size / 2, size / 3], [size / 5, size * 0.8]]]), torch.tensor([[1, 0]]))
    box = torch.tensor([[0.1 * size, 0.2 * size, 0.6 * size, 0.7 * size]])
    with torch.no_grad():
        a, b = ours.image_encoder(x), theirs.image_encoder(x)
        assert a.shape == (1, 256, size // 16, size // 16)
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max())
        outs = []
        for m, emb in ((ours, a), (theirs, b)):
            sparse, dense = m.prompt_encoder(points=pts, boxes=box, masks=None)
            outs.append(m.mask_decoder(emb, m.prompt_encoder.get_dense_pe(), sparse, dense, True))
    (mine, my_iou), (mobile, mobile_iou) = outs
    assert mine.shape == (1, 3, size // 4, size // 4)
    assert (mine - mobile).abs().max() <= 1e-4 * max(1.0, mobile.abs().max())
    assert (my_iou - mobile_iou).abs().max() <= 1e-4
    # Same weights at another size: the state dict is size-independent.
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in build_sam_architecture("vit_t", 1024).state_dict().items()}


def test_batch_of_two_equals_one_by_one():
    sam = random_sam("vit_t", 256, seed=0)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        both = sam.image_encoder(x)
        one = torch.cat([sam.image_encoder(x[:1]), sam.image_encoder(x[1:])])
    assert torch.allclose(both, one, atol=1e-5)


def test_batchnorm_statistics_stay_frozen_in_train_mode():
    sam = random_sam("vit_t", 256, seed=0)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ref = sam.image_encoder(x)
        before = {k: v.clone() for k, v in sam.state_dict().items()}
        sam.train()
        trained = sam.image_encoder(x)
    assert torch.equal(ref, trained)
    assert all(torch.equal(before[k], v) for k, v in sam.state_dict().items())


def test_checkpoints_load_through_our_loaders(tmp_path):
    src = random_sam("vit_t", 1024, seed=5)
    state = src.state_dict()
    plain = tmp_path / "mobile_sam.pt"
    torch.save(state, plain)
    micro = tmp_path / "vit_t_lm.pt"
    torch.save({"model_state": {"sam." + k: v for k, v in state.items()}, "decoder_state": {}}, micro)
    assert infer_model_type(state) == "vit_t"
    for path in (plain, micro):
        sam, info = load_sam(None, path, image_size=256)
        assert info.model_type == "vit_t" and info.image_size == 256 and sam.image_encoder.img_size == 256
        assert all(torch.equal(v, state[k]) for k, v in sam.state_dict().items())
        assert load_sam("vit_t", path)[1].image_size == 1024  # MobileSAM's size when none is asked
    with pytest.raises(PeftExportError, match="checkpoint is vit_t"):
        load_sam("vit_b", plain)
    del state["image_encoder.layers.2.blocks.5.attn.attention_biases"]
    torch.save(state, plain)
    with pytest.raises(PeftExportError, match="1 missing"):
        load_sam(None, plain)


@pytest.mark.parametrize("size,seed", [(320, 5), (256, 6)])
def test_export_forms_give_the_eager_outputs(monkeypatch, size, seed):
    """While exporting, channels_first/last and q, k, v take other op sequences (tiny_vit's module doc);
    they must compute the same embeddings, also with padded windows (320 px: grids 80/40/20 pad to 7s/14s)."""
    sam = random_sam("vit_t", size, seed=seed)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        eager = sam.image_encoder(x)
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        exported_form = sam.image_encoder(x)
    torch.testing.assert_close(exported_form, eager, rtol=1e-6, atol=1e-6 * eager.abs().max().item())


def test_onnx_graph_has_no_4d_channel_transposes_and_three_qkv_products(tmp_path):
    """What makes the vit_t export fast on OpenVINO and ONNX Runtime (tiny_vit's module doc): no 4-D
    NHWC -> NCHW Transpose before a convolution, and q, k, v as three MatMuls on stored weights (which
    int8 quantisation needs: a weight computed in the graph would stay fp32)."""
    import onnx

    from peft_export.export.onnx_graphs import export_encoder_onnx

    sam = random_sam("vit_t", 256, seed=0)
    export_encoder_onnx(sam, tmp_path / "encoder.onnx")
    graph = onnx.load(str(tmp_path / "encoder.onnx"), load_external_data=False).graph
    perms = [list(a.ints) for n in graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]
    assert [0, 3, 1, 2] not in perms
    stored = {i.name for i in graph.initializer}
    weight_products = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in stored]
    assert len(weight_products) == 10 * 6  # per block: q, k, v, proj, fc1, fc2
    for block in ("layers.1/blocks.0", "layers.2/blocks.5", "layers.3/blocks.1"):
        assert sum(f"/{block}/attn/" in n for n in weight_products) == 4, block
