"""Model specs of the ``evaluate`` command turned into SamPredictor-shaped predictors.

A spec names one model to evaluate::

    [NAME=]SOURCE[@PRECISION][#ADAPTER]

SOURCE is ``random:TYPE`` (a seeded random init, for testing the pipeline), a SAM
checkpoint (``.pth``: official, merged or plain micro-sam), an adapter run directory
(or its adapter.json / adapter.safetensors), or an export directory (manifest.json).
PRECISION (fp32, fp16, int8) picks the graphs of an export dir; torch models run in fp32.
ADAPTER picks one adapter of an export of several (``export@int8#nuclei``; also
``export#nuclei@int8``); it may be left out when the export has one.

Torch models run through ``segment_anything.SamPredictor``; export dirs through the
runtime's ``SamSession``. Both take raw images and apply the model's own intensity
rule first (``normalize_intensity`` -> round/clip to uint8 -> ResizeLongestSide), so
a torch model and its export see the same pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PeftExportError
from ..runtime.intensity import DEFAULT_INTENSITY_RULE, check_intensity_rule, normalize_intensity
from ..runtime.preprocess import to_uint8

PRECISIONS = ("fp32", "fp16", "int8", "bf16")  # bf16: on the openvino backend (runtime.manifest)
RANDOM_PREFIX = "random:"
MICRO_SAM_PREFIX = "micro-sam:"  # a micro-sam training checkpoint; its PEFT method comes from --peft
ADAPTER_FILES = ("adapter.json", "adapter.safetensors")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class ModelSpec:
    """One parsed ``[NAME=]SOURCE[@PRECISION]``; ``kind`` is random, checkpoint, adapter or export."""

    text: str
    name: str
    source: str
    kind: str
    precision: str | None = None  # None: not given (fp32)
    adapter: str | None = None  # one adapter of an export of several


def _split_name(text: str) -> tuple[str | None, str]:
    if "=" not in text:
        return None, text
    name, rest = text.split("=", 1)
    # "a=b" is a display name only if the left part cannot be a path of its own.
    if name and os.sep not in name and "/" not in name and not Path(text).exists():
        return name, rest
    return None, text


def _split_precision(text: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    source, prec = text.rsplit("@", 1)
    if Path(text).exists() and not Path(source).exists():
        return text, None  # an '@' inside a real file name
    return source, prec


def _split_adapter(text: str) -> tuple[str, str | None]:
    """``SOURCE[@PRECISION]#ADAPTER`` or ``SOURCE#ADAPTER@PRECISION`` -> (``SOURCE[@PRECISION]``, ADAPTER)."""
    if "#" not in text or Path(text).exists():
        return text, None
    source, adapter = text.rsplit("#", 1)
    if "@" in adapter:
        adapter, precision = adapter.split("@", 1)
        source = f"{source}@{precision}"
    return source, adapter


