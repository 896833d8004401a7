"""SAM 2's image graphs: the encoder (Hiera + FPN neck) and one prompt encoder + mask decoder graph, their
I/O specs (the interface both SAM 2 runtimes feed, ``/work/notes``-agreed: ``docs/sam2.md``), a torch
reference on a probe image, and the parity checks every export runs on each CPU backend.

- ``encoder``: ``image`` (1, 3, S, S) -> ``image_embeddings`` (1, 256, g, g): the lowest-resolution FPN
  level BEFORE ``no_mem_embed`` (still images add it in the runtime, as ``SAM2ImagePredictor`` does; video
  conditions it on memories instead), ``high_res_feats_0`` (1, 32, 4g, 4g) and ``high_res_feats_1``
  (1, 64, 2g, 2g), after the decoder's ``conv_s0`` / ``conv_s1`` (``SAM2Base.forward_image``).
- ``decoder``: embeddings and maps of batch 1 (shared by K prompts) or K (one per object), SAM 2-layout
  points (box corners first, labels 2 / 3; the padding point (0, 0) label -1 given by the caller) in the
  S x S frame, a mask input with its on/off flag -> all four mask tokens' low-res logits and IoU, the four
  output tokens (the video object pointer) and the object score logit. Choosing among the four
  (multimask, sam2's stability fallback) is the runtime's (``runtime.sam2_masks``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..fsutil import current_umask
from ..merge import error_stats, probe_pixels
from . import onnx_graphs as og
from .agreement import GATES, gate_prompts
from .gates import cosine, graph_runner, judge, mask_iou, nonfinite

ENCODER_OUTPUTS = ("image_embeddings", "high_res_feats_0", "high_res_feats_1")
DECODER_INPUTS = ("image_embeddings", "high_res_feats_0", "high_res_feats_1", "point_coords", "point_labels",
                  "mask_input", "has_mask_input")
DECODER_OUTPUTS = ("low_res_masks", "iou_predictions", "sam_output_tokens", "object_score_logits")
# What a reduced-precision encoder is judged on (``verify_sam2_encoder``; int8 adds held-out images: int8_data)
REDUCED_MEASURES = ("embeddings_cosine", "prompt_mask_iou_mean", "prompt_mask_iou_min")


def _t(name: str, shape: list, dtype: str = "float32") -> dict:
    return {"name": name, "shape": shape, "dtype": dtype}


def sam2_graph_io(graph: str, image_size: int) -> tuple[list[dict], list[dict]]:
    """Input and output specs of a SAM 2 image graph, for manifest.json."""
    s, g = image_size, image_size // 16
    maps = [_t("image_embeddings", ["batch", 256, g, g]), _t("high_res_feats_0", ["batch", 32, 4 * g, 4 * g]),
            _t("high_res_feats_1", ["batch", 64, 2 * g, 2 * g])]
    if graph == "encoder":
        return [_t("image", [1, 3, s, s])], [dict(m, shape=[1] + m["shape"][1:]) for m in maps]
    if graph == "decoder":
        return (maps + [_t("point_coords", ["prompts", "num_points", 2]), _t("point_labels", ["prompts", "num_points"]),
                        _t("mask_input", ["prompts", 1, 4 * g, 4 * g]), _t("has_mask_input", ["prompts"])],
                [_t("low_res_masks", ["prompts", 4, 4 * g, 4 * g]), _t("iou_predictions", ["prompts", 4]),
                 _t("sam_output_tokens", ["prompts", 4, 256]), _t("object_score_logits", ["prompts", 1])])
    if graph == "ais_decoder":  # SAM's graph on SAM 2's still-image embedding: the same I/O
        from .manifest import graph_io

        return graph_io(graph, image_size)
    raise KeyError(graph)


class Sam2EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from ..models.sam2 import backbone_features

        low, (s0, s1) = backbone_features(self.model, image)
        return low, s0, s1


def sam2_probe_image(image_size: int, seed: int = 0) -> np.ndarray:
    """The probe image of ``seed`` (``merge.probe_pixels``) through SAM2Transforms' normalisation (/255,
    ImageNet mean and std): the encoder input (1, 3, S, S) the export's checks and its int8 tuning use."""
    from ..models.sam2 import SAM2_PIXEL_MEAN, SAM2_PIXEL_STD

    mean = torch.tensor(SAM2_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SAM2_PIXEL_STD).view(1, 3, 1, 1)
    return ((probe_pixels(image_size, seed) / 255.0 - mean) / std).numpy()


