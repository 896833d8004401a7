"""``peftexport merge``: fold an adapter into a plain SAM checkpoint, verified.

The merged file is a plain state dict, so ``segment_anything.sam_model_registry[t](checkpoint=...)``
loads it strictly (image size 1024; other sizes load with ``peft_export.models.load_sam``); a SAM 2
model is written as sam2's ``{"model": state_dict}``, which ``sam2.build_sam.build_sam2`` loads strictly
(with an instance decoder, ``"decoder_state"`` beside it: ``build_sam2`` reads only ``"model"``).
A model with micro-sam's instance decoder (AIS) is written in micro-sam's own format instead,
``{"model_state": SAM state dict, "decoder_state": decoder}``, which micro-sam's
``get_predictor_and_decoder`` and every peftexport command read.
Every merge compares the merged model with the adapter model on a probe input and
writes nothing when they differ by more than the tolerance.

Stage 5. May import: models, peft, errors, fsutil (and torch).
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import Sam

from . import __version__
from .peft.adapters import AdaptedModel
from .errors import PeftExportError
from .fsutil import atomic_file, check_can_write
from .models.family import is_sam2, model_image_size
from .peft import merge_peft

MERGE_RTOL = 1e-4  # relative to the largest magnitude of the reference output, fp32


@dataclass
class ProbeOutputs:
    embeddings: torch.Tensor
    mask_logits: torch.Tensor
    iou: torch.Tensor


def probe_pixels(image_size: int, seed: int = 0) -> torch.Tensor:
    """The probe image of ``seed`` before normalisation: (1, 3, S, S) float32 pixels in 0..255."""
    g = torch.Generator().manual_seed(seed)
    # Smooth blobs plus noise: closer to real image statistics than white noise.
    low = torch.rand(1, 3, max(image_size // 32, 2), max(image_size // 32, 2), generator=g)
    image = torch.nn.functional.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (image * 255.0 + 20.0 * torch.randn(1, 3, image_size, image_size, generator=g)).clamp(0, 255)


def probe_inputs(image_size: int, seed: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """A reproducible normalised probe image (SAM's normalisation of ``probe_pixels``) and a fixed set of
    point/box prompts (1024-frame scaled)."""
    image = probe_pixels(image_size, seed)
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    image = (image - mean) / std
    s = image_size
    prompts = [
        {"points": torch.tensor([[[0.5 * s, 0.5 * s]]]), "labels": torch.tensor([[1]]), "box": None},
        {"points": torch.tensor([[[0.3 * s, 0.6 * s], [0.7 * s, 0.2 * s]]]), "labels": torch.tensor([[1, 0]]), "box": None},
        {"points": None, "labels": None, "box": torch.tensor([[0.2 * s, 0.25 * s, 0.6 * s, 0.7 * s]])},
        {"points": torch.tensor([[[0.4 * s, 0.45 * s]]]), "labels": torch.tensor([[1]]), "box": torch.tensor([[0.1 * s, 0.1 * s, 0.8 * s, 0.9 * s]])},
    ]
    return image, prompts


def model_device_dtype(sam: Sam) -> tuple[torch.device, torch.dtype]:
    """Where the encoder runs and its floating dtype (the first floating parameter's: its input's dtype)."""
    weight = next(p for p in sam.image_encoder.parameters() if p.is_floating_point())
    return weight.device, weight.dtype


@torch.no_grad()
def run_probe(sam: Sam, image: torch.Tensor, prompts: list[dict]) -> ProbeOutputs:
    """The probe on the model's own device and dtype; outputs come back as float32 on the CPU."""
    sam.eval()
    device, dtype = model_device_dtype(sam)
    # segment_anything's prompt encoder makes float32 coordinates: a bf16/fp16 model runs under autocast.
    half = dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(device.type, dtype=dtype, enabled=half):
        return _probe(sam, image.to(device=device, dtype=dtype), prompts, device)


def _probe(sam: Sam, image: torch.Tensor, prompts: list[dict], device: torch.device) -> ProbeOutputs:
    if is_sam2(sam):
        return _probe_sam2(sam, image, prompts, device)
    emb = sam.image_encoder(image)
    masks, ious = [], []
    for p in prompts:
        points = (p["points"].float().to(device), p["labels"].to(device)) if p["points"] is not None else None
        box = p["box"].float().to(device) if p["box"] is not None else None
        sparse, dense = sam.prompt_encoder(points=points, boxes=box, masks=None)
        low, iou = sam.mask_decoder(
            image_embeddings=emb,
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        masks.append(low.float().cpu())
        ious.append(iou.float().cpu())
    return ProbeOutputs(emb.float().cpu(), torch.cat(masks), torch.cat(ious))


def _probe_sam2(model: torch.nn.Module, image: torch.Tensor, prompts: list[dict], device: torch.device) -> ProbeOutputs:
    """The probe on SAM 2's image path (``models.sam2``): embedding + high-resolution maps, then the decoder."""
    from .models.sam2 import decode, encode_image

    with torch.autocast(device.type, enabled=False):  # a 16-bit SAM 2 runs in its own dtype (see decode)
        feats = encode_image(model, image)
    masks, ious = [], []
    for p in prompts:
        coords = p["points"].float().to(device) if p["points"] is not None else None
        labels = p["labels"].to(device) if p["points"] is not None else None
        box = p["box"].float().to(device) if p["box"] is not None else None
        low, iou = decode(model, feats, coords, labels, box, None, multimask=True)
        masks.append(low.float().cpu())
        ious.append(iou.float().cpu())
    return ProbeOutputs(feats.image_embed.float().cpu(), torch.cat(masks), torch.cat(ious))


def error_stats(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    ref = reference.double()
    diff = (ref - candidate.double()).abs()
    scale = ref.abs().max().clamp_min(1e-12)
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max() / scale), "mean_abs": float(diff.mean())}


def compare_models(reference: Sam, candidate: Sam, image_size: int, seed: int = 0,
                   instance_decoder: torch.nn.Module | None = None) -> dict:
    """Max abs/rel error of image embeddings and mask logits, and mask agreement, on the probe.

    With ``instance_decoder`` also the error of its three AIS maps on both embeddings.
    """
    image, prompts = probe_inputs(image_size, seed)
    a = run_probe(reference, image, prompts)
    b = run_probe(candidate, image, prompts)
    ma, mb = a.mask_logits > 0, b.mask_logits > 0
    union = (ma | mb).sum().item()
    out = {
        "embeddings": error_stats(a.embeddings, b.embeddings),
        "mask_logits": error_stats(a.mask_logits, b.mask_logits),
        "iou_predictions_max_abs": float((a.iou - b.iou).abs().max()),
        "mask_iou": 1.0 if union == 0 else float((ma & mb).sum().item() / union),
    }
    if instance_decoder is not None:
        with torch.no_grad():
            instance_decoder.eval()
            out["instance_maps"] = error_stats(instance_decoder(a.embeddings), instance_decoder(b.embeddings))
    return out


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise PeftExportError(f"{where}: merged weight {k} contains NaN/Inf; nothing written")


def merge_report_path(out: str | Path) -> Path:
    """The report is named after the checkpoint (``merged.pth`` -> ``merged.report.json``), so
    several merges can share one folder."""
    out = Path(out)
    return out.with_name(f"{out.stem if out.suffix else out.name}.report.json")


def _is_qlora(adapted: AdaptedModel) -> bool:
    return adapted.config is not None and adapted.config.method == "qlora"


def qlora_quantisation_error(adapted: AdaptedModel, merged: Sam) -> dict:
    """How far a QLoRA merge (dequantised 4-bit base) lands from the same LoRA on the fp32 base."""
    from dataclasses import replace

    from .models import load_sam
    from .peft import apply_peft

    fp32, _ = load_sam(adapted.base.model_type, adapted.base.checkpoint, adapted.base.image_size, seed=adapted.base.seed)
    apply_peft(fp32, replace(adapted.config, method="lora"))
    lora_state = {n: p for n, p in adapted.model.named_parameters() if "w_a_linear" in n or "w_b_linear" in n}
    with torch.no_grad():
        for n, p in fp32.named_parameters():
            if n in lora_state:
                p.copy_(lora_state[n].detach().cpu())
    # Each model runs the probe on its own device; the comparison happens on the CPU.
    return compare_models(merge_peft(fp32), merged, adapted.base.image_size)


def merge_and_verify(adapted: AdaptedModel, rtol: float = MERGE_RTOL) -> tuple[Sam, dict]:
    """Merge and compare with the unmerged model; raises when outside ``rtol``."""
    model = adapted.model.eval()
    t0 = time.perf_counter()
    merged = merge_peft(model)
    merge_s = time.perf_counter() - t0
    image_size = model_image_size(model)
    errors = compare_models(model, merged, image_size, instance_decoder=adapted.instance_decoder)
    ok = errors["embeddings"]["max_rel"] <= rtol and errors["mask_logits"]["max_rel"] <= rtol
    report = {
        "peftexport_version": __version__,
        "qlora_vs_fp32_base": qlora_quantisation_error(adapted, merged) if _is_qlora(adapted) else None,
        "source": adapted.source,
        "peft": adapted.config.to_dict() if adapted.config else None,
        "base": adapted.base.to_dict(),
        "tolerance_rel": rtol,
        "instance_decoder": adapted.instance_decoder is not None,
        "errors": errors,
        "passed": ok,
        "merge_seconds": round(merge_s, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if not ok:
        raise PeftExportError(
            "merge verification failed: merged model differs from the adapter model "
            f"(embeddings rel {errors['embeddings']['max_rel']:.2e}, mask logits rel "
            f"{errors['mask_logits']['max_rel']:.2e} > {rtol:.0e}); nothing written"
        )
    return merged, report


def merge_to_checkpoint(
    adapted: AdaptedModel, out: str | Path, overwrite: bool = False, rtol: float = MERGE_RTOL
) -> dict:
    """Merge, verify, then write ``out`` (plain SAM state dict) and its report beside it
    (``merge_report_path``: ``merged.pth`` -> ``merged.report.json``)."""
    out = Path(out)
    check_can_write(out, overwrite)
    report_path = merge_report_path(out)
    check_can_write(report_path, overwrite)
    merged, report = merge_and_verify(adapted, rtol)
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    check_finite(state, str(out))
    report["output"] = str(out)
    report["num_tensors"] = len(state)
    payload: dict = state
    decoder_state = None
    if adapted.instance_decoder is not None:
        decoder_state = {k: v.detach().cpu().contiguous() for k, v in adapted.instance_decoder.state_dict().items()}
        check_finite(decoder_state, str(out))
    if is_sam2(merged):  # sam2's own checkpoint layout: build_sam2(config, out) loads it strictly (reads "model" only)
        payload = {"model": state} if decoder_state is None else {"model": state, "decoder_state": decoder_state}
        report["format"] = "sam2 checkpoint ({'model': state dict" + (", 'decoder_state': AIS decoder})"
                                                                       if decoder_state is not None else "})")
    elif decoder_state is not None:
        payload = {"model_state": state, "decoder_state": decoder_state}
        report["format"] = "micro-sam (model_state + decoder_state)"
    else:
        report["format"] = "segment_anything state dict"
    with atomic_file(out, overwrite=overwrite) as tmp:
        torch.save(payload, tmp)
    with atomic_file(report_path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    report["report_path"] = str(report_path)
    return report


def format_merge_report(report: dict) -> str:
    e = report["errors"]
    lines = [
        f"merged {report['source']} ({report['peft']['method'] if report['peft'] else 'plain'}) -> {report.get('output', '')}",
        f"  image embeddings: max abs {e['embeddings']['max_abs']:.3e}, max rel {e['embeddings']['max_rel']:.3e}",
        f"  mask logits:      max abs {e['mask_logits']['max_abs']:.3e}, max rel {e['mask_logits']['max_rel']:.3e}",
        f"  IoU predictions:  max abs {e['iou_predictions_max_abs']:.3e};  mask IoU {e['mask_iou']:.6f}",
    ]
    if "instance_maps" in e:
        lines.append(f"  AIS maps:         max abs {e['instance_maps']['max_abs']:.3e} "
                     f"(instance decoder kept: {report.get('format', 'micro-sam (model_state + decoder_state)')})")
    lines += [
        f"  verification: {'passed' if report['passed'] else 'FAILED'} (tolerance rel {report['tolerance_rel']:.0e})",
    ]
    base = report.get("base") or {}
    if base.get("model_type") == "vit_t" and base.get("image_size") not in (None, 1024):
        # TinyViT has no positional embedding: nothing in the file says which size it was trained at.
        lines.append(f"  note: vit_t checkpoints do not record their image size; this model was trained at "
                     f"{base['image_size']} px: pass --image-size {base['image_size']} when you load it")
    q = report.get("qlora_vs_fp32_base")
    if q:  # what the 4-bit base costs: the same LoRA merged into the fp32 base, compared
        lines.append(f"  QLoRA vs the same LoRA on the fp32 base: embeddings max rel {q['embeddings']['max_rel']:.3e}, "
                     f"mask IoU {q['mask_iou']:.6f}")
    return "\n".join(lines)