def _kind_of(spec_text: str, source: str) -> str:
    if source.startswith(RANDOM_PREFIX):
        from ..models import MODEL_TYPES

        model_type = source[len(RANDOM_PREFIX):]
        if model_type not in MODEL_TYPES:
            raise PeftExportError(
                f"{spec_text}: unknown model type {model_type!r} (random:{'|'.join(MODEL_TYPES)})"
            )
        return "random"
    if source.startswith(MICRO_SAM_PREFIX):
        if not Path(source[len(MICRO_SAM_PREFIX):]).is_file():
            raise PeftExportError(f"{spec_text}: micro-sam checkpoint not found")
        return "micro-sam"
    path = Path(source)
    if not path.exists():
        raise PeftExportError(
            f"{spec_text}: no such file or directory (give a checkpoint .pth, an adapter run dir, "
            f"an export dir or random:TYPE)"
        )
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return "export"
        if (path / "adapter.json").is_file():
            return "adapter"
        raise PeftExportError(
            f"{spec_text}: directory has neither manifest.json (export dir) nor adapter.json (adapter run dir)"
        )
    if path.name in ADAPTER_FILES or (path.suffix == ".safetensors" and path.with_suffix(".json").is_file()):
        return "adapter"
    if path.name == "manifest.json":
        return "export"
    return "checkpoint"


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``[NAME=]SOURCE[@PRECISION]``; raises PeftExportError naming ``text``."""
    text = str(text).strip()
    if not text:
        raise PeftExportError("MODEL: empty model spec")
    name, rest = _split_name(text)
    rest, adapter = _split_adapter(rest)
    if adapter is not None and not adapter:
        raise PeftExportError(f"{text}: no adapter name after '#'")
    source, precision = _split_precision(rest)
    if precision is not None and precision not in PRECISIONS:
        raise PeftExportError(f"{text}: unknown precision {precision!r} (use @{', @'.join(PRECISIONS)})")
    if not source:
        raise PeftExportError(f"{text}: no model source before '@'")
    kind = _kind_of(text, source)
    if kind == "export" and Path(source).name == "manifest.json":
        source = str(Path(source).parent)
    if kind != "export" and precision not in (None, "fp32"):
        raise PeftExportError(f"{text}: @{precision} needs an export dir (torch models run in fp32)")
    if kind != "export" and adapter is not None:
        raise PeftExportError(f"{text}: #{adapter} picks an adapter of an export dir, not of a {kind}")
    if name is None:
        if kind == "random":
            name = source
        else:
            p = Path(source)
            name = p.parent.name if p.name in ADAPTER_FILES else (p.name if p.is_dir() else p.stem)
            name = name or source
        if adapter is not None:
            name = f"{name}#{adapter}"
        if precision is not None:
            name = f"{name}@{precision}"
    return ModelSpec(text, name, source, kind, precision, adapter)


def parse_model_specs(texts: list[str] | tuple[str, ...]) -> list[ModelSpec]:
    """Parse every spec; display names must be unique."""
    if not texts:
        raise PeftExportError("MODEL: give at least one model")
    specs = [parse_model_spec(t) for t in texts]
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen:
            raise PeftExportError(
                f"{s.text}: display name {s.name!r} is also used by {seen[s.name]}; name them with NAME=MODEL"
            )
        seen[s.name] = s.text
    return specs


class TorchPredictor:
    """``segment_anything.SamPredictor`` on a (possibly unmerged PEFT) Sam, fed like the runtime.

    ``set_image`` takes a raw image (HxW or HxWx{1,3,4}, any dtype), applies the
    intensity rule, rounds to uint8 RGB and hands it to SamPredictor, whose
    ResizeLongestSide uses ``sam.image_encoder.img_size`` (any image size works).
    """

    def __init__(self, sam: Any, intensity: dict | None = None, device: str = "cpu",
                 instance_decoder: Any = None) -> None:
        import torch

        from ..models.family import image_predictor, is_sam2, model_image_size

        if device == "cuda" and not torch.cuda.is_available():
            raise PeftExportError("device cuda: torch sees no CUDA device")
        self.model = sam.to(device).eval()
        self.instance_decoder = instance_decoder.to(device).eval() if instance_decoder is not None else None
        self.device = device
        self.intensity = check_intensity_rule(intensity)
        self.sam2 = is_sam2(self.model)
        self.image_size = model_image_size(self.model)
        self._predictor = image_predictor(self.model)  # SAM2ImagePredictor for a SAM 2 model
        self._image: np.ndarray | None = None

    def set_image(self, image: np.ndarray) -> None:
        import torch

        rgb = to_uint8(normalize_intensity(np.asarray(image), self.intensity))
        with torch.inference_mode():
            if self.sam2:
                self._predictor.set_image(rgb)  # SAM2ImagePredictor takes RGB
            else:
                self._predictor.set_image(rgb, image_format="RGB")
        self._image = rgb

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SamPredictor.predict: (masks (C,H,W), iou (C,), low-res logits (C,4g,4g))."""
        import torch

        with torch.inference_mode():
            return self._predictor.predict(
                point_coords=point_coords,
                point_labels=point_labels,
                box=box,
                mask_input=mask_input,
                multimask_output=multimask_output,
                return_logits=return_logits,
            )

    @property
    def has_instance_decoder(self) -> bool:
        return self.instance_decoder is not None

    def segment_instances(self, **params: Any) -> tuple[np.ndarray, list[dict]]:
        """micro-sam's AIS on the image of ``set_image``: the torch instance decoder's maps, then the
        runtime's post-processing (``SamSession.segment_instances``'s parameters) -> (int32 labels, records)."""
        import torch

        from ..models import postprocess_maps
        from ..runtime.instances import segment_from_maps

        if self.instance_decoder is None:
            raise PeftExportError("segment_instances: this model has no instance decoder (train with "
                                  "--instance-decoder, or load a micro-sam checkpoint with a decoder_state)")
        if self._image is None:
            raise PeftExportError("segment_instances: no image set; call set_image(image) first")
        from ..models.family import predictor_input

        embedding, input_size, original_size = predictor_input(self._predictor)
        with torch.inference_mode():
            maps = postprocess_maps(self.instance_decoder(embedding), input_size, original_size)
        return segment_from_maps(maps[0].float().cpu().numpy(), params)

    def segment_everything(self, points_per_side: int = 32, points_per_batch: int = 64,
                           pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                           box_nms_thresh: float = 0.7, min_mask_region_area: int = 0
                           ) -> tuple[np.ndarray, list[dict]]:
        """SamAutomaticMaskGenerator (SAM 2: SAM2AutomaticMaskGenerator; one crop) on the image of
        ``set_image`` -> (int32 labels, records).

        Masks are painted largest first, as the runtime's ``segment_everything`` does.
        """
        import torch

        if self.sam2:
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator as Generator
        else:
            from segment_anything import SamAutomaticMaskGenerator as Generator

        if self._image is None:
            raise PeftExportError("segment_everything: no image set; call set_image(image) first")
        gen = Generator(
            self.model, points_per_side=points_per_side, points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
            box_nms_thresh=box_nms_thresh, min_mask_region_area=min_mask_region_area,
        )
        if self.sam2:
            gen.predictor = self._predictor  # sized for this model (sam2's assumes 1024's features)
        with torch.inference_mode():
            records = gen.generate(self._image)
        labels = np.zeros(self._image.shape[:2], dtype=np.int32)
        areas = np.asarray([int(r["segmentation"].sum()) for r in records], dtype=np.int64)
        for k in np.argsort(-areas, kind="stable"):
            labels[records[k]["segmentation"]] = k + 1
        out = [{kk: v for kk, v in r.items() if kk not in ("segmentation", "crop_box")} for r in records]
        return labels, out


