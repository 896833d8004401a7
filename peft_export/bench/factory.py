"""Which runner times a case: a SAM model's (``runners``) or a SAM 2 model's (``sam2``), chosen by family.

Its own module so that ``runners`` and ``sam2`` (whose runners build on ``runners``) do not import each other.
"""

from __future__ import annotations

from .cases import BenchInputs, CaseSpec
from .runners import OrtRunner, Runner, RuntimeRunner, TorchRunner
from .sam2 import Sam2ExportRunner, Sam2TorchRunner, is_sam2_export, is_sam2_model


def make_runner(spec: CaseSpec, adapted, export_dir, inputs: BenchInputs, threads, comps) -> Runner:
    """The runner of one case (in this process); a SAM 2 model's from ``bench.sam2``."""
    if spec.backend in ("torch", "torch-compile"):
        factory, release = _torch_factory(spec.model, adapted, spec.device)
        if is_sam2_model(adapted):
            return Sam2TorchRunner(spec, factory, inputs, release)
        return TorchRunner(spec, factory, inputs, release, getattr(adapted, "instance_decoder", None))
    if is_sam2_export(export_dir):
        return Sam2ExportRunner(spec, export_dir, inputs, threads)
    if spec.backend == "onnxruntime":
        return OrtRunner(spec, export_dir, inputs, threads, end_to_end="end_to_end" in comps)
    return RuntimeRunner(spec, export_dir, inputs, threads)


def _torch_factory(model: str, adapted, device: str):
    """(factory, release) for a torch case; the adapter model itself is lent and moved back after."""
    if model == "base":
        from ..models import load_sam

        b = adapted.base
        return (lambda: load_sam(b.model_type, b.checkpoint, b.image_size, seed=b.seed, warn_random=False)[0]), None
    if model == "unmerged" or adapted.config is None:
        return (lambda: adapted.model), (lambda m: m.to("cpu"))
    from ..peft import merge_peft

    return (lambda: merge_peft(adapted.model)), None