@torch.no_grad()
def sam2_encoder_outputs(model: nn.Module, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch model's values of the encoder graph's three outputs for one input (1, 3, S, S)."""
    return Sam2EncoderGraph(model.eval())(torch.from_numpy(np.ascontiguousarray(image, np.float32)))


class Sam2DecoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = model.sam_prompt_encoder
        self.mask_decoder = model.sam_mask_decoder

    def forward(self, image_embeddings, high_res_feats_0, high_res_feats_1, point_coords, point_labels, mask_input,
                has_mask_input):
        pe = self.prompt_encoder
        sparse = pe._embed_points(point_coords, point_labels, pad=False)  # the caller's layout, padding included
        on = has_mask_input.view(-1, 1, 1, 1)
        dense = on * pe._embed_masks(mask_input) + (1 - on) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        k = point_coords.shape[0]
        # batch 1 (one image, K prompts) or K (one embedding per object): expand is a no-op for K
        low, iou, tokens, obj = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings.expand(k, -1, -1, -1), image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, repeat_image=False,
            high_res_features=[high_res_feats_0.expand(k, -1, -1, -1), high_res_feats_1.expand(k, -1, -1, -1)])
        return low, iou, tokens, obj


def export_sam2_encoder(model: nn.Module, path: str | os.PathLike, opset: int) -> str:
    """``encoder.onnx`` + ``encoder.onnx.data``, like every encoder; the small constants stay in the graph
    (ONNX Runtime cannot shape-infer a Resize whose sizes live in external data: Hiera resizes its
    positional embedding, the FPN its top-down features)."""
    import onnx

    path = Path(path)
    s = int(model.image_size)
    example = torch.zeros(1, 3, s, s)
    scratch = path.with_name(path.name + ".inline")
    try:
        how = og._export(Sam2EncoderGraph(model), (example,), scratch, opset, ["image"], list(ENCODER_OUTPUTS),
                         None, exporter="torchscript", external=False)
        onnx.save_model(onnx.load(str(scratch)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        os.chmod(str(path) + ".data", 0o666 & ~current_umask())  # onnx creates it 0600
    finally:
        scratch.unlink(missing_ok=True)
    return how


def decoder_example(model: nn.Module, prompts: int = 2, points: int = 3) -> tuple[torch.Tensor, ...]:
    g = int(model.image_size) // 16
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 256, g, g, generator=gen), torch.randn(1, 32, 4 * g, 4 * g, generator=gen),
            torch.randn(1, 64, 2 * g, 2 * g, generator=gen), torch.rand(prompts, points, 2, generator=gen) * 16 * g,
            torch.tensor([[1.0, 0.0, -1.0]] * prompts)[:, :points], torch.randn(prompts, 1, 4 * g, 4 * g, generator=gen),
            torch.ones(prompts))


def export_sam2_decoder(model: nn.Module, path: str | os.PathLike, opset: int) -> str:
    dynamic = {"image_embeddings": {0: "batch"}, "high_res_feats_0": {0: "batch"}, "high_res_feats_1": {0: "batch"},
               "point_coords": {0: "prompts", 1: "num_points"}, "point_labels": {0: "prompts", 1: "num_points"},
               "mask_input": {0: "prompts"}, "has_mask_input": {0: "prompts"},
               **{name: {0: "prompts"} for name in DECODER_OUTPUTS}}
    return og._export(Sam2DecoderGraph(model), decoder_example(model), Path(path), opset, list(DECODER_INPUTS),
                      list(DECODER_OUTPUTS), dynamic, exporter="torchscript", external=False)


# ---- reference and parity --------------------------------------------------------------------


@dataclass
class Sam2Reference:
    image: torch.Tensor  # (1, 3, S, S) normalised probe image
    features: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # the encoder graph's three outputs, torch
    no_mem_embed: torch.Tensor  # (1, 256, 1, 1)
    feeds: list[dict[str, np.ndarray]]  # decoder feeds (torch features)
    outputs: list[tuple[torch.Tensor, ...]]  # the decoder graph's four outputs, torch, per feed

    @property
    def embeddings(self) -> torch.Tensor:
        """The still-image embedding (``no_mem_embed`` added): what the mask decoder and the AIS decoder read
        (``export.ais.verify_ais_decoder`` takes it from here, as from SAM's ``Reference``)."""
        return self.features[0] + self.no_mem_embed


def sam2_prompt_feeds(coords: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None, g: int) -> dict:
    k = len(coords)
    return {"point_coords": coords.float().numpy(), "point_labels": labels.float().numpy(),
            "mask_input": (mask if mask is not None else torch.zeros(k, 1, 4 * g, 4 * g)).float().numpy(),
            "has_mask_input": np.full((k,), 0.0 if mask is None else 1.0, np.float32)}


@torch.no_grad()
def build_sam2_reference(model: nn.Module, seed: int = 0) -> Sam2Reference:
    """The torch model (unmerged) on the probe image: point, box, box + points, a mask input, a batch of
    three prompts, and three objects with their own embeddings (the video layout)."""
    model = model.eval()
    s = int(model.image_size)
    g = s // 16
    image = torch.from_numpy(sam2_probe_image(s, seed))
    features = Sam2EncoderGraph(model)(image)
    no_mem = model.no_mem_embed.reshape(1, -1, 1, 1)
    still = (features[0] + no_mem, features[1], features[2])
    pad = (torch.zeros(1, 1, 2), -torch.ones(1, 1))
    cases = [
        (torch.tensor([[[0.5 * s, 0.5 * s]]]), torch.tensor([[1.0]]), None),
        (torch.tensor([[[0.3 * s, 0.6 * s], [0.7 * s, 0.2 * s]]]), torch.tensor([[1.0, 0.0]]), None),
        (torch.tensor([[[0.2 * s, 0.25 * s], [0.6 * s, 0.7 * s]]]), torch.tensor([[2.0, 3.0]]), None),
        (torch.tensor([[[0.1 * s, 0.1 * s], [0.8 * s, 0.9 * s], [0.4 * s, 0.45 * s]]]), torch.tensor([[2.0, 3.0, 1.0]]),
         None),
    ]
    gen = torch.Generator().manual_seed(seed + 1)
    cases.append((torch.rand(3, 2, 2, generator=gen) * s, torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), None))
    graph = Sam2DecoderGraph(model)
    feeds, outputs = [], []
    for coords, labels, mask in cases:
        k = len(coords)
        coords = torch.cat([coords, pad[0].expand(k, 1, 2)], 1)
        labels = torch.cat([labels, pad[1].expand(k, 1)], 1)
        feed = {**dict(zip(ENCODER_OUTPUTS, (f.numpy() for f in still))), **sam2_prompt_feeds(coords, labels, mask, g)}
        out = graph(*(torch.from_numpy(feed[n]) for n in DECODER_INPUTS))
        feeds.append(feed)
        outputs.append(out)
        if len(feeds) == 1:  # a corrective click with the previous low-res mask as mask input
            c = torch.tensor([[[0.55 * s, 0.45 * s], [0.2 * s, 0.8 * s], [0.0, 0.0]]])
            lab = torch.tensor([[1.0, 0.0, -1.0]])
            feed = {**feed, **sam2_prompt_feeds(c, lab, out[0][:, :1], g)}
            feeds.append(feed)
            outputs.append(graph(*(torch.from_numpy(feed[n]) for n in DECODER_INPUTS)))
    # Three objects, each with its own embedding (as video's memory-conditioned features).
    objects = {n: np.repeat(v, 3, axis=0) for n, v in feeds[-1].items() if n in ENCODER_OUTPUTS}
    objects["image_embeddings"] = objects["image_embeddings"] * np.array([1.0, 0.9, 1.1], np.float32).reshape(3, 1, 1, 1)
    feed = {**feeds[-1], **objects}
    feeds.append(feed)
    outputs.append(graph(*(torch.from_numpy(feed[n]) for n in DECODER_INPUTS)))
    return Sam2Reference(image, features, no_mem, feeds, outputs)


@torch.no_grad()
def _gate_masks(model: nn.Module, features: tuple, n: int, seed: int) -> torch.Tensor:
    """All four masks (> 0) of ``n`` gate prompts of ``seed`` (``agreement.gate_prompts``: points, then boxes)
    in SAM 2's layout (a padding point after each box too), decoded by the torch graph from the encoder graph's
    three outputs ``features`` (``no_mem_embed`` added here, as for a still image)."""
    s = int(model.image_size)
    no_mem = model.no_mem_embed.reshape(1, -1, 1, 1)
    coords, labels = gate_prompts(s, n, seed)
    graph = Sam2DecoderGraph(model)
    feats = (torch.as_tensor(features[0]) + no_mem, torch.as_tensor(features[1]), torch.as_tensor(features[2]))
    points, boxes = slice(0, n // 2), slice(n // 2, n)
    box_c = torch.cat([coords[boxes], torch.zeros(n - n // 2, 1, 2)], 1)
    box_l = torch.cat([labels[boxes], -torch.ones(n - n // 2, 1)], 1)
    masks = []
    for c, lab in ((coords[points], labels[points]), (box_c, box_l)):
        k = len(c)
        masks.append(graph(*feats, c, lab, torch.zeros(k, 1, s // 4, s // 4), torch.zeros(k))[0] > 0)
    return torch.cat(masks)


def sam2_mask_agreement(model: nn.Module, reference: tuple, candidate: tuple, n_prompts: int = 32,
                        seed: int = 0) -> dict:
    """Per-prompt IoU of the masks decoded from ``candidate`` encoder outputs vs from ``reference`` ones
    (each the encoder graph's three outputs), as ``agreement.mask_agreement`` does for SAM."""
    a = _gate_masks(model, reference, n_prompts, seed)
    b = _gate_masks(model, tuple(torch.from_numpy(np.nan_to_num(np.asarray(c, np.float32))) for c in candidate),
                    n_prompts, seed)
    inter = (a & b).flatten(1).sum(1).double()
    union = (a | b).flatten(1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return {"prompts": int(n_prompts), "mask_iou_mean": float(iou.mean()), "mask_iou_min": float(iou.min()),
            "worst_prompt": int(iou.argmin()), "per_prompt": [round(float(x), 5) for x in iou]}


def verify_sam2_encoder(path: str | os.PathLike, model: nn.Module, reference: Sam2Reference, precision: str = "fp32",
                        backend: str = "onnxruntime") -> dict:
    """The encoder graph's three outputs against torch's (fp32: max rel of each; int8 / fp16: cosine and the
    masks of the gate's 32 prompts decoded from them, prompt by prompt)."""
    out = graph_runner(path, backend)({"image": reference.image.numpy()})
    got = [np.asarray(out[n], np.float32) for n in ENCODER_OUTPUTS]
    errors = {n: error_stats(ref, torch.from_numpy(g)) for n, ref, g in zip(ENCODER_OUTPUTS, reference.features, got)}
    stats: dict = {"finite": not nonfinite(*got), "outputs": errors,
                   "embeddings_max_rel": max(e["max_rel"] for e in errors.values())}
    if precision == "fp32":
        return judge(stats, precision, ("embeddings_max_rel",))
    stats["embeddings_cosine"] = min(cosine(ref, torch.from_numpy(g)) for ref, g in zip(reference.features, got))
    agreement = sam2_mask_agreement(model, reference.features, tuple(got), int(GATES["int8"]["prompts"]))
    agreement.pop("per_prompt")
    stats["prompt_agreement"] = agreement
    stats["prompt_mask_iou_mean"], stats["prompt_mask_iou_min"] = agreement["mask_iou_mean"], agreement["mask_iou_min"]
    return judge(stats, precision, REDUCED_MEASURES if precision in GATES else REDUCED_MEASURES[:1])


def verify_sam2_decoder(path: str | os.PathLike, reference: Sam2Reference, backend: str = "onnxruntime") -> dict:
    """The decoder graph on the torch features: its four outputs for every reference prompt."""
    run = graph_runner(path, backend)
    refs: dict[str, list] = {n: [] for n in DECODER_OUTPUTS}
    gots: dict[str, list] = {n: [] for n in DECODER_OUTPUTS}
    for feed, want in zip(reference.feeds, reference.outputs):
        out = run(feed)
        for n, w in zip(DECODER_OUTPUTS, want):
            refs[n].append(w.flatten())
            gots[n].append(torch.from_numpy(np.asarray(out[n], np.float32)).flatten())
    errors = {n: error_stats(torch.cat(refs[n]), torch.cat(gots[n])) for n in DECODER_OUTPUTS}
    stats = {"finite": not nonfinite(*(torch.cat(v).numpy() for v in gots.values())), "outputs": errors,
             "mask_logits_max_rel": max(e["max_rel"] for e in errors.values()),
             "mask_iou": mask_iou(refs["low_res_masks"], gots["low_res_masks"]), "prompts": len(reference.feeds)}
    return judge(stats, "fp32", ("mask_logits_max_rel", "mask_iou"))