@dataclass
class LoadedModel:
    """A predictor built from a spec, with what it is for the report."""

    spec: ModelSpec
    predictor: Any
    backend: str  # "torch" or the runtime backend
    intensity: dict
    info: dict = field(default_factory=dict)


def load_predictor(
    spec: ModelSpec,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    backend: str = "onnxruntime",
    device: str = "cpu",
    seed: int = 0,
    force: bool = False,
    micro_sam_config: Any = None,
) -> LoadedModel:
    """Build the predictor of one spec.

    ``checkpoint`` is the base of adapter runs; ``image_size`` applies to random inits and
    checkpoints (positional embeddings are interpolated); ``backend`` to export dirs.
    """
    if spec.kind == "export":
        from ..runtime import SamSession, read_manifest

        names = list(read_manifest(spec.source).get("adapters") or {})
        if names and spec.adapter is None and len(names) > 1:
            raise PeftExportError(f"{spec.text}: export holds adapters {', '.join(names)}; pick one with "
                                  f"{spec.source}#NAME")
        if spec.adapter is not None and spec.adapter not in names:
            held = f"holds adapters {', '.join(names)}" if names else "holds one model, not named adapters"
            raise PeftExportError(f"{spec.text}: unknown adapter {spec.adapter!r} (the export {held})")
        session = SamSession(spec.source, backend=backend, device=device, precision=spec.precision or "fp32",
                             adapters=[spec.adapter] if spec.adapter else None)
        if image_size is not None and image_size != session.image_size:
            raise PeftExportError(
                f"{spec.text}: export is for image size {session.image_size}, --image-size {image_size} was asked"
            )
        desc = session.describe()
        rule = desc.get("intensity") or dict(DEFAULT_INTENSITY_RULE)
        info = {"kind": "export", "source": spec.source, "model_type": desc.get("model_type"),
                "image_size": session.image_size, "precision": spec.precision or "fp32",
                "backend": backend, "device": device, "graphs": desc.get("graphs"),
                "peft": session.manifest.get("peft"), "instance_decoder": session.has_instance_decoder}
        if session.adapters:
            info["adapter"] = session.adapters[0]
            info["peft"] = session.manifest["adapters"][session.adapters[0]].get("peft")
        return LoadedModel(spec, session, backend, check_intensity_rule(rule), info)

    from ..peft.adapters import load_adapter
    from ..models import load_sam_and_decoder

    if spec.kind in ("adapter", "micro-sam"):
        if spec.kind == "adapter":
            adapted = load_adapter(spec.source, checkpoint, force=force)
        else:
            from ..peft.adapters import load_model_source

            adapted = load_model_source(micro_sam=spec.source[len(MICRO_SAM_PREFIX):], micro_sam_config=micro_sam_config)
        sam, rule, decoder = adapted.model, adapted.intensity, adapted.instance_decoder
        base = adapted.base.to_dict()
        peft = adapted.config.to_dict() if adapted.config is not None else None
    else:
        model_type = spec.source[len(RANDOM_PREFIX):] if spec.kind == "random" else None
        sam, base_info, decoder = load_sam_and_decoder(model_type, None if spec.kind == "random" else spec.source,
                                                       image_size, seed=seed)
        rule, base, peft = dict(DEFAULT_INTENSITY_RULE), base_info.to_dict(), None
    predictor = TorchPredictor(sam, rule, device=device, instance_decoder=decoder)
    info = {"kind": spec.kind, "source": spec.source, "model_type": base.get("model_type"),
            "image_size": predictor.image_size, "precision": "fp32", "backend": "torch", "device": device,
            "base": base, "peft": peft, "instance_decoder": decoder is not None}
    return LoadedModel(spec, predictor, "torch", predictor.intensity, info)
