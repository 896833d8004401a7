"""SAM 2 in the bench: its torch image path and its export, behind the same ``Runner`` interface as SAM's
(``make_runner`` picks these by family: the model type's, ``models.family``, or the manifest's ``family``).

- torch (``Sam2TorchRunner``): the encoder is ``SAM2Base.forward_image`` with the decoder's ``conv_s0`` /
  ``conv_s1`` (``models.sam2.backbone_features``: what the export's encoder graph computes); the decoders are
  ``models.sam2.decode`` (sam2's prompt encoder + mask decoder with the high-resolution maps, all mask tokens)
  on fixed features; end to end is ``SAM2ImagePredictor.set_image`` + ``predict`` (one box). torch-compile
  compiles ``image_encoder`` (Hiera + FPN), as SAM's case does.
- export (``Sam2ExportRunner``): the runtime's ``Sam2Session`` on ONNX Runtime (CPU or CUDA provider) or
  OpenVINO: the encoder graph on the shared input, the decoder graph on its features (``no_mem_embed`` added)
  with the prompts in SAM 2's layout (box corners, points, a padding point), as ``Sam2Session`` feeds it; end
  to end is ``set_image`` + ``predict``. Host arrays in and out, also on CUDA.

micro-sam's instance decoder (``ais``: a SAM 2 export may have one, but only SAM's is timed), TensorRT engines and
ONNX Runtime's TensorRT provider are SAM-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import PeftExportError
from .cases import BenchInputs, CaseSpec, skip_record
from .runners import Runner, TorchRunner

FAMILY = "sam2"
NO_AIS = "ais: not timed for SAM 2 models (the AIS component is timed on SAM exports only)"


def is_sam2_export(export_dir: str | Path | None) -> bool:
    """Whether an export's manifest says ``family: sam2`` (read without torch)."""
    if export_dir is None:
        return False
    from ..runtime.manifest import read_manifest

    return read_manifest(export_dir).get("family") == FAMILY


def is_sam2_model(adapted) -> bool:
    """Whether an ``AdaptedModel`` (a torch case's) is SAM 2, by its model type (``models.family``)."""
    if adapted is None:
        return False
    from ..models.family import is_sam2_type

    return is_sam2_type(adapted.base.model_type)


def sam2_unsupported(spec: CaseSpec) -> str | None:
    """Why a planned case cannot run on a SAM 2 model (None: it can)."""
    if spec.backend == "tensorrt":
        return "SAM 2 exports have no TensorRT engines"
    if spec.backend == "onnxruntime" and spec.provider == "tensorrt":
        return "SAM 2 exports run on ONNX Runtime's CPU and CUDA providers (the runtime's Sam2Session)"
    return None


def split_sam2_cases(specs: Sequence[CaseSpec]) -> tuple[list[CaseSpec], list[dict]]:
    """The planned cases a SAM 2 model runs, and skip records for the others."""
    run, skipped = [], []
    for spec in specs:
        why = sam2_unsupported(spec)
        if why:
            skipped.append(skip_record(spec, why))
        else:
            run.append(spec)
    return run, skipped


def sam2_layout(coords: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Meta-layout prompts (K, N, 2) / (K, N) -> SAM 2's: each set closed by a padding point (0, 0), label -1."""
    if len(labels) and (labels[:, -1] == -1).all():
        return coords, labels
    k = len(coords)
    return (np.concatenate([coords, np.zeros((k, 1, 2), np.float32)], 1).astype(np.float32),
            np.concatenate([labels, -np.ones((k, 1), np.float32)], 1).astype(np.float32))


class Sam2TorchRunner(TorchRunner):
    """A SAM 2 model (plain, merged or with PEFT layers) on ``SAM2ImagePredictor``'s image path in torch."""

    def __init__(self, spec: CaseSpec, model_factory: Callable[[], Any], inputs: BenchInputs,
                 release: Callable[[Any], None] | None = None) -> None:
        super().__init__(spec, model_factory, inputs, release)
        self._feats = None

    def prepare(self) -> None:
        import torch

        from ..models.sam2 import compile_image_encoder, sam2_predictor

        dev = torch.device(self.spec.device)
        model = self._factory().to(dev).eval()
        self.model = model
        self._plain_encoder = None
        if self.spec.backend == "torch-compile":
            # Swapped in so that end to end (the predictor's forward_image) runs the compiled encoder too; undone in close.
            self._plain_encoder = compile_image_encoder(model)
        self._x = torch.from_numpy(self.inputs.encoder_input).to(dev)
        self._feats = None
        self._prompts = {}
        self._predictor = sam2_predictor(model)

    def ready(self, component: str) -> None:
        import torch

        from ..models.sam2 import encode_image

        if component == "ais":
            raise PeftExportError(NO_AIS)
        if component.startswith("decoder") and self._feats is None:
            with torch.inference_mode(), self._autocast():
                self._feats = encode_image(self.model, self._x)
        if component.startswith("decoder"):
            self._decoder_prompt(component)

    def _decoder_prompt(self, component: str):
        import torch

        if component not in self._prompts:
            coords, labels = self.inputs.decoder_prompts(component)
            dev = self._x.device
            if component == "decoder_point":  # sam2's prompt encoder appends the padding point itself
                self._prompts[component] = (torch.from_numpy(coords[:, :1]).to(dev),
                                            torch.from_numpy(labels[:, :1]).int().to(dev), None)
            else:
                self._prompts[component] = (None, None, torch.from_numpy(coords.reshape(-1, 4)).to(dev))
        return self._prompts[component]

    def run(self, component: str) -> None:
        import torch

        from ..models.sam2 import backbone_features, decode

        with torch.inference_mode(), self._autocast():
            if component == "encoder":
                backbone_features(self.model, self._x)
            elif component == "end_to_end":
                self._predictor.set_image(self.inputs.image)
                self._predictor.predict(box=self.inputs.image_box, multimask_output=False)  # host masks
            else:
                coords, labels, boxes = self._decoder_prompt(component)
                decode(self.model, self._feats, coords, labels, boxes, None, multimask=True)

    def close(self) -> None:
        self._feats = None
        super().close()


class Sam2ExportRunner(Runner):
    """A SAM 2 export through the runtime's ``Sam2Session`` (ONNX Runtime or OpenVINO)."""

    def __init__(self, spec: CaseSpec, export_dir: str | Path, inputs: BenchInputs,
                 intra_op_threads: int | None = None) -> None:
        self.spec, self.inputs, self.export_dir = spec, inputs, Path(export_dir)
        self.intra_op_threads = intra_op_threads
        self.session = None

    def prepare(self) -> None:
        from ..runtime import SamSession

        why = sam2_unsupported(self.spec)
        if why:
            raise PeftExportError(why)
        self.session = SamSession(self.export_dir, self.spec.backend, self.spec.device, self.spec.precision,
                                  intra_op_threads=self.intra_op_threads)
        self._run = self.session._backend.run
        self._embedding = None
        self._feeds: dict = {}
        self._described = {"family": FAMILY, "graphs": self.session.describe()["graphs"],
                           "decoder": {"one_prompt": "decoder", "batch": "decoder"},
                           "providers": list(self.session.providers)}

    def _encode(self) -> dict:
        return self._run("encoder", {"image": self.inputs.encoder_input})

    def ready(self, component: str) -> None:
        from ..runtime.sam2_session import Sam2Embedding

        if component == "ais":
            raise PeftExportError(NO_AIS)
        if component.startswith("decoder") and self._embedding is None:
            out = self._encode()
            maps = tuple(np.asarray(out[n], np.float32) for n in ("high_res_feats_0", "high_res_feats_1"))
            emb = np.asarray(out["image_embeddings"], np.float32) + self.session.no_mem_embed  # as Sam2Session.encode
            self._embedding = Sam2Embedding(emb, maps, (self.inputs.image_size, self.inputs.image_size))
        if component.startswith("decoder") and component not in self._feeds:
            coords, labels = sam2_layout(*self.inputs.decoder_prompts(component))
            self._feeds[component] = (coords, labels, *self.session._mask_input(None, len(coords)))

    def run(self, component: str) -> None:
        if component == "encoder":
            self._encode()
        elif component == "end_to_end":
            self.session.set_image(self.inputs.image)
            self.session.predict(box=self.inputs.image_box, multimask_output=False)
        else:
            self.session._decode(self._embedding, *self._feeds[component])  # all four tokens, as predict runs it

    def close(self) -> None:
        self.session = self._run = self._embedding = None
        self._feeds = {}

    def describe(self) -> dict:
        return getattr(self, "_described", {"family": FAMILY})
